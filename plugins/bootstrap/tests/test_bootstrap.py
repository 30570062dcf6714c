"""Self-replication (docs/protocol.md §4.11): /bootstrap, /bootstrap/server.py, /bootstrap/packages and the
server template tool, against real nodes running the kernel, http_transport and this plugin; the slow test
runs the script with real bash in a fresh HOME."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from starlette.requests import Request

from darkmatter.api import PROTOCOL_VERSION, Session, __version__, request_connection, send_message
from darkmatter.testing import client
from darkmatter.testing import node_context as kernel_node_context
from darkmatter_bootstrap import scripts, service, wheels

pytestmark = pytest.mark.anyio

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")


PLUGINS = "http_transport,bootstrap"


def node_context(directory: Path, **kwargs):
    """A node with exactly the kernel, http_transport and this plugin (whatever else is installed)."""
    kwargs.setdefault("plugins", PLUGINS)
    return kernel_node_context(directory, **kwargs)


def versions(node) -> dict[str, str]:
    return {p["name"]: p["version"] for p in node.plugin_list()}


def wheel_names(node) -> set[str]:
    v = versions(node)
    return {f"darkmatter-{__version__}-py3-none-any.whl",
            f"darkmatter_http_transport-{v['http_transport']}-py3-none-any.whl",
            f"darkmatter_bootstrap-{v['bootstrap']}-py3-none-any.whl"}


async def ready(node, timeout: float = 60.0) -> service.Bootstrap:
    """The node's bootstrap state once its packages are prepared (asking for them begins the packing, as a
    request to the routes does)."""
    state = service.state_of(node)
    await state.settled(node, timeout)
    return state


def packing_begun(node) -> bool:
    return any(task.get_name() == "bootstrap-packages" for task in node.tasks)


async def raw_get(port: int, path: str, host: str | None = None, extra: tuple[str, ...] = ()):
    """One GET with exactly this request line and Host (no client-side normalization)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close", *extra, "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def fetch_lines(script: str) -> dict[str, str]:
    return dict(re.findall(r"^    dm_fetch '([^']+)' '([0-9a-f]{64})'$", script, re.M))


