"""The example third-party plugin (examples/trust_routing_plugin), installed through its entry point.

The package is laid out as pip installs it: the import package plus a ``*.dist-info`` whose
``entry_points.txt`` is generated from the example's own pyproject.toml, in a directory put on
``sys.path`` (in-process) or ``PYTHONPATH`` (subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from darkmatter.identity import Identity
from darkmatter.plugins import installed_plugins
from darkmatter.testing import RawPeer, env_for_tests, make_node, node_context

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "trust_routing_plugin"
MODULE = "darkmatter_trust_routing"


def install_example(site: Path) -> dict:
    """Install the example into ``site`` as pip would; returns its [project] table."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / MODULE, site / MODULE, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items()) for group, eps in groups.items()))
    return project


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_example(site)
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop(MODULE, None)
    yield site
    sys.modules.pop(MODULE, None)


DENIED = Identity.generate().public_key_hex
ALLOWED = Identity.generate().public_key_hex
STRANGER = Identity.generate().public_key_hex


def request_from(agent_id: str) -> dict:
    return {"from_agent_id": agent_id, "from_agent_url": "http://127.0.0.1:9", "from_agent_bio": "",
            "from_agent_display_name": None, "from_agent_public_key_hex": agent_id, "protocol_version": "0.3",
            "signed": True}


def test_the_node_loads_the_example_by_its_entry_point(site, tmp_path):
    assert installed_plugins()["trust_routing"].value == MODULE
    for selection in ("trust_routing", None):  # requested by name, and autoloaded with everything installed
        node = make_node(tmp_path / "n", plugins=selection)
        info = {i.name: i for i in node.pm.darkmatter_info}["trust_routing"]
        assert (info.version, info.module, info.builtin) == ("0.1.0", MODULE, False)
        assert info.hooks == ["dm_rank_forwarding_candidates", "dm_trust_connection_request"]
        module = node.pm.get_plugin("trust_routing")
        assert Path(module.__file__).is_relative_to(site)
    assert "trust_routing" not in {i.name for i in make_node(tmp_path / "m", plugins="").pm.darkmatter_info}


@pytest.mark.anyio
async def test_trust_decisions_of_the_entry_point_plugin_take_effect(site, tmp_path):
    lists = {"DARKMATTER_TRUST_DENY": f"{DENIED}, {Identity.generate().public_key_hex}",
             "DARKMATTER_TRUST_ALLOW": ALLOWED.upper()}
    async with node_context(tmp_path / "plain", plugins="trust_routing", DARKMATTER_GENESIS="false", **lists) as node:
        decide = node.pm.hook.dm_trust_connection_request
        assert decide(node=node, request=request_from(DENIED)) == "reject"
        assert decide(node=node, request=request_from(ALLOWED)) == "accept"
        assert decide(node=node, request=request_from(STRANGER)) == "queue"  # deferred to the kernel default
    async with node_context(tmp_path / "genesis", plugins="trust_routing", **lists) as node:
        decide = node.pm.hook.dm_trust_connection_request
        assert decide(node=node, request=request_from(DENIED)) == "reject"  # even a genesis node
        assert decide(node=node, request=request_from(STRANGER)) == "accept"


@pytest.mark.anyio
async def test_the_trust_policy_decides_real_connection_requests_over_http(site, tmp_path):
    denied, allowed, stranger = RawPeer(), RawPeer(), RawPeer()
    env = {"DARKMATTER_TRUST_DENY": denied.agent_id, "DARKMATTER_TRUST_ALLOW": allowed.agent_id,
           "DARKMATTER_GENESIS": "false"}
    async with node_context(tmp_path, plugins="http_transport,trust_routing", **env) as node:
        reply = await denied.post(node, "/__darkmatter__/connection_request", denied.connection_request())
        assert reply.status_code == 403 and "policy" in reply.json()["error"]
        assert denied.agent_id not in node.connections

        reply = await allowed.post(node, "/__darkmatter__/connection_request", allowed.connection_request())
        assert reply.status_code == 200 and reply.json()["auto_accepted"] is True
        assert node.connections[allowed.agent_id]["direction"] == "inbound"

        reply = await stranger.post(node, "/__darkmatter__/connection_request", stranger.connection_request())
        assert reply.status_code == 200 and reply.json()["auto_accepted"] is False
        assert [r["from_agent_id"] for r in node.state["pending_requests"].values()] == [stranger.agent_id]
        assert stranger.agent_id not in node.connections


def _conn(agent_id: str, bio: str, *, sent: int = 0, total_ms: float = 0, failures: int = 0) -> dict:
    return {"agent_id": agent_id, "agent_bio": bio, "messages_sent": sent, "total_response_time_ms": total_ms,
            "health_failures": failures}


@pytest.mark.anyio
async def test_forwarding_ranking_of_the_entry_point_plugin(site, tmp_path):
    ids = [Identity.generate().public_key_hex for _ in range(6)]
    candidates = [
        _conn(ids[0], "Gardening and tomatoes."),
        _conn(ids[1], "Rust compiler internals, borrow checker, lifetimes.", sent=2, total_ms=9000),
        _conn(ids[2], "Rust lifetimes.", sent=4, total_ms=400),
        _conn(ids[3], "Rust lifetimes and borrow checker.", failures=5),  # failing health checks
        _conn(ids[4], "Anything at all."),  # allow-listed
        _conn(ids[5], "Rust borrow checker lifetimes expert."),  # deny-listed
    ]
    message = {"message_id": "msg-000000000001", "content": "Who can explain Rust lifetimes and the borrow checker?"}
    async with node_context(tmp_path, plugins="trust_routing", DARKMATTER_TRUST_ALLOW=ids[4],
                            DARKMATTER_TRUST_DENY=ids[5]) as node:
        ranked = node.pm.hook.dm_rank_forwarding_candidates(node=node, message=message, candidates=candidates)
        # allow-listed first; then most shared words (ids[1] shares 4, ids[2] shares 2); then fastest;
        # never the deny-listed peer or the failing one.
        assert ranked == [ids[4], ids[1], ids[2], ids[0]]
        tie = [_conn(ids[0], "Rust lifetimes.", sent=1, total_ms=5000), _conn(ids[2], "Rust lifetimes.", sent=1, total_ms=50)]
        assert node.pm.hook.dm_rank_forwarding_candidates(node=node, message=message, candidates=tie) == [ids[2], ids[0]]
        # No candidates: the plugin defers and the kernel default answers.
        assert node.pm.hook.dm_rank_forwarding_candidates(node=node, message=message, candidates=[]) == []


def test_the_cli_lists_the_entry_point_plugin(site, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_")}
    env.update(env_for_tests(tmp_path), PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-m", "darkmatter", "plugins", "--json", "--plugins", "trust_routing"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["trust_routing"]["version"] == "0.1.0" and rows["trust_routing"]["builtin"] is False
    assert rows["trust_routing"]["hooks"] == ["dm_rank_forwarding_candidates", "dm_trust_connection_request"]
