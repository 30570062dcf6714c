"""The MCP control plane over streamable HTTP (docs/protocol.md §12), driven by the official Python SDK client.

Real nodes on loopback in this process; the SDK client talks to their ``/mcp`` over real sockets in both
protocol eras (2025 handshake, 2026 per-request envelope).
"""

from __future__ import annotations

import json

import contextlib

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from darkmatter.mesh import outbound as actions
from darkmatter.testing import client, mesh, node_context

pytestmark = pytest.mark.anyio

ERAS = [("legacy", "2025-11-25"), ("auto", "2026-07-28")]
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def mcp_client(node, *, mode: str = "legacy", headers: dict | None = None, **kwargs) -> Client:
    """The SDK client on the node's /mcp (proxy variables ignored: loopback only)."""
    http = httpx2.AsyncClient(trust_env=False, headers=headers or {},
                              timeout=httpx2.Timeout(30.0, read=120.0))
    return Client(streamable_http_client(f"http://127.0.0.1:{node.port}/mcp", http_client=http),
                  mode=mode, **kwargs)


def status_description(tools: types.ListToolsResult) -> str:
    return next(t.description for t in tools.tools if t.name == "darkmatter_status") or ""


@pytest.mark.parametrize("mode,version", ERAS)
async def test_tools_list_returns_every_tool_with_schema_and_annotations(tmp_path, mode, version):
    async with node_context(tmp_path) as node, mcp_client(node, mode=mode) as c:
        assert c.protocol_version == version
        assert c.server_capabilities.tools is not None and c.server_capabilities.tools.list_changed is True
        listed = {t.name: t for t in (await c.list_tools()).tools}
        assert set(listed) == set(node.tools)
        for name, tool in listed.items():
            assert name.startswith("darkmatter_")
            assert tool.description and tool.input_schema["type"] == "object"
            for prop, schema in tool.input_schema.get("properties", {}).items():
                assert schema.get("description"), f"{name}.{prop} has no description"
            hints = tool.annotations
            assert hints is not None
            assert {hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint} <= {True, False}
        assert listed["darkmatter_get_identity"].annotations.read_only_hint is True
        assert listed["darkmatter_status"].annotations.read_only_hint is True
        assert listed["darkmatter_update_bio"].annotations.read_only_hint is False
        assert listed["darkmatter_update_bio"].input_schema["properties"]["bio"]["maxLength"] == 1000
        description = status_description(await c.list_tools())
        assert "LIVE STATUS" in description and "ACTION:" in description
        assert node.mcp.protocol_versions[version] > 0


@pytest.mark.parametrize("mode,version", ERAS)
async def test_domain_errors_come_back_as_tool_errors(tmp_path, mode, version):
    async with node_context(tmp_path) as node, mcp_client(node, mode=mode) as c:
        unknown = await c.call_tool("darkmatter_no_such_tool", {})
        assert unknown.is_error and "Unknown tool" in unknown.content[0].text

        bad = await c.call_tool("darkmatter_set_status", {"status": "asleep"})
        assert bad.is_error and "status must be one of active, inactive" in bad.content[0].text

        huge = await c.call_tool("darkmatter_update_bio", {"bio": "x" * 5000})
        assert huge.is_error and "longer than 1000" in huge.content[0].text and "xxxx" not in huge.content[0].text

        extra = await c.call_tool("darkmatter_get_identity", {"surprise": 1})
        assert extra.is_error and "surprise" in extra.content[0].text

        wrong_key = await c.call_tool("darkmatter_authenticate", {"private_key_hex": "ab" * 32})
        assert wrong_key.is_error and "does not belong to this node" in wrong_key.content[0].text

        missing = await c.call_tool("darkmatter_get_message", {"message_id": "msg-nope"})
        assert missing.is_error and missing.content[0].text

        ok = await c.call_tool("darkmatter_update_bio", {"bio": "I review Python code."})
        assert not ok.is_error
        assert ok.structured_content == {"success": True, "updated": True, "bio": "I review Python code.",
                                         "display_name": None}
        assert node.state["bio"] == "I review Python code."