def check_wheel(data: bytes) -> list[str]:
    """Every RECORD entry of the wheel matches its content; returns the file names."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(zf.read(record_name).decode())))
        assert {r[0] for r in rows} == set(names)
        for name, digest, size in rows:
            if name == record_name:
                continue
            content = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
            assert digest == "sha256=" + expected and int(size) == len(content), name
    return names


def limited_path(directory: Path) -> str:
    """A PATH holding only a few harmless tools, including `touch`, so that an injection could act."""
    directory.mkdir()
    for tool in ("touch", "mkdir", "rm", "cat", "mv"):
        found = shutil.which(tool)
        if found:
            (directory / tool).symlink_to(found)
    return str(directory)


async def run(*argv: str, env: dict, stdin: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --- packages, script, launcher --------------------------------------------------------------------


async def test_packing_waits_until_after_start_up_or_the_first_request(tmp_path):
    """Packing the wheels never competes with start-up: nothing is packed in the first PREPARE_AFTER seconds
    unless asked for; a request then gets the script (it begins the packing and waits for it), and a node
    nobody asks packs on its own after PREPARE_AFTER."""
    async with node_context(tmp_path / "a") as asked, node_context(tmp_path / "b") as idle, \
            client(asked) as http:
        started = time.monotonic()
        await asyncio.sleep(0.3)
        assert service.state_of(asked).status == "pending" and not packing_begun(asked)
        assert not packing_begun(idle)
        reply = await http.get("/bootstrap")
        assert reply.status_code == 200 and set(fetch_lines(reply.text)) == wheel_names(asked)
        if time.monotonic() - started < service.PREPARE_AFTER:
            assert not packing_begun(idle) and service.state_of(idle).status == "pending"
        for _ in range(int((service.PREPARE_AFTER + 60) / 0.05)):
            if service.state_of(idle).status != "pending":
                break
            await asyncio.sleep(0.05)
        assert service.state_of(idle).status == "ready", service.state_of(idle).error


async def test_node_serves_its_kernel_and_plugin_wheels_with_the_hashes_in_the_script(tmp_path):
    async with node_context(tmp_path / "a") as node, client(node) as http:
        state = await ready(node)
        assert state.status == "ready", state.error
        reply = await http.get("/bootstrap")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        script = reply.text
        listed = fetch_lines(script)
        assert set(listed) == wheel_names(node)
        assert f"DM_ORIGIN='{node.base_url}'" in script
        # §4.2: a Host that passes the pattern is what the script fetches from, with X-Forwarded-Proto.
        _, _, body = await raw_get(node.port, "/bootstrap", host=f"localhost:{node.port}",
                                   extra=("X-Forwarded-Proto: https",))
        assert f"DM_ORIGIN='https://localhost:{node.port}'\n" in body.decode()
        for name, sha in listed.items():
            got = await http.get(f"/bootstrap/packages/{name}")
            assert got.status_code == 200
            assert hashlib.sha256(got.content).hexdigest() == sha == got.headers["x-darkmatter-source-sha256"]
            names = check_wheel(got.content)
            top = name.split("-", 1)[0] + "/"
            assert any(n.startswith(top) and n.endswith(".py") for n in names)
            assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        kernel = next(n for n in listed if n.startswith("darkmatter-"))
        assert "darkmatter/node.py" in check_wheel((await http.get(f"/bootstrap/packages/{kernel}")).content)
        # The plugin's own wheel carries its templates (package data), so a bootstrapped node can serve them.
        own = next(n for n in listed if n.startswith("darkmatter_bootstrap-"))
        carried = check_wheel((await http.get(f"/bootstrap/packages/{own}")).content)
        assert {f"darkmatter_bootstrap/templates/{f}" for f in scripts.FILES} <= set(carried)
        launcher = await http.get("/bootstrap/server.py")
        assert launcher.status_code == 200
        assert launcher.headers["x-darkmatter-source-sha256"] == hashlib.sha256(launcher.content).hexdigest()
        compile(launcher.content, "server.py", "exec")
        for name, sha in listed.items():
            assert f'["{name}", "{sha}"]' in launcher.text
    path = tmp_path / "bootstrap.sh"
    path.write_text(script)
    for shell in {BASH, shutil.which("sh"), shutil.which("dash")} - {None}:  # POSIX syntax, not just bash
        code, _, err = await run(shell, "-n", str(path), env={"PATH": os.environ["PATH"]})
        assert code == 0, (shell, err)


async def test_wheels_are_reproducible_and_cached_under_the_state_dir(tmp_path):
    async with node_context(tmp_path / "a") as node:
        first = {p.file: p.sha256 for p in (await ready(node)).ordered}
    cache = tmp_path / "a" / "bootstrap-cache"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == len(first)
    async with node_context(tmp_path / "a") as node:
        assert {p.file: p.sha256 for p in (await ready(node)).ordered} == first
    async with node_context(tmp_path / "b") as node:  # no cache: built again, same bytes
        assert {p.file: p.sha256 for p in (await ready(node)).ordered} == first


BAD_PATHS = [
    "/bootstrap/packages/..",
    "/bootstrap/packages/../state.json",
    "/bootstrap/packages/..%2Fstate.json",
    "/bootstrap/packages/%2e%2e%2fstate.json",
    "/bootstrap/packages/%2E%2E",
    "/bootstrap/packages/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/bootstrap/packages/..%5C..%5Cstate.json",
    "/bootstrap/packages/%252e%252e%252fstate.json",
    "/bootstrap/packages//etc/passwd",
    "/bootstrap/packages/state.json",
    "/bootstrap/packages/state.token",
    "/bootstrap/packages/bootstrap-cache",
    "/bootstrap/packages/",
]


async def test_package_route_serves_only_listed_names(tmp_path):
    async with node_context(tmp_path / "a") as node:
        state = await ready(node)
        listed = list(state.packages)
        paths = BAD_PATHS + [f"/bootstrap/packages/{listed[0].upper()}", f"/bootstrap/packages/{listed[0]}%00",
                             f"/bootstrap/packages/x/../{listed[0]}", f"/bootstrap/packages/%2e%2e%2f{listed[0]}"]
        for path in paths:
            status, headers, body = await raw_get(node.port, path)
            assert status == 404, path
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"error": "Not found", "code": "not_found"}, path
        status, _, body = await raw_get(node.port, f"/bootstrap/packages/{listed[0]}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == state.packages[listed[0]].sha256


async def test_bootstrap_false_removes_the_routes(tmp_path):
    async with node_context(tmp_path / "a", DARKMATTER_BOOTSTRAP="false") as node, client(node) as http:
        await asyncio.sleep(0.2)
        assert service.state_of(node).status == "pending"  # nothing was packaged
        wheel = f"/bootstrap/packages/darkmatter-{__version__}-py3-none-any.whl"
        for path in ("/bootstrap", "/bootstrap/server.py", wheel):
            reply = await http.get(path)
            assert reply.status_code == 404 and reply.json() == {"error": "Not found", "code": "not_found"}, path
        result = await node.tools["darkmatter_get_server_template"].handler(node, {}, Session())
        assert "DARKMATTER_BOOTSTRAP=false" in result["packages"]["availability"]
        assert not (tmp_path / "a" / "bootstrap-cache").exists()


@needs_bash
async def test_packaging_failure_serves_a_script_that_says_packages_are_unavailable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bootstrap-cache").write_text("a file where the cache directory should be")
    async with node_context(tmp_path / "a") as node, client(node) as http:
        state = await ready(node)
        assert state.status == "failed" and "bootstrap-cache" in state.error
        reply = await http.get("/bootstrap")
        assert reply.status_code == 503 and reply.headers["content-type"].startswith("text/plain")
        assert "packages are unavailable" in reply.text
        code, out, err = await run(BASH, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "h")},
                                   stdin=reply.content)
        assert code == 1 and "packages are unavailable" in err and not (tmp_path / "h").exists()
        launcher = await http.get("/bootstrap/server.py")
        assert launcher.status_code == 503 and "packages are unavailable" in launcher.text
        assert (await http.get(f"/bootstrap/packages/darkmatter-{__version__}-py3-none-any.whl")).status_code == 404
        result = await node.tools["darkmatter_get_server_template"].handler(node, {}, Session())
        assert result["packages"]["availability"].startswith("unavailable")


@needs_bash
async def test_a_package_that_does_not_match_its_sha256_is_refused_before_anything_is_installed(tmp_path):
    async with node_context(tmp_path / "a") as node, client(node) as http:
        assert (await ready(node)).status == "ready"
        script = (await http.get("/bootstrap")).text
        launcher = (await http.get("/bootstrap/server.py")).text
        name, sha = sorted(fetch_lines(script).items())[-1]
        runs = {"sh": (BASH,), "py": (sys.executable, str(tmp_path / "server.py"))}
        (tmp_path / "server.py").write_text(launcher.replace(sha, "0" * 64))
        for kind, argv in runs.items():
            home = tmp_path / f"home-{kind}"
            env = {"HOME": str(home), "PATH": os.environ["PATH"], "DARKMATTER_PYTHON": sys.executable}
            code, out, err = await run(*argv, env=env, stdin=script.replace(sha, "0" * 64).encode(), timeout=60)
            assert code == 1 and f"{name} does not match its SHA-256" in err, (kind, out, err)
            packages = home / ".darkmatter" / "bootstrap" / "packages"
            assert not (packages / name).exists() and not (packages / f"{name}.part").exists()
            assert not (home / ".darkmatter" / "venv").exists()  # refused before the virtualenv is made
            assert out == ""


# --- hostile input ---------------------------------------------------------------------------------


def hostile_hosts(mark: Path) -> list[str]:
    # Each fails the §4.2 pattern. A loopback-bound node refuses them at the Host check (421); past that
    # check the script's origin falls back to the node's own URL. Either way nothing from them is embedded.
    return [f"127.0.0.1:1';touch {mark};'", f"localhost:$(touch {mark})", f"localhost:`touch {mark}`",
            f'127.0.0.1:1";touch {mark};"', f"localhost:1|touch {mark}", f"localhost:1&&touch {mark}",
            f"127.0.0.1:1'\"$(touch {mark})\"'"]


async def run_limited(script: bytes, tmp_path: Path, name: str) -> tuple[int, str, str, Path]:
    home = tmp_path / f"home-{name}"
    home.mkdir()
    env = {"HOME": str(home), "PATH": limited_path(tmp_path / f"bin-{name}")}
    code, out, err = await run(BASH, env=env, stdin=script, timeout=30)
    return code, out, err, home


def bootstrap_request(port: int, host: str, proto: str) -> Request:
    """The Starlette request /bootstrap would get for this Host and X-Forwarded-Proto (a real ASGI scope)."""
    return Request({"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/bootstrap",
                    "raw_path": b"/bootstrap", "query_string": b"", "root_path": "",
                    "headers": [(b"host", host.encode("latin-1")), (b"x-forwarded-proto", proto.encode("latin-1"))],
                    "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", port)})


async def test_malicious_host_is_refused_before_any_script_is_rendered(tmp_path):
    """A loopback-bound node answers every hostile Host with 421 (§2.1, §12.2), echoing nothing of it; and
    were one to get past that check, the script's origin would be the node's own URL (§4.2), not the Host."""
    mark = tmp_path / "pwned"
    hosts = hostile_hosts(mark)
    async with node_context(tmp_path / "a") as node:
        assert (await ready(node)).status == "ready"
        for host in hosts:
            status, headers, body = await raw_get(node.port, "/bootstrap", host=host,
                                                  extra=(f"X-Forwarded-Proto: http';touch {mark};'",))
            assert status == 421, (host, body[:200])
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["code"] == "misdirected"
            assert b"touch" not in body and str(mark).encode() not in body
            request = bootstrap_request(node.port, host, f"http';touch {mark};'")
            assert service.origin_for(node, service.caller_of(request)) == node.base_url.rstrip("/"), host
    assert not mark.exists() and len(hosts) == 7


@needs_bash
async def test_hostile_forwarded_proto_with_a_valid_host_gets_a_harmless_script(tmp_path):
    """A valid Host passes the check and is used (§4.2); a hostile X-Forwarded-Proto is not a scheme, so the
    script's origin is http:// with that Host, and nothing of the header reaches the script or runs."""
    mark = tmp_path / "pwned"
    protos = [f"http';touch {mark};'", f"https$(touch {mark})", f"`touch {mark}`", f"http\";touch {mark};\"",
              f"javascript:touch {mark}", f"https, http';touch {mark};'"]
    async with node_context(tmp_path / "a") as node:
        assert (await ready(node)).status == "ready"
        for i, proto in enumerate(protos):
            host = f"localhost:{node.port}"
            status, headers, body = await raw_get(node.port, "/bootstrap", host=host,
                                                  extra=(f"X-Forwarded-Proto: {proto}",))
            assert status == 200 and headers["content-type"].startswith("text/plain"), (proto, body[:200])
            text = body.decode()
            assert f"\nDM_ORIGIN='http://localhost:{node.port}'\n" in text, proto  # the Host, not the proto
            assert "touch" not in text and str(mark) not in text, proto
            path = tmp_path / f"script-{i}.sh"
            path.write_bytes(body)
            code, _, err = await run(BASH, "-n", str(path), env={"PATH": os.environ["PATH"]})
            assert code == 0, err
            code, out, err, home = await run_limited(body, tmp_path, str(i))
            assert code == 1 and "needs Python 3.11" in err, (proto, out, err)  # stops at the first real step
            assert list(home.iterdir()) == [] and not mark.exists(), (proto, out, err)
        # the header is read: a real scheme in it is used
        _, _, body = await raw_get(node.port, "/bootstrap", host=f"localhost:{node.port}",
                                   extra=("X-Forwarded-Proto: https",))
        assert f"\nDM_ORIGIN='https://localhost:{node.port}'\n" in body.decode()


