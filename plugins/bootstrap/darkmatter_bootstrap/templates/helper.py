# Helpers shared by the /bootstrap script and server.py: stdlib only, Python 3.8+.
# A fragment: darkmatter_bootstrap/scripts.py puts it into both programs.
import hashlib, json, os, socket, subprocess, sys, time, urllib.request


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(65536), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url, dest):
    with urllib.request.urlopen(url, timeout=300) as reply, open(dest, "wb") as out:
        for chunk in iter(lambda: reply.read(65536), b""):
            out.write(chunk)


def parse_ports(spec):
    ports = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError("%r is not a port or a lo-hi range of ports" % part)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError("%r is not within 1-65535" % part)
        ports.extend(p for p in range(lo, hi + 1) if p not in ports)
    if not ports or len(ports) > 1024:
        raise ValueError("%r must list between 1 and 1024 ports" % spec)
    return ports


def pick_port(spec, prefer=""):
    ports = parse_ports(spec)
    if prefer.isdigit() and int(prefer) in ports:
        ports.remove(int(prefer))
        ports.insert(0, int(prefer))
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            sock.close()
    return None


def probe(port, timeout=2.0):
    """The agent_id of the DarkMatter node answering on 127.0.0.1:port, else None (never via a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open("http://127.0.0.1:%d/.well-known/darkmatter.json" % int(port), timeout=timeout) as r:
            doc = json.loads(r.read(65536).decode("utf-8"))
    except Exception:
        return None
    if isinstance(doc, dict) and doc.get("darkmatter") is True and isinstance(doc.get("agent_id"), str):
        return doc["agent_id"]
    return None


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return False
    try:
        with open("/proc/%d/stat" % int(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def launch(vpy, port, state_file, log_path, cwd):
    """Start `python -m darkmatter run` in its own session (setsid), detached from this terminal."""
    env = dict(os.environ, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(port), DARKMATTER_STATE_FILE=state_file)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    # the node's log may hold what its peers sent: 0600 from the first byte, never through a planted symlink
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen([vpy, "-m", "darkmatter", "run"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, cwd=cwd, env=env, start_new_session=True, close_fds=True)
    return proc.pid


def wait_for(port, pid, timeout):
    deadline = time.monotonic() + float(timeout)
    while True:
        agent = probe(port)
        if agent:
            return agent
        if not alive(pid) or time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def tail(path, lines=30):
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read()[-65536:].splitlines()[-lines:]).decode("utf-8", "replace") + "\n"
    except OSError:
        return "(no log)\n"


def report(origin, vpy, port, pid, agent, home):
    state = os.path.join(home, "state", "%s.json" % port)
    config = {"mcpServers": {"darkmatter": {"command": vpy, "args": ["-m", "darkmatter", "run"],
                                            "env": {"DARKMATTER_PORT": str(port), "DARKMATTER_STATE_FILE": state}}}}
    text = json.dumps(config, indent=2)
    path = os.path.join(home, "mcp.json")
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)
    return "\n".join([
        "DarkMatter node running at http://127.0.0.1:%s (pid %s, agent %s)" % (port, pid, agent),
        "Log: %s" % os.path.join(home, "logs", "node-%s.log" % port),
        "",
        "Add this to your .mcp.json (also saved as %s):" % path,
        text,
        "",
        "To connect back to the node this came from, have your agent call the darkmatter_request_connection",
        "tool with url: %s" % origin,
        "Stop the node with: kill %s (run this again to restart it)." % pid,
    ])