async def test_authenticate_never_returns_the_private_key(tmp_path):
    """§12.3: no session gets the key in a result, local or with the token; it gets the backup file's path."""
    async with node_context(tmp_path) as node:
        async with mcp_client(node) as local:
            result = await local.call_tool("darkmatter_authenticate", {})
            assert not result.is_error and "private_key_hex" not in result.structured_content
            assert node.state["private_key_hex"] not in json.dumps(result.model_dump())
            assert result.structured_content["backup_created"] is True
        remote = {"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {node.token}"}
        async with mcp_client(node, headers=remote) as c:
            again = await c.call_tool("darkmatter_authenticate", {})
            assert not again.is_error and again.structured_content["backup_created"] is False
            assert "private_key_hex" not in again.structured_content
            verified = await c.call_tool("darkmatter_authenticate",
                                         {"private_key_hex": node.state["private_key_hex"]})
            assert not verified.is_error and "private_key_hex" not in verified.structured_content
            assert verified.structured_content["authenticated"] is True


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_list_changed_reaches_clients_after_a_mesh_message(tmp_path, mode):
    """The notification arrives after a mesh message (a generous bound for "arrives"; its latency is a bench
    figure: ``python -m bench --only responsive``)."""
    async with mesh(tmp_path, 2) as (a, b):
        received = anyio.Event()

        async def on_message(message) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                received.set()

        async with mcp_client(b, mode=mode, message_handler=on_message) as c:
            before = status_description(await c.list_tools())
            assert "1 inbox message" not in before
            if mode == "legacy":
                with anyio.fail_after(5):  # the SDK opens the standalone stream after initialization
                    while not b.mcp.sessions()["http_streams"]:
                        await anyio.sleep(0.02)
                await actions.send_message(a, "Can you review my PR?", target_agent_id=b.agent_id)
                with anyio.fail_after(30):
                    await received.wait()
            else:
                async with c.listen(tools_list_changed=True) as sub:
                    await actions.send_message(a, "Can you review my PR?", target_agent_id=b.agent_id)
                    with anyio.fail_after(30):
                        event = await sub.__anext__()
                    assert type(event).__name__ == "ToolsListChanged"
            after = status_description(await c.list_tools())
            assert "1 inbox message" in after and "ACTION:" in after and after != before


async def test_list_changed_reaches_every_session(tmp_path):
    async with node_context(tmp_path) as node:
        counts = [0, 0]

        def counter(i):
            async def on_message(message) -> None:
                if isinstance(message, types.ToolListChangedNotification):
                    counts[i] += 1
            return on_message

        async with mcp_client(node, message_handler=counter(0)) as one, \
                mcp_client(node, message_handler=counter(1)) as two:
            with anyio.fail_after(5):
                while node.mcp.sessions()["http_streams"] < 2:
                    await anyio.sleep(0.02)
            await one.call_tool("darkmatter_update_bio", {"bio": "Changed by session one."})
            with anyio.fail_after(30):
                while counts[1] < 1 or counts[0] < 1:
                    await anyio.sleep(0.02)
            assert node.mcp.notifications_sent >= 1


async def _raw_initialize(node, **headers) -> httpx.Response:
    async with client(node) as http:
        return await http.post("/mcp", json=INIT, headers={**MCP_HEADERS, **headers})


