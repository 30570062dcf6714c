"""Plugin selection, registration and the kernel's hook dispatch.

Third-party plugins are installed for real: a ``*.dist-info`` with ``entry_points.txt`` in a temporary
directory put on ``sys.path`` (in-process) or ``PYTHONPATH`` (subprocess), exactly as pip lays out a
package in site-packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter import hookimpl
from darkmatter.config import Config
from darkmatter.node import Node, StartupError
from darkmatter.plugins import BUILTINS, PluginError, build_plugin_manager, installed_plugins
from darkmatter.testing import client, env_for_tests, make_config, node_context
from darkmatter.tools import Tool

BUILTIN_NAMES = {m.rsplit(".", 1)[1] for m in BUILTINS}


def install_dist(site: Path, dist: str, entry_points: dict[str, str], files: dict[str, str],
                 version: str = "0.1.0") -> None:
    """Lay out an installed distribution with ``darkmatter`` entry points, as pip would."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text("[darkmatter]\n" + lines)
    for rel, text in files.items():
        (site / rel).write_text(text)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def loaded(pm) -> set[str]:
    return {i.name for i in pm.darkmatter_info if not i.builtin}


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "darkmatter", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_")}
    env.update(env_for_tests(home))
    env.update(extra)
    return env


# --- selection rules ---------------------------------------------------------------------------


def test_unset_selection_loads_every_installed_plugin():
    pm = build_plugin_manager(None)
    assert loaded(pm) == set(installed_plugins())
    assert {i.name for i in pm.darkmatter_info if i.builtin} == BUILTIN_NAMES
    for module in BUILTINS:
        assert pm.has_plugin(module)


def test_empty_selection_loads_only_the_essential_builtins():
    pm = build_plugin_manager("")
    assert loaded(pm) == set()
    for module in BUILTINS:
        assert pm.has_plugin(module)


def test_named_selection_loads_exactly_those():
    pm = build_plugin_manager(" http_transport , discovery_local ")
    assert loaded(pm) == {"http_transport", "discovery_local"}


def test_unknown_plugin_name_fails_listing_the_installed_ones():
    with pytest.raises(PluginError) as err:
        build_plugin_manager("http_transport,no_such_plugin")
    message = str(err.value)
    assert "'no_such_plugin'" in message
    for name in installed_plugins():
        assert name in message


def test_disable_drops_a_plugin_from_any_selection():
    pm = build_plugin_manager(None, ["discovery_lan"])
    assert loaded(pm) == set(installed_plugins()) - {"discovery_lan"}
    pm = build_plugin_manager("http_transport,discovery_lan", ["discovery_lan"])
    assert loaded(pm) == {"http_transport"}


def test_disable_of_an_unknown_or_essential_name_fails():
    with pytest.raises(PluginError, match="Unknown plugin 'nope'"):
        build_plugin_manager(None, ["nope"])
    with pytest.raises(PluginError, match="essential built-in"):
        build_plugin_manager(None, ["json_storage"])


def test_selection_comes_from_the_environment_and_flags_override_it(tmp_path):
    env = env_for_tests(tmp_path, DARKMATTER_PLUGINS="http_transport,discovery_local",
                        DARKMATTER_DISABLE_PLUGINS="discovery_local")
    assert loaded(Node(Config.from_env(env)).pm) == {"http_transport"}
    # --plugins "" wins over DARKMATTER_PLUGINS; --disable adds to DARKMATTER_DISABLE_PLUGINS.
    assert loaded(Node(Config.from_env(env, plugins="")).pm) == set()
    cfg = Config.from_env(env, plugins="http_transport,discovery_local,discovery_lan", disable=("discovery_lan",))
    assert loaded(Node(cfg).pm) == {"http_transport"}