@needs_bash
async def test_hostile_values_stay_inert_even_if_they_reached_the_renderer(tmp_path):
    mark = tmp_path / "pwned"
    evil = f"x';touch {mark};'`touch {mark}`$(touch {mark})\"$(touch {mark})\"\\'@@HELPER@@@@FETCH@@"
    package = wheels.Package(file=evil + ".whl", sha256=evil, distribution="d", version="1", role="kernel",
                                plugin=None, data=b"")
    script = scripts.render_script("http://h/" + evil, [package])
    assert f"\nDM_ORIGIN={scripts.shq('http://h/' + evil)}\n" in script
    assert script.count("DM_HELPER_EOF") == 2 and script.count("dm_fetch '") == 1
    path = tmp_path / "evil.sh"
    path.write_text(script)
    code, _, err = await run(BASH, "-n", str(path), env={"PATH": os.environ["PATH"]})
    assert code == 0, err
    code, out, err, _ = await run_limited(script.encode(), tmp_path, "evil")
    assert code == 1 and "needs Python 3.11" in err and not mark.exists(), (out, err)
    for bad in ("a\nb", "a\rb", "a\x00b", "a\x1bb"):
        with pytest.raises(ValueError):
            scripts.shq(bad)


# --- the server template tool --------------------------------------------------------------------