async def test_foreign_host_is_421_and_foreign_origin_is_403(tmp_path):
    async with node_context(tmp_path, DARKMATTER_PUBLIC_URL="https://agent.example.org") as node:
        port = node.port
        assert (await _raw_initialize(node)).status_code == 200
        for host in (f"localhost:{port}", f"[::1]:{port}", "agent.example.org", "agent.example.org:443"):
            assert (await _raw_initialize(node, Host=host)).status_code == 200, host
        for host in ("evil.example.com", f"evil.example.com:{port}", f"127.0.0.1:{port + 1}", "attacker:80"):
            reply = await _raw_initialize(node, Host=host)
            assert reply.status_code == 421, host
            assert reply.json() == {"error": "Misdirected request: unexpected Host header", "code": "misdirected"}
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", "https://agent.example.org"):
            assert (await _raw_initialize(node, Origin=origin)).status_code == 200, origin
        for origin in ("http://evil.example.com", f"http://evil.example.com:{port}", "null",
                       f"ftp://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
            reply = await _raw_initialize(node, Origin=origin)
            assert reply.status_code == 403, origin
            assert reply.json()["code"] == "forbidden"


async def test_non_loopback_clients_need_the_bearer_token(tmp_path):
    async with node_context(tmp_path) as node:
        token_file = tmp_path / "state.token"
        assert token_file.read_text().strip() == node.token and token_file.stat().st_mode & 0o777 == 0o600
        for proxy_header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
            reply = await _raw_initialize(node, **{proxy_header: "203.0.113.7"})
            assert reply.status_code == 401, proxy_header
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["code"] == "unauthorized"
        wrong = await _raw_initialize(node, **{"X-Forwarded-For": "203.0.113.7",
                                               "Authorization": "Bearer " + "0" * 64})
        assert wrong.status_code == 401
        right = await _raw_initialize(node, **{"X-Forwarded-For": "203.0.113.7",
                                               "Authorization": f"Bearer {node.token}"})
        assert right.status_code == 200


async def test_mcp_path_is_exact(tmp_path):
    async with node_context(tmp_path) as node, client(node) as http:
        for method in ("GET", "POST"):
            reply = await http.request(method, "/mcp/", headers=MCP_HEADERS, json=INIT)
            assert reply.status_code == 404 and reply.json()["code"] == "not_found"
            assert "location" not in reply.headers
        assert (await http.post("/mcp/x", headers=MCP_HEADERS, json=INIT)).status_code == 404


async def test_scripted_session_connects_sends_forwards_responds_and_reads_the_trail(tmp_path):
    """A -> B -> C through the MCP tools of three nodes, each driven by its own SDK client."""
    async with mesh(tmp_path, 3, connect_as="none") as (a, b, c):
        async with contextlib.AsyncExitStack() as stack:
            ca, cb, cc = [await stack.enter_async_context(mcp_client(n)) for n in (a, b, c)]

            async def call(session, name, **args) -> dict:
                result = await session.call_tool(name, args)
                assert not result.is_error, result.content[0].text
                return result.structured_content

            assert (await call(ca, "darkmatter_request_connection", target_url=b.base_url))["status"] == "connected"
            assert (await call(cb, "darkmatter_request_connection", target_url=c.base_url))["status"] == "connected"
            sent = await call(ca, "darkmatter_send_message", content="Who knows Rust lifetimes?",
                              target_agent_id=b.agent_id)
            message_id = sent["message_id"]
            with anyio.fail_after(10):
                while not b.state["inbox"]:
                    await anyio.sleep(0.05)
            inbox = await call(cb, "darkmatter_list_inbox")
            assert message_id in str(inbox)
            await call(cb, "darkmatter_forward_message", message_id=message_id, target_agent_id=c.agent_id,
                       note="C wrote a book on it")
            with anyio.fail_after(10):
                while not c.state["inbox"]:
                    await anyio.sleep(0.05)
            await call(cc, "darkmatter_respond_message", message_id=message_id, response="Ask me anything.")
            with anyio.fail_after(10):
                while True:
                    trail = await call(ca, "darkmatter_get_sent_message", message_id=message_id)
                    if "Ask me anything." in str(trail):
                        break
                    await anyio.sleep(0.1)
            assert "forward" in str(trail) and c.agent_id in str(trail)
