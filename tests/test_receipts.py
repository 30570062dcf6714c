"""Delivery receipts (docs/protocol.md §5.8): the sender sees how far each recipient got.

Real nodes on loopback; the agents' sessions are the official SDK client on ``/mcp``. A 0.2 originator is a
raw peer speaking the 0.2 wire (unsigned handshake, v1-only signatures) with a real HTTP server for its
webhook, which records every request it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from darkmatter.mesh import outbound as actions
from darkmatter.identity import v2_webhook_update
from darkmatter.testing import ChannelListener, RawPeer, client, mesh, node_context
from darkmatter.testing.harness import wait_for
from darkmatter.wire import now_iso

pytestmark = pytest.mark.anyio


def mcp_client(node, listener: ChannelListener | None = None) -> Client:
    """A handshake-era session (its GET stream carries the channel pushes)."""
    http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=120.0))
    return Client(streamable_http_client(f"http://127.0.0.1:{node.port}/mcp", http_client=http), mode="legacy",
                  extensions=[listener.extension()] if listener else None)


async def call(session: Client, name: str, **args) -> dict:
    result = await session.call_tool(name, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def state_seen_by_sender(session: Client, message_id: str, recipient: str, state: str) -> dict:
    """Poll the sender's darkmatter_get_sent_message until ``recipient`` shows ``state``."""
    with anyio.fail_after(10):
        while True:
            view = await call(session, "darkmatter_get_sent_message", message_id=message_id)
            if view["recipients"].get(recipient) == state:
                return view
            await anyio.sleep(0.05)


async def unread_line(session: Client) -> str:
    tools = (await session.list_tools()).tools
    description = next(t.description for t in tools if t.name == "darkmatter_status")
    return next((line for line in description.splitlines() if "not yet read" in line), "")


async def test_sender_sees_delivered_then_surfaced_read_and_responded(tmp_path):
    async with mesh(tmp_path, 2) as (a, b), mcp_client(a) as sender:
        first = (await call(sender, "darkmatter_send_message", content="Shall we pair on the parser?",
                            target_agent_id=b.agent_id))["message_id"]
        # B's agent has no session: the message is delivered and stays so.
        view = await state_seen_by_sender(sender, first, b.agent_id, "delivered")
        assert view["receipts"] == [] and view["deliveries"][b.agent_id]["state"] == "delivered"
        assert "1 message(s) you sent not yet read" in await unread_line(sender)

        listener = ChannelListener()
        async with mcp_client(b, listener) as recipient:
            await wait_for(lambda: b.mcp.sessions()["http_streams"])
            # A second message is pushed to B's session as it arrives: surfaced without any tool call.
            second = (await call(sender, "darkmatter_send_message", content="Also: lunch?",
                                 target_agent_id=b.agent_id))["message_id"]
            assert (await listener.next())["meta"]["message_id"] == second
            await state_seen_by_sender(sender, second, b.agent_id, "surfaced")
            assert "2 message(s) you sent not yet read" in await unread_line(sender)

            # The first one: listed with its content, opened, answered.
            await call(recipient, "darkmatter_list_inbox")
            await state_seen_by_sender(sender, first, b.agent_id, "surfaced")
            await call(recipient, "darkmatter_get_message", message_id=first)
            view = await state_seen_by_sender(sender, first, b.agent_id, "read")
            assert sorted(r["state"] for r in view["receipts"]) == ["read", "surfaced"]
            assert all(r["agent_id"] == b.agent_id and r["verified"] for r in view["receipts"])
            assert "1 message(s) you sent not yet read" in await unread_line(sender)
            await call(recipient, "darkmatter_respond_message", message_id=first, response="Yes, at three.")
            await state_seen_by_sender(sender, first, b.agent_id, "responded")

        listed = {m["message_id"]: m["recipients"] for m in
                  (await call(sender, "darkmatter_list_messages"))["messages"]}
        assert listed == {first: {b.agent_id: "responded"}, second: {b.agent_id: "surfaced"}}
        # Receipts are recorded once per (recipient, state), however often B surfaces the message again.
        async with mcp_client(b) as again:
            await call(again, "darkmatter_list_inbox")
            await call(again, "darkmatter_wait_for_message", timeout_seconds=0)
        await wait_for(lambda: not b.outbox.entries)
        assert [r["state"] for r in a.state["sent_messages"][second]["receipts"]] == ["surfaced"]