async def test_server_template_tool_over_mcp(tmp_path):
    async with node_context(tmp_path / "a") as node:
        state = await ready(node)
        result = await node.tools["darkmatter_get_server_template"].handler(node, {}, Session())
        assert result["implementation"]["kernel"] == {"distribution": "darkmatter", "version": __version__}
        v = versions(node)
        assert result["implementation"]["plugins"] == [
            {"name": "http_transport", "version": v["http_transport"], "distribution": "darkmatter-http-transport"},
            {"name": "bootstrap", "version": v["bootstrap"], "distribution": "darkmatter-bootstrap"}]
        packages = result["packages"]
        assert packages["availability"] == "ready"
        assert packages["bootstrap_script"] == node.base_url + "/bootstrap"
        assert packages["server_py"] == node.base_url + "/bootstrap/server.py"
        assert packages["server_py_sha256"] == state.server_py_sha256
        assert {f["file"]: f["sha256"] for f in packages["files"]} == {p.file: p.sha256 for p in state.ordered}
        assert all(f["url"] == f"{node.base_url}/bootstrap/packages/{f['file']}" for f in packages["files"])
        tools = {p["name"]: p["tool"] for p in result["primitives"]}
        assert tools == {"connect": "darkmatter_request_connection", "accept / reject": "darkmatter_respond_connection",
                         "disconnect": "darkmatter_disconnect", "message (with webhook)": "darkmatter_send_message"}
        assert "webhook" in result["primitives"][3]["summary"]
        assert len(result["bootstrap_steps"]) >= 5 and "/bootstrap" in result["bootstrap_steps"][0]
        assert "0.3" in result["compatibility"] and "0.2" in result["compatibility"]
        assert result["protocol_version"] == PROTOCOL_VERSION
        assert "recommendation" in result["recommendation"] and "may change" in result["recommendation"]
        assert node.mcp is not None, "the kernel did not build its /mcp endpoint"
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        async with streamable_http_client(f"http://127.0.0.1:{node.port}/mcp") as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            listed = {t.name: t for t in (await session.list_tools()).tools}
            assert listed["darkmatter_get_server_template"].annotations.read_only_hint is True
            answer = await session.call_tool("darkmatter_get_server_template", {})
            assert not answer.is_error
            assert json.loads(answer.content[0].text)["packages"]["files"] == packages["files"]