def test_explicitly_requested_plugin_that_fails_to_import_is_an_error(tmp_path, monkeypatch):
    module = unique("dm_broken")
    install_dist(tmp_path, "dm-broken", {"broken": module},
                 {f"{module}.py": "raise ImportError('needs libfoo, which is not installed')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "broken" in installed_plugins()
    with pytest.raises(PluginError, match=r"'broken' failed to import: ImportError: needs libfoo"):
        build_plugin_manager("http_transport,broken")


def test_autoloaded_plugin_that_fails_to_import_is_logged_and_skipped(tmp_path, monkeypatch, caplog):
    module = unique("dm_broken")
    install_dist(tmp_path, "dm-broken", {"broken": module}, {f"{module}.py": "import no_such_module_xyz\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="darkmatter.plugins"):
        pm = build_plugin_manager(None)
    assert loaded(pm) == set(installed_plugins()) - {"broken"}
    assert any("'broken'" in r.getMessage() and "no_such_module_xyz" in r.getMessage() for r in caplog.records)


def test_plugin_with_a_misspelled_hook_is_refused_when_requested_and_skipped_when_autoloaded(
        tmp_path, monkeypatch, caplog):
    module = unique("dm_typo")
    source = ("from darkmatter import hookimpl\n\n@hookimpl\n"
              "def dm_on_mesage_received(node, message):\n    pass\n")
    install_dist(tmp_path, "dm-typo", {"typo": module}, {f"{module}.py": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'typo' has invalid hooks.*dm_on_mesage_received"):
        build_plugin_manager("typo")
    with caplog.at_level(logging.WARNING, logger="darkmatter.plugins"):
        pm = build_plugin_manager(None)
    assert "typo" not in loaded(pm)
    pm.check_pending()
    assert any("'typo'" in r.getMessage() for r in caplog.records)


def test_cli_reports_plugin_errors_in_one_line(tmp_path):
    module = unique("dm_broken")
    site = tmp_path / "site"
    site.mkdir()
    install_dist(site, "dm-broken", {"broken": module}, {f"{module}.py": "raise RuntimeError('boom')\n"})
    env = cli_env(tmp_path, PYTHONPATH=str(site))

    requested = cli("plugins", "--plugins", "broken", env=env)
    assert requested.returncode == 2
    assert requested.stderr.strip().splitlines() == [
        "darkmatter: error: Plugin 'broken' failed to import: RuntimeError: boom"]

    autoloaded = cli("plugins", "--json", env=env)
    assert autoloaded.returncode == 0, autoloaded.stderr
    names = {row["name"] for row in json.loads(autoloaded.stdout)}
    assert "broken" not in names and "http_transport" in names
    assert "skipping plugin 'broken'" in autoloaded.stderr and "Traceback" not in autoloaded.stderr

    unknown = cli("plugins", "--plugins", "nope", env=env)
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "Unknown plugin 'nope'" in unknown.stderr and "http_transport" in unknown.stderr


# --- registration: duplicates fail at start-up -----------------------------------------------------


async def _echo(node, arguments, session):
    return {"echo": arguments}


class ToolPlugin:
    def __init__(self, name: str, *tool_names: str):
        self.name = name
        self.tool_names = tool_names

    @hookimpl
    def dm_register_tools(self, register, node):
        for tool_name in self.tool_names:
            register(Tool(tool_name, f"{tool_name} from {self.name}", _echo))


class RoutePlugin:
    def __init__(self, name: str, path: str, methods: list[str]):
        self.name = name
        self.path = path
        self.methods = methods

    @hookimpl
    def dm_register_routes(self, register, node):
        async def endpoint(request):
            return JSONResponse({"plugin": self.name, "agent_id": node.agent_id})

        register(Route(self.path, endpoint, methods=self.methods))


def test_registered_tools_are_collected_with_their_plugin(tmp_path):
    node = Node(make_config(tmp_path, plugins=""), plugins=[ToolPlugin("alpha", "darkmatter_echo_a", "darkmatter_echo_b")])
    assert {"darkmatter_echo_a", "darkmatter_echo_b"} <= set(node.tools)
    assert node.tools["darkmatter_echo_a"].plugin == "alpha"


def test_duplicate_tool_name_fails_at_startup_naming_both_plugins(tmp_path):
    with pytest.raises(StartupError) as err:
        Node(make_config(tmp_path, plugins=""),
             plugins=[ToolPlugin("alpha", "darkmatter_echo"), ToolPlugin("beta", "darkmatter_other", "darkmatter_echo")])
    message = str(err.value)
    assert "'darkmatter_echo'" in message and "'alpha'" in message and "'beta'" in message


def test_duplicate_route_fails_at_startup_naming_both_plugins(tmp_path):
    with pytest.raises(StartupError) as err:
        Node(make_config(tmp_path, plugins=""),
             plugins=[RoutePlugin("alpha", "/__darkmatter__/x", ["POST"]),
                      RoutePlugin("beta", "/__darkmatter__/x", ["POST"])])
    message = str(err.value)
    assert "POST /__darkmatter__/x" in message and "'alpha'" in message and "'beta'" in message
    # The same path with another method is a different route.
    node = Node(make_config(tmp_path, plugins=""),
                plugins=[RoutePlugin("alpha", "/__darkmatter__/x", ["POST"]),
                         RoutePlugin("beta", "/__darkmatter__/x", ["GET"])])
    assert node.route_owners[("POST", "/__darkmatter__/x")] == "alpha"
    assert node.route_owners[("GET", "/__darkmatter__/x")] == "beta"


def test_duplicate_tool_from_two_installed_plugins_fails_the_cli_in_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name in ("dup_one", "dup_two"):
        module = unique(name)
        source = ("from darkmatter import hookimpl\nfrom darkmatter.tools import Tool\n\n"
                  "async def handler(node, arguments, session):\n    return {}\n\n"
                  "@hookimpl\ndef dm_register_tools(register, node):\n"
                  "    register(Tool('darkmatter_clash', 'clash', handler))\n")
        install_dist(site, f"dm-{name}", {name: module}, {f"{module}.py": source})
    env = cli_env(tmp_path, PYTHONPATH=str(site))
    for args in (("plugins", "--plugins", "dup_one,dup_two"),
                 ("run", "--transport", "http", "--port", "0", "--plugins", "http_transport,dup_one,dup_two")):
        result = cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("darkmatter: error: ")]
        assert len(errors) == 1, result.stderr
        assert "'darkmatter_clash'" in errors[0] and "'dup_one'" in errors[0] and "'dup_two'" in errors[0]
    assert not (tmp_path / ".darkmatter" / "state" / "0.json").exists()  # refused before any state was written


class Named:
    def __init__(self, name: str, priority: int = 0):
        self.name = name
        self.priority = priority

    def can_send(self, connection, size):
        return True

    async def send(self, connection, path, payload):
        raise NotImplementedError


class TransportPlugin:
    def __init__(self, name: str, *transports: Named):
        self.name = name
        self.transports = transports

    @hookimpl
    def dm_register_transports(self, register, node):
        for transport in self.transports:
            register(transport)


def test_transports_are_ordered_by_priority_and_duplicates_fail(tmp_path):
    slow, fast = Named("pigeon", priority=1), Named("laser", priority=50)
    node = Node(make_config(tmp_path, plugins=""), plugins=[TransportPlugin("p1", slow), TransportPlugin("p2", fast)])
    assert [t.name for t in node.transports] == ["laser", "pigeon"]
    with pytest.raises(StartupError) as err:
        Node(make_config(tmp_path, plugins=""),
             plugins=[TransportPlugin("p1", Named("laser")), TransportPlugin("p2", Named("laser"))])
    assert "transport 'laser'" in str(err.value) and "'p1'" in str(err.value) and "'p2'" in str(err.value)


# --- hook dispatch on a running node ---------------------------------------------------------------


@pytest.mark.anyio
async def test_plugin_route_is_served_on_the_node_port(tmp_path):
    async with node_context(tmp_path, plugins="", extra=[RoutePlugin("alpha", "/__darkmatter__/hello", ["GET"])]) as node:
        async with client(node) as http:
            reply = await http.get("/__darkmatter__/hello")
    assert reply.status_code == 200
    assert reply.json() == {"plugin": "alpha", "agent_id": node.agent_id}


class FaultyRoutesPlugin:
    """Plain mesh routes (answered by the kernel's direct path) that fail, and one shadowed by an earlier
    route with a path parameter (which Starlette's router would pick, so the direct path must too)."""

    name = "faulty"

    @hookimpl
    def dm_register_routes(self, register, node):
        from darkmatter.wire import ProtocolError

        async def refuses(request):
            raise ProtocolError(429, "capacity", "Too much")

        async def breaks(request):
            raise RuntimeError("secret detail")

        async def by_param(request):
            return JSONResponse({"answered_by": "param", "name": request.path_params["name"]})

        async def exact(request):
            return JSONResponse({"answered_by": "exact"})

        register(Route("/__darkmatter__/x-refuses", refuses, methods=["POST"]))
        register(Route("/__darkmatter__/x-breaks", breaks, methods=["GET"]))
        register(Route("/__darkmatter__/x-shadow/{name}", by_param, methods=["GET"]))
        register(Route("/__darkmatter__/x-shadow/exact", exact, methods=["GET", "POST"]))


@pytest.mark.anyio
async def test_plain_routes_answered_directly_keep_the_apps_error_answers_and_route_order(tmp_path, caplog):
    from darkmatter.server import direct_routes

    async with node_context(tmp_path, plugins="", extra=[FaultyRoutesPlugin()]) as node:
        direct = direct_routes(list(node.routes))
        async with client(node) as http:
            refused = await http.post("/__darkmatter__/x-refuses", content=b"{}")
            with caplog.at_level(logging.ERROR, logger="darkmatter.server"):
                broken = await http.get("/__darkmatter__/x-breaks")
            head = await http.head("/__darkmatter__/x-breaks")
            shadowed = await http.get("/__darkmatter__/x-shadow/exact")
            posted = await http.post("/__darkmatter__/x-shadow/exact")
            wrong_method = await http.get("/__darkmatter__/x-refuses")
    assert ("POST", "/__darkmatter__/x-refuses") in direct and ("GET", "/__darkmatter__/x-breaks") in direct
    assert ("HEAD", "/__darkmatter__/x-breaks") not in direct
    assert ("GET", "/__darkmatter__/x-shadow/exact") not in direct  # the param route comes first for GET
    assert ("POST", "/__darkmatter__/x-shadow/exact") in direct  # ... but does not take POST
    assert (refused.status_code, refused.json()["code"]) == (429, "capacity")
    assert broken.status_code == 503 and broken.json() == {"error": "Internal error", "code": "unavailable"}
    assert "secret detail" not in broken.text
    assert any("unhandled error on GET /__darkmatter__/x-breaks" in r.getMessage() for r in caplog.records)
    assert head.status_code == 503  # HEAD goes through Starlette's router: the same handler answers
    assert shadowed.json() == {"answered_by": "param", "name": "exact"}
    assert posted.json() == {"answered_by": "exact"}
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, "method_not_allowed")


class MemoryStorage:
    name = "memory"

    def __init__(self):
        self.commits: list[bytes] = []
        self.closed = False

    def load(self):
        return json.loads(self.commits[-1]) if self.commits else None

    async def commit(self, data: bytes) -> None:
        self.commits.append(data)

    def close(self) -> None:
        self.closed = True


class StoragePlugin:
    name = "memory_storage"

    def __init__(self):
        self.storage = MemoryStorage()

    @hookimpl
    def dm_register_storage(self, register, node):
        register(self.storage)


@pytest.mark.anyio
async def test_storage_plugin_is_used_when_selected_by_DARKMATTER_STORAGE(tmp_path):
    plugin = StoragePlugin()
    async with node_context(tmp_path, plugins="", extra=[plugin], DARKMATTER_STORAGE="memory") as node:
        node.state["bio"] = "kept in memory"
        await node.save()
    assert json.loads(plugin.storage.commits[-1])["bio"] == "kept in memory"
    assert plugin.storage.closed
    assert not (tmp_path / "state.json").exists()
    # The next start loads from the same storage: same identity.
    async with node_context(tmp_path, plugins="", extra=[plugin], DARKMATTER_STORAGE="memory") as again:
        assert again.agent_id == node.agent_id and again.state["bio"] == "kept in memory"


@pytest.mark.anyio
async def test_unknown_storage_name_fails_listing_the_known_ones(tmp_path):
    node = Node(make_config(tmp_path, plugins="", DARKMATTER_STORAGE="sqlite"))
    with pytest.raises(StartupError, match="Unknown storage 'sqlite'.*json"):
        await node.start()


class Source:
    name = "fake_source"

    def __init__(self, agent_id: str):
        self.agent_id = agent_id
        self.cancelled = False

    async def run(self, found):
        found({"agent_id": self.agent_id, "url": "http://127.0.0.1:9", "source": "local"})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def scan(self):
        return []


class DiscoveryPlugin:
    name = "fake_discovery"

    def __init__(self, source: Source):
        self.source = source

    @hookimpl
    def dm_register_discovery(self, register, node):
        register(self.source)


@pytest.mark.anyio
async def test_discovery_sources_run_when_discovery_is_on_and_feed_the_discovered_table(tmp_path):
    # a 0.2-style id: a self-certifying one is recorded only after its URL proved the key (§6.1), which needs a
    # transport this plugin-less node does not have
    peer = "5b1a8c7e-7c43-4c8e-9a57-1f7bd8a7e3a1"
    source = Source(peer)
    async with node_context(tmp_path / "on", plugins="", extra=[DiscoveryPlugin(source)],
                            DARKMATTER_DISCOVERY="true") as node:
        assert node.discovery_sources == [source]
        for _ in range(200):
            if peer in node.discovered:
                break
            await asyncio.sleep(0.01)
        assert node.discovered[peer]["url"] == "http://127.0.0.1:9"
    assert source.cancelled  # cancelled at shutdown

    idle = Source(peer)
    async with node_context(tmp_path / "off", plugins="", extra=[DiscoveryPlugin(idle)]) as node:
        await asyncio.sleep(0.05)
        assert node.discovered == {}


class LifespanPlugin:
    name = "lifespan_probe"

    def __init__(self):
        self.events: list[tuple] = []

    @hookimpl
    def dm_lifespan(self, node):
        @contextlib.asynccontextmanager
        async def lifespan():
            self.events.append(("enter", node.agent_id, node.started))
            yield
            self.events.append(("exit",))
            node.state["bio"] = "written at shutdown"
            node.save_soon()

        return lifespan()


class NoLifespan:
    name = "no_lifespan"

    @hookimpl
    def dm_lifespan(self, node):
        return None


@pytest.mark.anyio
async def test_lifespan_runs_after_state_load_and_exits_before_the_final_flush(tmp_path):
    probe = LifespanPlugin()
    async with node_context(tmp_path, plugins="", extra=[probe, NoLifespan()]) as node:
        assert probe.events == [("enter", node.agent_id, False)]
    assert probe.events[-1] == ("exit",)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["bio"] == "written at shutdown"


EVENTS = {
    "dm_on_message_received": {"message": {"message_id": "msg-000000000001", "content": "hi"}},
    "dm_on_message_forwarded": {"message": {"message_id": "msg-000000000001"}, "target_agent_id": "cd" * 32},
    "dm_on_message_responded": {"message_id": "msg-000000000001", "response": "ok", "delivery": "delivered"},
    "dm_on_response_received": {"sent_message": {"message_id": "msg-000000000002"}, "response": {"response": "ok"}},
    "dm_on_message_expired": {"message_id": "msg-000000000003", "reason": "hops"},
    "dm_on_connection_changed": {"agent_id": "ef" * 32, "event": "connected"},
    "dm_on_message_seen": {"message": {"message_id": "msg-000000000004"}, "state": "read"},
}


class EventProbe:
    """Implements every event hook; returns an awaitable (recorded when awaited) or raises."""

    def __init__(self, name: str, fail: bool):
        self.name = name
        self.fail = fail
        self.seen: list[tuple[str, dict]] = []

    def _hit(self, hook_name: str, **kwargs):
        if self.fail:
            raise RuntimeError("plugin bug")

        async def record():
            await asyncio.sleep(0)
            self.seen.append((hook_name, kwargs))

        return record()

    @hookimpl
    def dm_on_message_received(self, node, message):
        return self._hit("dm_on_message_received", node=node, message=message)

    @hookimpl
    def dm_on_message_forwarded(self, node, message, target_agent_id):
        return self._hit("dm_on_message_forwarded", node=node, message=message, target_agent_id=target_agent_id)

    @hookimpl
    def dm_on_message_responded(self, node, message_id, response, delivery):
        return self._hit("dm_on_message_responded", node=node, message_id=message_id, response=response,
                         delivery=delivery)

    @hookimpl
    def dm_on_response_received(self, node, sent_message, response):
        return self._hit("dm_on_response_received", node=node, sent_message=sent_message, response=response)

    @hookimpl
    def dm_on_message_expired(self, node, message_id, reason):
        return self._hit("dm_on_message_expired", node=node, message_id=message_id, reason=reason)

    @hookimpl
    def dm_on_connection_changed(self, node, agent_id, event):
        return self._hit("dm_on_connection_changed", node=node, agent_id=agent_id, event=event)

    @hookimpl
    def dm_on_message_seen(self, node, message, state):
        return self._hit("dm_on_message_seen", node=node, message=message, state=state)


@pytest.mark.anyio
@pytest.mark.parametrize("hook_name", sorted(EVENTS))
async def test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated(tmp_path, hook_name, caplog):
    kwargs = EVENTS[hook_name]
    # The failing plugin is registered last, so pluggy's order calls it first.
    good, bad = EventProbe("good_probe", fail=False), EventProbe("bad_probe", fail=True)
    changes: list[int] = []
    async with node_context(tmp_path, plugins="", extra=[good, bad]) as node:
        node.listeners.append(lambda: changes.append(1))
        with caplog.at_level(logging.ERROR, logger="darkmatter.node"):
            await node.emit(hook_name, **kwargs)
        assert good.seen == [(hook_name, {"node": node, **kwargs})]
        assert changes == [1]
        assert any("bad_probe" in r.getMessage() and hook_name in r.getMessage() for r in caplog.records)


class StatusPlugin:
    name = "status_probe"

    @hookimpl
    def dm_status_lines(self, node):
        return [f"ACTION: greet {node.agent_id[:8]}"]


class QuietStatus:
    name = "quiet_status"

    @hookimpl
    def dm_status_lines(self, node):
        return None


@pytest.mark.anyio
async def test_status_lines_from_plugins_are_collected(tmp_path):
    async with node_context(tmp_path, plugins="", extra=[StatusPlugin(), QuietStatus()]) as node:
        assert f"ACTION: greet {node.agent_id[:8]}" in node.status_lines()


REQUEST = {"from_agent_id": "12" * 32, "from_agent_url": "http://127.0.0.1:9", "from_agent_bio": "",
           "from_agent_display_name": None, "from_agent_public_key_hex": "12" * 32, "protocol_version": "0.3",
           "signed": True}


class Decider:
    name = "decider"

    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def dm_trust_connection_request(self, node, request):
        return self.answer

    @hookimpl
    def dm_rank_forwarding_candidates(self, node, message, candidates):
        return None if self.answer is None else [c["agent_id"] for c in reversed(candidates)]


@pytest.mark.anyio
async def test_default_trust_policy_accepts_on_genesis_and_queues_otherwise(tmp_path):
    async with node_context(tmp_path / "g", plugins="") as genesis:
        assert genesis.pm.hook.dm_trust_connection_request(node=genesis, request=REQUEST) == "accept"
    async with node_context(tmp_path / "n", plugins="", DARKMATTER_GENESIS="false") as plain:
        assert plain.pm.hook.dm_trust_connection_request(node=plain, request=REQUEST) == "queue"
    async with node_context(tmp_path / "d", plugins="", extra=[Decider(None)], DARKMATTER_GENESIS="false") as deferring:
        assert deferring.pm.hook.dm_trust_connection_request(node=deferring, request=REQUEST) == "queue"
    async with node_context(tmp_path / "r", plugins="", extra=[Decider("reject")]) as strict:
        assert strict.pm.hook.dm_trust_connection_request(node=strict, request=REQUEST) == "reject"


@pytest.mark.anyio
async def test_default_forwarding_rank_is_empty_and_a_plugin_ranking_wins(tmp_path):
    candidates = [{"agent_id": "aa" * 32}, {"agent_id": "bb" * 32}]
    message = {"message_id": "msg-000000000001", "content": "hello"}
    async with node_context(tmp_path / "a", plugins="") as node:
        assert node.pm.hook.dm_rank_forwarding_candidates(node=node, message=message, candidates=candidates) == []
    async with node_context(tmp_path / "b", plugins="", extra=[Decider("accept")]) as node:
        ranked = node.pm.hook.dm_rank_forwarding_candidates(node=node, message=message, candidates=candidates)
        assert ranked == ["bb" * 32, "aa" * 32]


def test_plugin_state_is_per_node_and_made_once(tmp_path):
    a = Node(make_config(tmp_path / "a", plugins=""))
    b = Node(make_config(tmp_path / "b", plugins=""))
    made: list[dict] = []

    def factory() -> dict:
        made.append({})
        return made[-1]

    first = a.plugin_state("probe", factory)
    assert a.plugin_state("probe", factory) is first and len(made) == 1  # made on first use only
    assert b.plugin_state("probe", factory) is not first and len(made) == 2  # every node has its own
    assert a.plugin_state("other", dict) is not first  # keyed by the plugin's name


# --- messages from outside the mesh: external_message, dm_claim_message, dm_on_message_seen -------------


class RelayClaim:
    """A claim that records what the kernel asked of it."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.answers: list[tuple[str, str]] = []
        self.expired: list[str] = []

    async def respond(self, message, response, metadata):
        self.answers.append((message["message_id"], response))
        return {"delivery": "failed", "last_error": "relay gone"} if self.fail else {"delivery": "delivered"}

    async def expire(self, message):
        self.expired.append(message["message_id"])


class RelayPlugin:
    name = "relay_probe"

    def __init__(self, claim: RelayClaim):
        self.claim = claim
        self.events: list[tuple] = []

    @hookimpl
    def dm_claim_message(self, node, message):
        return self.claim if message.get("transport") == "relay" else None

    @hookimpl
    def dm_on_message_responded(self, node, message_id, response, delivery):
        self.events.append(("responded", message_id, delivery))

    @hookimpl
    def dm_on_message_expired(self, node, message_id, reason):
        self.events.append(("expired", message_id, reason))

    @hookimpl
    def dm_on_message_seen(self, node, message, state):
        self.events.append(("seen", message["message_id"], state))


async def _tool(node, name: str, **arguments):
    from darkmatter.tools import Session

    return await node.tools[name].handler(node, arguments, Session())


@pytest.mark.anyio
async def test_external_message_enters_the_inbox_unverified_and_under_the_caps(tmp_path):
    from darkmatter.api import ProtocolError, external_message

    async with node_context(tmp_path, plugins="", DARKMATTER_INBOX_MAX="4") as node:
        entry = await external_message(node, "relay:10.0.0.7", "hello", {"k": 1}, transport="relay")
        assert entry in node.state["inbox"]
        assert entry["outside_mesh"] is True and entry["verified"] is False and entry["webhook"] is None
        assert entry["from_agent_id"] == "relay:10.0.0.7" and entry["transport"] == "relay"
        await external_message(node, "relay:10.0.0.7", "again", transport="relay")
        with pytest.raises(ProtocolError) as share:  # one sender holds at most half the inbox
            await external_message(node, "relay:10.0.0.7", "third", transport="relay")
        assert share.value.status == 429 and "for this sender" in share.value.error
        with pytest.raises(ProtocolError) as spoof:  # a pseudo-peer never looks like a mesh agent_id
            await external_message(node, "ab" * 32, "hi", transport="relay")
        assert spoof.value.status == 400
        with pytest.raises(ProtocolError) as big:
            await external_message(node, "relay:10.0.0.8", "x" * 70000, transport="relay")
        assert big.value.status == 413
        await external_message(node, "relay:10.0.0.8", "one", transport="relay")
        await external_message(node, "relay:10.0.0.9", "two", transport="relay")
        with pytest.raises(ProtocolError) as full:
            await external_message(node, "relay:10.0.0.10", "five", transport="relay")
        assert full.value.status == 429 and full.value.error == "Message queue full"
    async with node_context(tmp_path, plugins="") as again:  # durable: the accepted ones were journaled
        assert [m["content"] for m in again.state["inbox"]] == ["hello", "again", "one", "two"]
        again.state["status"] = "inactive"
        again.state["inbox"].clear()
        with pytest.raises(ProtocolError) as inactive:
            await external_message(again, "relay:10.0.0.8", "hi", transport="relay")
        assert inactive.value.status == 503


@pytest.mark.anyio
async def test_external_message_is_rate_limited_per_sender(tmp_path):
    from darkmatter.api import ProtocolError, external_message

    async with node_context(tmp_path, plugins="", DARKMATTER_RATE_MESSAGE_PEER="2/1/60") as node:
        for text in ("a", "b"):
            await external_message(node, "relay:1", text, transport="relay")
        with pytest.raises(ProtocolError) as limited:
            await external_message(node, "relay:1", "c", transport="relay")
        assert limited.value.status == 429 and limited.value.code == "rate_limited"
        await external_message(node, "relay:2", "d", transport="relay")  # another sender has its own bucket


@pytest.mark.anyio
async def test_a_claimed_message_is_answered_and_expired_through_dm_claim_message_never_a_webhook(tmp_path):
    from darkmatter.api import ToolError, external_message

    claim = RelayClaim()
    plugin = RelayPlugin(claim)
    async with node_context(tmp_path, plugins="", extra=[plugin]) as node:
        first = await external_message(node, "relay:1", "question", transport="relay")
        second = await external_message(node, "relay:1", "another", transport="relay")
        view = await _tool(node, "darkmatter_get_message", message_id=first["message_id"])
        assert view["outside_mesh"] is True and view["verified"] is False
        with pytest.raises(ToolError, match="outside the mesh"):
            await _tool(node, "darkmatter_forward_message", message_id=first["message_id"], target_agent_id="ab" * 32)
        result = await _tool(node, "darkmatter_respond_message", message_id=first["message_id"], response="answer")
        assert (result["success"], result["message_id"], result["delivery"], result["last_error"]) == (
            True, first["message_id"], "delivered", None)
        assert result["webhook_called"] is None
        assert claim.answers == [(first["message_id"], "answer")]
        assert ("responded", first["message_id"], "delivered") in plugin.events
        expired = await _tool(node, "darkmatter_expire_message", message_id=second["message_id"])
        assert expired["status"] == "expired" and claim.expired == [second["message_id"]]
        assert ("expired", second["message_id"], "expired by the agent") in plugin.events
        assert node.state["inbox"] == [] and not node.state["outbox"]  # nothing went to any webhook
        claim.fail = True
        third = await external_message(node, "relay:1", "again", transport="relay")
        failed = await _tool(node, "darkmatter_respond_message", message_id=third["message_id"], response="x")
        assert failed["success"] is False and failed["last_error"] == "relay gone"
    async with node_context(tmp_path / "plain", plugins="") as node:  # unclaimed: the mesh rules apply
        entry = await external_message(node, "relay:1", "question", transport="relay")
        with pytest.raises(ToolError, match="Webhook blocked"):
            await _tool(node, "darkmatter_respond_message", message_id=entry["message_id"], response="answer")
        with pytest.raises(ToolError, match="No sent message"):
            await _tool(node, "darkmatter_expire_message", message_id=entry["message_id"])
        assert [m["message_id"] for m in node.state["inbox"]] == [entry["message_id"]]


@pytest.mark.anyio
async def test_listing_and_reading_the_inbox_emits_dm_on_message_seen_once_per_state(tmp_path):
    from darkmatter.api import external_message

    plugin = RelayPlugin(RelayClaim())

    def seen() -> list:
        return [e for e in plugin.events if e[0] == "seen"]

    async def settle() -> None:  # the event runs in a background task
        for _ in range(100):
            await asyncio.sleep(0.01)

    async with node_context(tmp_path, plugins="", extra=[plugin]) as node:
        first = await external_message(node, "relay:1", "question", transport="relay")
        second = await external_message(node, "relay:2", "other", transport="relay")
        await settle()
        assert seen() == []
        await _tool(node, "darkmatter_get_message", message_id=second["message_id"])  # read before listed
        await settle()
        assert seen() == [("seen", second["message_id"], "read")]
        listed = await _tool(node, "darkmatter_list_inbox")
        assert listed["messages"][0]["outside_mesh"] is True
        await settle()
        assert seen()[1:] == [("seen", first["message_id"], "surfaced")]
        await _tool(node, "darkmatter_list_inbox")
        await _tool(node, "darkmatter_get_message", message_id=first["message_id"])
        await settle()
        assert seen()[2:] == [("seen", first["message_id"], "read")]  # listing again is not new
