# server.py's own steps, after helper.py: stdlib only, Python 3.8+ (it checks for 3.11+
# before creating the virtualenv).
import argparse, re, shutil


class Failure(Exception):
    pass


def say(text):
    sys.stderr.write("darkmatter-bootstrap: %s\n" % text)


def read_line(path):
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def write_line(path, value):
    with open(path, "w") as f:
        f.write("%s\n" % value)


def python_ok(path):
    try:
        return subprocess.run([path, "-c", "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_python():
    wanted = os.environ.get("DARKMATTER_PYTHON")
    if wanted:
        if python_ok(wanted):
            return wanted
        raise Failure("DARKMATTER_PYTHON=%s is not a working Python 3.11 or newer" % wanted)
    if sys.version_info >= (3, 11):
        return sys.executable
    for name in ("python3", "python3.14", "python3.13", "python3.12", "python3.11"):
        path = shutil.which(name)
        if path and python_ok(path):
            return path
    raise Failure("DarkMatter needs Python 3.11 or newer: install it (or set DARKMATTER_PYTHON) and run this again")


def take_lock(directory):
    lock = os.path.join(directory, "lock")
    try:
        os.mkdir(lock)
    except FileExistsError:
        other = read_line(os.path.join(lock, "pid"))
        if other.isdigit() and alive(other):
            raise Failure("another bootstrap (pid %s) holds %s; let it finish (or remove that directory)"
                          % (other, lock))
        shutil.rmtree(lock, ignore_errors=True)
        os.mkdir(lock)
    write_line(os.path.join(lock, "pid"), os.getpid())
    return lock


def run(cmd, what):
    if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode != 0:
        raise Failure(what)


def install(origin, home, python):
    venv, directory = os.path.join(home, "venv"), os.path.join(home, "bootstrap")
    vpy = os.path.join(venv, "bin", "python")
    files = []
    for name, sha in PACKAGES:
        dest = os.path.join(directory, "packages", name)
        if not (os.path.isfile(dest) and sha256_file(dest) == sha):
            say("downloading %s" % name)
            try:
                fetch("%s/bootstrap/packages/%s" % (origin, name), dest + ".part")
            except OSError as exc:
                raise Failure("could not download %s from %s: %s" % (name, origin, exc))
            got = sha256_file(dest + ".part")
            if got != sha:
                os.remove(dest + ".part")
                raise Failure("%s does not match its SHA-256 (expected %s, got %s); nothing was installed from it"
                              % (name, sha, got))
            os.replace(dest + ".part", dest)
        files.append(dest)
    fresh = not (os.access(vpy, os.X_OK) and python_ok(vpy) and subprocess.run(
        [vpy, "-m", "pip", "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL).returncode == 0)
    if fresh:
        say("creating the virtualenv %s with %s" % (venv, python))
        run([python, "-m", "venv", "--clear", venv],
            "could not create a virtualenv (on Debian or Ubuntu: apt install python3-venv)")
    else:
        say("reusing the virtualenv %s" % venv)
    stamp = os.path.join(directory, "installed")
    if read_line(stamp) == PACKAGE_SET and subprocess.run(
            [vpy, "-c", "import darkmatter"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        say("the packages are installed already")
        return vpy, False
    say("installing DarkMatter %s (third-party dependencies come from the package index)" % KERNEL_VERSION)
    pip = [vpy, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    run(pip + files, "pip could not install the packages (see above; PIP_INDEX_URL selects another index)")
    if not fresh:
        run(pip + ["--no-deps", "--force-reinstall"] + files, "pip could not reinstall the packages")
    write_line(stamp, PACKAGE_SET)
    return vpy, True


def running(directory):
    port, pid, agent = (read_line(os.path.join(directory, n)) for n in ("node.port", "node.pid", "node.agent"))
    if not port.isdigit():
        return None
    seen = probe(port)
    if not seen or (agent and seen != agent) or (not agent and not (pid.isdigit() and alive(pid))):
        return None
    return port, pid, seen


def start(home, directory, vpy, ports, wait):
    port = pick_port(ports, read_line(os.path.join(directory, "node.port")))
    if port is None:
        raise Failure("no free port in %s (set DARKMATTER_BOOTSTRAP_PORTS)" % ports)
    log_path = os.path.join(home, "logs", "node-%s.log" % port)
    pid = launch(vpy, port, os.path.join(home, "state", "%s.json" % port), log_path, home)
    write_line(os.path.join(directory, "node.pid"), pid)
    write_line(os.path.join(directory, "node.port"), port)
    if os.path.exists(os.path.join(directory, "node.agent")):
        os.remove(os.path.join(directory, "node.agent"))
    say("started the node (pid %s, port %s); waiting up to %s s for it to answer" % (pid, port, wait))
    agent = wait_for(port, pid, wait)
    if not agent:
        sys.stderr.write(tail(log_path))
        raise Failure("the node did not start (pid %s); its log is %s" % (pid, log_path))
    write_line(os.path.join(directory, "node.agent"), agent)
    return port, pid, agent


def main(argv=None):
    parser = argparse.ArgumentParser(description="Install and start a DarkMatter node.")
    parser.add_argument("--origin", default=ORIGIN, help="base URL of the node to fetch the packages from")
    args = parser.parse_args(argv)
    origin = args.origin.rstrip("/")
    try:
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", origin):
            raise Failure("--origin must be an http(s) URL")
        home = os.environ.get("DARKMATTER_HOME") or os.path.join(os.path.expanduser("~"), ".darkmatter")
        home = os.path.abspath(home)
        ports = os.environ.get("DARKMATTER_BOOTSTRAP_PORTS") or "8100-8110"
        try:
            parse_ports(ports)
            wait = int(os.environ.get("DARKMATTER_BOOTSTRAP_WAIT") or "90")
        except ValueError as exc:
            raise Failure("bad setting: %s" % exc)
        python = find_python()
        directory = os.path.join(home, "bootstrap")
        for sub in (os.path.join(directory, "packages"), os.path.join(home, "logs")):
            os.makedirs(sub, exist_ok=True)
        os.makedirs(os.path.join(home, "state"), mode=0o700, exist_ok=True)
        lock = take_lock(directory)
        try:
            say("installing from %s into %s" % (origin, home))
            vpy, updated = install(origin, home, python)
            found = running(directory)
            if found:
                say("the node started by an earlier run is still running (pid %s, port %s)" % (found[1], found[0]))
                if updated:
                    say("new packages were installed: stop it (kill %s) and run this again to use them" % found[1])
            else:
                found = start(home, directory, vpy, ports, wait)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    except Failure as exc:
        say("error: %s" % exc)
        return 1
    port, pid, agent = found
    print(report(origin, vpy, port, pid, agent, home))
    return 0


if __name__ == "__main__":
    sys.exit(main())