# --- end to end: curl | bash in a fresh HOME ---------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


async def stop_pid(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid):
            return
        os.kill(pid, sig)
        for _ in range(100):
            if not pid_alive(pid):
                return
            await asyncio.sleep(0.1)


def bootstrap_env(home: Path, ports: list[int]) -> dict[str, str]:
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "DARKMATTER_BOOTSTRAP_PORTS": ",".join(map(str, ports)),
           "DARKMATTER_DISCOVERY": "false", "DARKMATTER_UPNP": "false", "DARKMATTER_IP_LOOKUP_URL": "",
           "DARKMATTER_STUN_SERVERS": "", "DARKMATTER_BOOTSTRAP_WAIT": "120", "DARKMATTER_PYTHON": sys.executable}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("LANG", "SSL_CERT_FILE")})
    # The throwaway HOME hides the real user's pip settings and cache: keep using them (an index mirror,
    # and pip may reuse its cache so the install stays quick).
    real_home = Path(os.environ.get("HOME") or Path.home())
    for config in (real_home / ".config" / "pip" / "pip.conf", real_home / ".pip" / "pip.conf"):
        if config.is_file() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(config)
    env.setdefault("PIP_CACHE_DIR", str(real_home / ".cache" / "pip"))
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_bash
async def test_curl_bootstrap_bash_starts_a_node_that_joins_and_receives_a_message(tmp_path):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    home = tmp_path / "home"
    home.mkdir()
    ports = free_ports(3)
    env = bootstrap_env(home, ports)
    dm = home / ".darkmatter"
    pid = None
    async with node_context(tmp_path / "a") as origin:
        assert (await ready(origin)).status == "ready"
        url = f"{origin.base_url}/bootstrap"
        try:
            started = time.monotonic()
            if shutil.which("curl"):
                argv = (BASH, "-o", "pipefail", "-c", 'curl -fsSL "$1" | bash', "bootstrap", url)
                code, out, err = await run(*argv, env=env, timeout=360)
            else:
                async with client(origin) as http:
                    script = (await http.get("/bootstrap")).content
                code, out, err = await run(BASH, env=env, stdin=script, timeout=360)
            assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-4000:]}"
            assert time.monotonic() - started < 360
            pid = int((dm / "bootstrap" / "node.pid").read_text())
            port = int((dm / "bootstrap" / "node.port").read_text())
            assert port in ports and pid_alive(pid)

            # What it printed: the .mcp.json (stdio, the venv's python) and how to connect back.
            config = json.loads(out[out.index("{"):out.rindex("}") + 1])
            server = config["mcpServers"]["darkmatter"]
            assert server["command"] == str(dm / "venv" / "bin" / "python") and Path(server["command"]).exists()
            assert server["args"] == ["-m", "darkmatter", "run"]
            assert server["env"]["DARKMATTER_PORT"] == str(port)
            assert json.loads((dm / "mcp.json").read_text()) == config
            assert "darkmatter_request_connection" in out and origin.base_url in out

            # The new node: connect to it and send it a message; read its inbox over its own /mcp.
            new_url = f"http://127.0.0.1:{port}"
            async with client(origin) as http:
                doc = (await http.get(f"{new_url}/.well-known/darkmatter.json")).json()
            assert doc["darkmatter"] is True
            assert doc["agent_id"] == (dm / "bootstrap" / "node.agent").read_text().strip()
            # Unset DARKMATTER_PLUGINS: the new node loads every installed plugin, the ones it was given.
            assert sorted(p["name"] for p in doc["plugins"]) == ["bootstrap", "http_transport"]
            assert {p["name"]: p["version"] for p in doc["plugins"]} == versions(origin)
            joined = await request_connection(origin, new_url)
            assert joined["status"] == "connected", joined
            sent = await send_message(origin, "hello from the node you came from", doc["agent_id"])
            assert sent["deliveries"][doc["agent_id"]]["state"] == "delivered", sent
            async with streamable_http_client(f"{new_url}/mcp") as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                inbox = await session.call_tool("darkmatter_list_inbox", {})
                assert not inbox.is_error
                assert "hello from the node you came from" in inbox.content[0].text
                assert sent["message_id"] in inbox.content[0].text

            # Self-replication is transitive: the new node serves the very same wheels.
            async with client(origin) as http:
                for _ in range(300):
                    again = await http.get(f"{new_url}/bootstrap")
                    if again.status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                assert again.status_code == 200
                assert fetch_lines(again.text) == {p.file: p.sha256 for p in service.state_of(origin).ordered}

            # Idempotent: running the script again, or server.py, reuses everything and starts no second node.
            async with client(origin) as http:
                script = (await http.get("/bootstrap")).content
                launcher = await http.get("/bootstrap/server.py")
            code, out2, err2 = await run(BASH, env=env, stdin=script, timeout=120)
            assert code == 0, err2
            assert "reusing the virtualenv" in err2 and "installed already" in err2 and "still running" in err2
            assert f"pid {pid}" in out2 and int((dm / "bootstrap" / "node.pid").read_text()) == pid
            assert hashlib.sha256(launcher.content).hexdigest() == launcher.headers["x-darkmatter-source-sha256"]
            (tmp_path / "server.py").write_bytes(launcher.content)
            code, out3, err3 = await run(sys.executable, str(tmp_path / "server.py"), env=env, timeout=120)
            assert code == 0, err3
            assert "still running" in err3 and f"pid {pid}" in out3
            assert json.loads(out3[out3.index("{"):out3.rindex("}") + 1]) == config
            others = [p for p in ports if p != port]
            async with client(origin) as http:
                for other in others:
                    with pytest.raises(Exception):
                        await http.get(f"http://127.0.0.1:{other}/.well-known/darkmatter.json", timeout=2)

            # After the node stops, a re-run starts it again: same port, same state file, same identity.
            await stop_pid(pid)
            code, out4, err4 = await run(BASH, env=env, stdin=script, timeout=120)
            assert code == 0, err4
            assert "installed already" in err4 and "started the node" in err4
            pid = int((dm / "bootstrap" / "node.pid").read_text())
            assert int((dm / "bootstrap" / "node.port").read_text()) == port and pid_alive(pid)
            assert (dm / "bootstrap" / "node.agent").read_text().strip() == doc["agent_id"]
            assert origin.connections[doc["agent_id"]]  # still connected from the origin's side
        finally:
            if pid is None and (dm / "bootstrap" / "node.pid").exists():
                pid = int((dm / "bootstrap" / "node.pid").read_text())
            if pid is not None:
                await stop_pid(pid)
        assert not pid_alive(pid)


