"""Delivery (docs/protocol.md §3.7, §5.2, §5.4, §5.6): retries to a sender that is briefly down, lost
acknowledgements and duplicates, a partition (SIGSTOP) and its healing.

A peer that is down for 30 s and then receives the message from the outbox is covered by
plugins/http_transport/tests/test_healing.py::test_message_to_a_peer_down_for_30_seconds_is_delivered_from_the_outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time

import httpx
import httpx2
import pytest
from dm_acceptance import NodeProcess, figure, wait_for
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from darkmatter.mesh import outbound as actions
from darkmatter.builtin.json_storage import JsonFileStorage
from darkmatter.identity import v1_string, v2_string, v2_webhook_update
from darkmatter.testing import RawPeer, connect, make_node, mesh, node_context
from darkmatter.wire import now_iso

pytestmark = pytest.mark.anyio


class LossyProxy:
    """A loopback HTTP proxy in front of a node that forwards every request but, for the first `drop`
    requests to `path`, throws the node's answer away and hangs up: the classic lost acknowledgement."""

    def __init__(self, target_port: int, path: str, drop: int = 1):
        self.target_port = target_port
        self.path = path
        self.drop = drop
        self.forwarded: list[str] = []
        self.dropped = 0
        self.port = 0
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            path = head.split(b" ", 2)[1].decode()
            # one request per connection: ask the node to close, so its whole answer can be read
            head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            up_writer.write(head + body)
            await up_writer.drain()
            answer = await asyncio.wait_for(up_reader.read(-1), 30)
            up_writer.close()
            self.forwarded.append(path)
            if path == self.path and self.dropped < self.drop:
                self.dropped += 1
                return  # hang up without the answer
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_lost_acknowledgement_is_retried_and_the_duplicate_is_idempotent(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        async with LossyProxy(b.port, "/__darkmatter__/message") as proxy:
            result = await actions.request_connection(a, proxy.url)
            assert result["status"] == "connected"
            sent = await actions.send_message(a, "exactly once, please", b.agent_id)
            record = a.state["sent_messages"][sent["message_id"]]
            assert await wait_for(lambda: record["deliveries"][b.agent_id]["state"] == "delivered", 15)
            assert proxy.dropped == 1 and proxy.forwarded.count("/__darkmatter__/message") == 2
            assert record["deliveries"][b.agent_id]["attempts"] == 2
            assert [m["content"] for m in b.state["inbox"]] == ["exactly once, please"]
            assert b.connections[a.agent_id]["messages_received"] == 1 and b.state["messages_handled"] == 1


async def test_repeated_webhook_updates_and_handshakes_are_idempotent(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        responder = RawPeer()
        await responder.connect(a)
        mid = (await actions.send_message(a, "q"))["message_id"]  # the responder is on the route (§5.6)
        path = f"/__darkmatter__/webhook/{mid}"

        def response(text: str) -> dict:
            ts = now_iso()
            return {"type": "response", "agent_id": responder.agent_id, "response": text, "metadata": {},
                    "timestamp": ts, "from_public_key_hex": responder.identity.public_key_hex,
                    "signature_hex": responder.identity.sign(v1_string(responder.agent_id, mid, ts, text)),
                    "signature_v2_hex": responder.identity.sign(v2_webhook_update(
                        mid, "response", responder.agent_id, None, ts, text, {}))}
        first = response("the answer")
        replies = [await responder.post(a, path, first), await responder.post(a, path, first),
                   await responder.post(a, path, response("the answer"))]  # a re-signed retry
        assert replies[0].json() == {"success": True, "recorded": "response", "verified": True,
                                     "status": "responded"}
        for again in replies[1:]:
            assert again.status_code == 200 and again.json()["duplicate"] is True
        assert len(a.state["sent_messages"][mid]["responses"]) == 1
        # handshakes repeated: still one connection each way, and the connection records do not change
        before = json.dumps({k: v["agent_public_key_hex"] for k, v in a.connections.items()}, sort_keys=True)
        for _ in range(2):
            again = await actions.request_connection(a, b.base_url)
            assert again["status"] == "connected" and again["message"] == "Already connected."
        assert len(a.connections) == 2 and len(b.connections) == 1
        assert json.dumps({k: v["agent_public_key_hex"] for k, v in a.connections.items()}, sort_keys=True) == before
        # a connection_accepted retried after the connection exists is a quiet success (§4.4)
        ts = now_iso()
        retry = {"agent_id": responder.agent_id, "agent_url": responder.url, "protocol_version": "0.3",
                 "agent_public_key_hex": responder.identity.public_key_hex, "timestamp": ts,
                 "signature_v2_hex": responder.identity.sign(v2_string(
                     "connection_accepted", responder.agent_id, responder.url, responder.identity.public_key_hex,
                     a.agent_id, ts))}
        snapshot = json.dumps(a.state, sort_keys=True, default=str)
        reply = await responder.post(a, "/__darkmatter__/connection_accepted", retry)
        assert reply.status_code == 200 and reply.json() == {"success": True}
        assert json.dumps(a.state, sort_keys=True, default=str) == snapshot


async def test_a_response_to_a_sender_that_is_briefly_down_is_retried(tmp_path):
    a = make_node(tmp_path / "a")
    async with node_context(tmp_path / "b") as b:
        await a.start()
        a_port = a.port
        try:
            await connect(a, b)
            mid = (await actions.send_message(a, "answer me later", b.agent_id))["message_id"]
        finally:
            await a.stop()
        # A is down: B answers; the first attempt fails to connect and the response waits in B's outbox
        answering = asyncio.create_task(actions.respond_message(b, mid, "here you go"))
        assert await wait_for(lambda: any(e["kind"] == "response" and e["attempts"] >= 1
                                          for e in b.state["outbox"]), 10)
        await asyncio.sleep(1.0)
        started = time.monotonic()
        async with make_node(tmp_path / "a", port=a_port) as a2:
            result = await answering
            record = a2.state["sent_messages"][mid]
            assert await wait_for(lambda: record["status"] == "responded", 20)
            assert record["response"]["response"] == "here you go" and record["response"]["verified"] is True
            assert not b.state["outbox"]
            assert result["delivery"] in ("delivered", "queued")
            figure("response retried after the sender came back", f"{time.monotonic() - started:.1f} s")


@pytest.mark.slow
async def test_a_forward_returns_on_delivery_and_an_answer_that_beats_the_forwarded_update_is_retried(tmp_path):
    """§5.3 and §5.6: forward_message returns once the target has the message, without waiting for its
    ``forwarded`` update to reach the owner. When the target answers before that update arrives, the owner
    refuses the answer ``not_on_route``; the target retries (the first retry shortly) and the answer lands."""
    from urllib.parse import urlsplit

    from darkmatter.testing.harness import Harness

    async with Harness(tmp_path, "memory") as dm:
        a, b, c = await dm.mesh(3)
        name = {n: urlsplit(n.base_url).hostname for n in (a, b, c)}
        mid = (await actions.send_message(a, "who knows?", b.agent_id))["message_id"]
        record = a.state["sent_messages"][mid]
        held = dm.network.delay(0.5, name[b], name[a], op="webhook_post")  # B's updates to A take 0.5 s
        forwarded = await actions.forward_message(b, mid, c.agent_id)
        assert forwarded["delivery"] == "delivered"
        assert record["updates"] == []  # the call did not wait for the update
        answered = await actions.respond_message(c, mid, "C knows")
        assert answered["delivery"] == "delivered", answered
        dm.network.delays.remove(held)
    assert [(u["type"], u["agent_id"], u["target_agent_id"]) for u in record["updates"]] == [
        ("forwarded", b.agent_id, c.agent_id)]
    assert [(r["agent_id"], r["response"], r["verified"]) for r in record["responses"]] == [
        (c.agent_id, "C knows", True)]
    assert record["status"] == "responded"


async def test_a_partition_sigstop_then_heals_without_loss_or_duplicates(tmp_path):
    proc = NodeProcess(tmp_path / "b")
    try:
        status = await proc.start()
        b_id = status["agent_id"]
        async with node_context(tmp_path / "a") as a, httpx.AsyncClient(trust_env=False, timeout=10) as http:
            assert (await actions.request_connection(a, proc.url))["status"] == "connected"
            proc.signal(signal.SIGSTOP)
            started = time.monotonic()
            sending = asyncio.create_task(actions.send_message(a, "across the partition", b_id))
            # A stays responsive while its delivery hangs on the stopped peer (15 s attempt timeout): each
            # read is answered while the send is still waiting (the client's 10 s timeout only bounds a node
            # that would not answer at all)
            for _ in range(5):
                assert (await http.get(f"http://127.0.0.1:{a.port}/__darkmatter__/status")).status_code == 200
                assert not sending.done(), "the delivery to the stopped peer ended before A answered /status"
                await asyncio.sleep(0.5)
            sent = await sending
            delivery = sent["deliveries"][b_id]
            assert delivery["state"] == "queued" and delivery["last_error"], delivery
            proc.signal(signal.SIGCONT)
            record = a.state["sent_messages"][sent["message_id"]]
            assert await wait_for(lambda: record["deliveries"][b_id]["state"] == "delivered", 40)
            healed = time.monotonic() - started
            # and the other way round, through B's own MCP tools
            client = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(60.0))
            async with Client(streamable_http_client(proc.url + "/mcp", http_client=client)) as c:
                back = await c.call_tool("darkmatter_send_message", {"content": "healed", "target_agent_id":
                                                                     a.agent_id})
                assert not back.is_error, back.content[0].text
            assert await wait_for(lambda: [m["content"] for m in a.state["inbox"]] == ["healed"], 10)
        await proc.stop()
        inbox = [m["content"] for m in JsonFileStorage(proc.state_file).load()["inbox"]]
        assert inbox == ["across the partition"], inbox
        figure("partition healed", f"delivered {healed:.1f} s after the send (15 s attempt timeout, then retry)")
    finally:
        with contextlib.suppress(Exception):
            proc.signal(signal.SIGCONT)
        await proc.stop()
