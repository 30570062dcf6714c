"""Three real nodes (http_transport + discovery_local) on loopback ports find each other by scanning."""

from __future__ import annotations

import contextlib
import json
import socket

import anyio
import httpx
import pytest

from darkmatter.testing import make_node
from darkmatter.api import Session

INTERVAL = 1.0
PRUNE = 3.0


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (the nodes must know each other's ports before they start)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def scanning_node(tmp_path, name: str, port: int, ports: list[int], **env):
    settings = {"DARKMATTER_DISCOVERY": "true", "DARKMATTER_DISCOVERY_PORTS": ",".join(map(str, ports)),
                "DARKMATTER_DISCOVERY_INTERVAL": str(INTERVAL), "DARKMATTER_DISCOVERY_PRUNE_SECONDS": str(PRUNE),
                "DARKMATTER_DISPLAY_NAME": name}
    settings.update(env)
    return make_node(tmp_path / name, port=port, plugins="http_transport,discovery_local", **settings)


async def wait_for(predicate, timeout: float) -> float:
    """Wait until predicate() is true; return how long it took (fails after `timeout`)."""
    started = anyio.current_time()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)
    return anyio.current_time() - started


@pytest.mark.anyio
async def test_three_nodes_discover_each_other_and_a_stopped_one_is_pruned(tmp_path):
    ports = free_ports(3)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [scanning_node(tmp_path, f"n{i}", port, ports) for i, port in enumerate(ports)]
        for node in nodes:
            await node.start()
            stack.push_async_callback(node.stop)
        assert [n.port for n in nodes] == ports
        # The first node's start-up scan ran before the others existed: one interval later it knows them.
        everyone = lambda: all(set(n.discovered) == {m.agent_id for m in nodes if m is not n} for n in nodes)
        took = await wait_for(everyone, INTERVAL + 4.0)
        assert took <= INTERVAL + 4.0
        for node in nodes:
            for other in nodes:
                if other is node:
                    continue
                entry = node.discovered[other.agent_id]
                assert entry["url"] == f"http://127.0.0.1:{other.port}" and entry["source"] == "local"
                assert entry["display_name"] == other.state["display_name"]
                assert entry["public_key_hex"] == other.public_key_hex and entry["protocol_version"] == "0.3"
                assert entry["accepting"] is True and entry["status"] == "active"
            assert node.connections == {}, "discovery never connects by itself"

        gone = nodes.pop()
        await gone.stop()
        stopped_at = anyio.current_time()
        # Still listed right after it stopped: entries go by age, not at the first failed probe.
        await anyio.sleep(INTERVAL + 0.2)
        assert all(gone.agent_id in n.discovered for n in nodes)
        await wait_for(lambda: all(gone.agent_id not in n.discovered for n in nodes), PRUNE + INTERVAL + 4.0)
        assert anyio.current_time() - stopped_at >= PRUNE - INTERVAL - 0.5
        assert all(set(n.discovered) == {m.agent_id for m in nodes if m is not n} for n in nodes)


@pytest.mark.anyio
async def test_discover_local_tool_scans_now(tmp_path):
    """With a one-hour interval, only the tool's immediate scan can find the nodes started after this one."""
    ports = free_ports(3)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [scanning_node(tmp_path, f"t{i}", port, ports, DARKMATTER_DISCOVERY_INTERVAL="3600")
                 for i, port in enumerate(ports)]
        for node in nodes:
            await node.start()
            stack.push_async_callback(node.stop)
        first = nodes[0]
        assert first.discovered == {}
        result = await first.tools["darkmatter_discover_local"].handler(first, {}, Session())
        assert result["discovery_enabled"] is True and result["total"] == 2
        assert {p["agent_id"] for p in result["peers"]} == {nodes[1].agent_id, nodes[2].agent_id}
        assert {p["url"] for p in result["peers"]} == {f"http://127.0.0.1:{p}" for p in ports[1:]}
        assert all(p["source"] == "local" and p["connected"] is False for p in result["peers"])


@pytest.mark.anyio
async def test_discover_local_over_mcp(tmp_path):
    """The tool as an MCP client sees it, through the kernel's /mcp endpoint."""
    ports = free_ports(2)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [scanning_node(tmp_path, f"m{i}", port, ports) for i, port in enumerate(ports)]
        for node in nodes:
            await node.start()
            stack.push_async_callback(node.stop)
        assert nodes[0].mcp is not None, "the kernel did not build its /mcp endpoint"
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        url = f"http://127.0.0.1:{nodes[0].port}/mcp"
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert "darkmatter_discover_local" in tools
            result = await session.call_tool("darkmatter_discover_local", {})
            assert not result.is_error, result
            data = result.structured_content or json.loads(result.content[0].text)
            assert data["total"] == 1 and data["peers"][0]["agent_id"] == nodes[1].agent_id


@pytest.mark.anyio
async def test_well_known_of_a_real_node_is_what_the_scan_reads(tmp_path):
    ports = free_ports(1)
    async with scanning_node(tmp_path, "w", ports[0], ports) as node:
        async with httpx.AsyncClient(trust_env=False) as http:
            doc = (await http.get(f"http://127.0.0.1:{node.port}/.well-known/darkmatter.json")).json()
        assert doc["darkmatter"] is True and doc["agent_id"] == node.agent_id
        from darkmatter_discovery_local import entry_from_document

        assert entry_from_document(doc, node.port, node.agent_id) is None  # its own document
        entry = entry_from_document(doc, node.port, "someone-else")
        assert entry["agent_id"] == node.agent_id and entry["url"] == f"http://127.0.0.1:{node.port}"