# --- the plugin on its own ---------------------------------------------------------------------------


def test_templates_are_package_files_and_rendering_fills_every_marker():
    folder = resources.files("darkmatter_bootstrap") / "templates"
    for name in scripts.FILES:
        assert (folder / name).read_text(encoding="utf-8") == scripts.TEMPLATES[name], name
    assert scripts.MARKER.search(scripts.TEMPLATES["bootstrap.sh"])  # they are templates...
    package = wheels.Package(file="x-1-py3-none-any.whl", sha256="0" * 64, distribution="x", version="1",
                             role="plugin", plugin="x", data=b"")
    script = scripts.render_script("http://127.0.0.1:9", [package])
    launcher = scripts.render_server_py("http://127.0.0.1:9", [package])
    assert not scripts.MARKER.search(script) and not scripts.MARKER.search(launcher)  # ...filled completely
    assert scripts.TEMPLATES["helper.py"].rstrip() in script and scripts.TEMPLATES["helper.py"].rstrip() in launcher
    compile(launcher, "server.py", "exec")
    with pytest.raises(ValueError, match="do not match"):
        scripts.fill("@@ORIGIN@@ @@OTHER@@", {"@@ORIGIN@@": "x"})  # a marker left unfilled
    with pytest.raises(ValueError, match="do not match"):
        scripts.fill("@@ORIGIN@@", {"@@ORIGIN@@": "x", "@@EXTRA@@": "y"})  # a value with no place


async def test_the_kernel_serves_the_routes_without_http_transport(tmp_path):
    async with kernel_node_context(tmp_path / "a", plugins="bootstrap") as node, client(node) as http:
        assert (await ready(node)).status == "ready"
        assert [p["name"] for p in node.plugin_list()] == ["bootstrap"]
        reply = await http.get("/bootstrap")
        assert reply.status_code == 200
        assert set(fetch_lines(reply.text)) == {
            f"darkmatter-{__version__}-py3-none-any.whl",
            f"darkmatter_bootstrap-{versions(node)['bootstrap']}-py3-none-any.whl"}
        assert (await http.get("/bootstrap/server.py")).status_code == 200
        assert "darkmatter_get_server_template" in node.tools