class WebhookServer:
    """A 0.2 node's webhook endpoint: a real HTTP server that records each request and answers 200."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.url = ""
        self._server = None

    async def __aenter__(self) -> WebhookServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            raw = await reader.readexactly(length) if length else b""
            method, path = head.decode("latin-1").split(" ", 2)[:2]
            self.requests.append((method, path, json.loads(raw) if raw else None))
            body = b'{"success": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        writer.close()


async def test_a_02_originator_gets_no_receipt_updates(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b, \
            WebhookServer() as webhook, mcp_client(a) as sender:
        await actions.request_connection(a, b.base_url)
        old = RawPeer(webhook.url, agent_id=str(uuid.uuid4()))  # 0.2: UUID id, unsigned handshake, v1 only
        assert (await old.connect(b, sign=False))["auto_accepted"] is True
        listener = ChannelListener()
        async with mcp_client(b, listener) as recipient:
            await wait_for(lambda: b.mcp.sessions()["http_streams"])
            body = old.message(b, "A question from a 0.2 node", v2=False)
            reply = await old.post(b, "/__darkmatter__/message", body)
            assert reply.status_code == 200
            modern = (await call(sender, "darkmatter_send_message", content="A question from a 0.3 node",
                                 target_agent_id=b.agent_id))["message_id"]
            pushed = {(await listener.next())["meta"]["message_id"] for _ in range(2)}
            assert pushed == {body["message_id"], modern}  # both surfaced through the channel
            for message_id in pushed:
                await call(recipient, "darkmatter_get_message", message_id=message_id)
            # The 0.3 originator hears about it; the 0.2 one must not (it would answer 400).
            await state_seen_by_sender(sender, modern, b.agent_id, "read")
            await call(recipient, "darkmatter_respond_message", message_id=body["message_id"], response="Here.")
            await wait_for(lambda: webhook.requests and not b.outbox.entries)
        assert [(method, path, sent["type"]) for method, path, sent in webhook.requests] == [
            ("POST", f"/__darkmatter__/webhook/{body['message_id']}", "response")]


async def test_receipts_false_sends_none(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b", DARKMATTER_RECEIPTS="false") as b, \
            mcp_client(a) as sender:
        await actions.request_connection(a, b.base_url)
        listener = ChannelListener()
        async with mcp_client(b, listener) as recipient:
            await wait_for(lambda: b.mcp.sessions()["http_streams"])
            mid = (await call(sender, "darkmatter_send_message", content="Quiet, please.",
                              target_agent_id=b.agent_id))["message_id"]
            await listener.next()
            opened = await call(recipient, "darkmatter_get_message", message_id=mid)
            assert opened["unread"] is False  # B still keeps its own read state
            await call(recipient, "darkmatter_respond_message", message_id=mid, response="Sure.")
        view = await state_seen_by_sender(sender, mid, b.agent_id, "responded")
        await wait_for(lambda: not b.outbox.entries)
        assert "receipts" not in a.state["sent_messages"][mid] and view["receipts"] == []


def receipt(signer: RawPeer, message_id: str, state: str, *, agent_id: str | None = None, sign: bool = True) -> dict:
    agent_id = agent_id or signer.agent_id
    body = {"type": "receipt", "agent_id": agent_id, "state": state}
    if sign:
        ts = now_iso()
        body.update(timestamp=ts, from_public_key_hex=signer.identity.public_key_hex,
                    signature_v2_hex=signer.identity.sign(v2_webhook_update(message_id, "receipt", agent_id, None,
                                                                            ts, state, {})))
    return body


async def test_receipt_updates_are_signed_route_bound_and_recorded_once(tmp_path):
    async with node_context(tmp_path) as node:
        recipient, outsider = RawPeer(), RawPeer()  # 0.3 peers (signed handshakes); their URLs answer nothing
        for peer in (recipient, outsider):
            assert (await peer.connect(node))["auto_accepted"] is True
        mid = (await actions.send_message(node, "for the recipient only", recipient.agent_id))["message_id"]
        record = node.state["sent_messages"][mid]
        assert record["deliveries"][recipient.agent_id]["state"] == "queued"  # still being retried
        path = f"/__darkmatter__/webhook/{mid}"

        refused = {
            "unsigned": (receipt(recipient, mid, "read", sign=False), 403, "signature_required"),
            "unknown state": (receipt(recipient, mid, "seen"), 400, None),
            "outsider": (receipt(outsider, mid, "read"), 403, "not_on_route"),
            "outsider claiming the recipient": (receipt(outsider, mid, "read", agent_id=recipient.agent_id), 403,
                                                "key_mismatch"),
        }
        before = json.dumps(node.state, sort_keys=True)
        for name, (body, status, code) in refused.items():
            reply = await recipient.post(node, path, body)
            assert reply.status_code == status, (name, reply.text)
            assert code is None or reply.json()["code"] == code, (name, reply.text)
        assert json.dumps(node.state, sort_keys=True) == before

        first = await recipient.post(node, path, receipt(recipient, mid, "surfaced"))
        assert first.json() == {"success": True, "recorded": "receipt", "verified": True, "status": "active"}
        again = await recipient.post(node, path, receipt(recipient, mid, "surfaced"))  # a re-signed retry
        assert again.status_code == 200 and again.json()["duplicate"] is True
        read = await recipient.post(node, path, receipt(recipient, mid, "read"))
        assert read.status_code == 200 and read.json()["recorded"] == "receipt"
        assert [(r["agent_id"], r["state"]) for r in record["receipts"]] == [
            (recipient.agent_id, "surfaced"), (recipient.agent_id, "read")]
        async with mcp_client(node) as session:
            view = await call(session, "darkmatter_get_sent_message", message_id=mid)
        assert view["recipients"] == {recipient.agent_id: "read"}
        unknown = await recipient.post(node, "/__darkmatter__/webhook/msg-unknown", receipt(recipient, "msg-unknown",
                                                                                          "read"))
        assert unknown.status_code == 404
        async with client(node) as http:  # receipts are not shown to anyone reading the webhook
            trail = (await http.get(path)).json()
        assert "receipts" not in trail and all(u["type"] != "receipt" for u in trail["updates"])


async def test_a_forwarded_message_reports_each_hop(tmp_path):
    async with mesh(tmp_path, 3) as (a, b, c), mcp_client(a) as sender, mcp_client(c) as third:
        mid = (await call(sender, "darkmatter_send_message", content="Who knows Rust lifetimes?",
                          target_agent_id=b.agent_id))["message_id"]
        await wait_for(lambda: b.state["inbox"])
        forwarded = await actions.forward_message(b, mid, c.agent_id, note="C wrote a book on it")
        assert forwarded["delivery"] == "delivered"
        # C reads at once, possibly before B's forwarded update reached A: C asks the webhook until A shows C
        # on the route, then sends its receipt.
        await call(third, "darkmatter_get_message", message_id=mid)
        view = await state_seen_by_sender(sender, mid, c.agent_id, "read")
        assert view["recipients"] == {b.agent_id: "delivered", c.agent_id: "read"}
        assert c.state["inbox"][0]["owner_protocol"] == "0.3"
