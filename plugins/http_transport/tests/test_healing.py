"""Delivery through restarts and moves (docs/protocol.md §5.2, §6): outbox retries, peer_update, peer_lookup."""

import asyncio
import contextlib

import pytest

from darkmatter import api as actions
from darkmatter.testing import RawPeer, connect, make_node

pytestmark = pytest.mark.anyio


async def wait_for(predicate, timeout: float):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


@pytest.mark.slow
async def test_message_to_a_peer_down_for_30_seconds_is_delivered_from_the_outbox(tmp_path):
    a = make_node(tmp_path / "a")
    b = make_node(tmp_path / "b")
    async with a:
        await b.start()
        b_port = b.port
        await connect(a, b)
        await b.stop()
        result = await actions.send_message(a, "are you back?", b.agent_id)
        mid = result["message_id"]
        delivery = result["deliveries"][b.agent_id]
        assert result["success"] and delivery["state"] == "queued" and delivery["last_error"]
        assert any(e["message_id"] == mid for e in a.state["outbox"])
        await asyncio.sleep(30)
        b2 = make_node(tmp_path / "b", port=b_port)
        async with b2:
            record = a.state["sent_messages"][mid]
            assert await wait_for(lambda: record["deliveries"][b.agent_id]["state"] == "delivered", 75)
            assert [m["content"] for m in b2.state["inbox"]] == ["are you back?"]
            assert record["deliveries"][b.agent_id]["attempts"] >= 2
            assert not a.state["outbox"]


async def test_outbox_survives_the_sender_restarting(tmp_path):
    a = make_node(tmp_path / "a")
    b = make_node(tmp_path / "b")
    await a.start()
    a_port = a.port
    try:
        await b.start()
        b_port = b.port
        await connect(a, b)
        await b.stop()
        mid = (await actions.send_message(a, "persisted", b.agent_id))["message_id"]
    finally:
        await a.stop()
    # both come back; A resumes the pending delivery from its state file
    async with make_node(tmp_path / "b", port=b_port) as b2, make_node(tmp_path / "a", port=a_port) as a2:
        record = a2.state["sent_messages"][mid]
        assert await wait_for(lambda: record["deliveries"][b2.agent_id]["state"] == "delivered", 20)
        assert [m["content"] for m in b2.state["inbox"]] == ["persisted"]


async def test_peer_restarting_on_a_new_port_tells_its_connections(tmp_path):
    a = make_node(tmp_path / "a")
    b = make_node(tmp_path / "b")
    async with a:
        await b.start()
        await connect(b, a)
        old_url = a.connections[b.agent_id]["agent_url"]
        await b.stop()
        async with make_node(tmp_path / "b") as b2:  # same state file, new free port
            assert b2.agent_id == b.agent_id and b2.port != b.port
            assert await wait_for(lambda: a.connections[b.agent_id]["agent_url"] != old_url, 10)
            assert a.connections[b.agent_id]["agent_url"] == b2.base_url
            result = await actions.send_message(a, "found you", b.agent_id)
            assert result["deliveries"][b.agent_id]["state"] == "delivered"


async def test_peer_lookup_heals_a_stale_url_after_a_connect_failure(tmp_path):
    a = make_node(tmp_path / "a")
    b = make_node(tmp_path / "b")
    c = make_node(tmp_path / "c")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(c)
        await a.start()
        a_port = a.port
        await b.start()
        await connect(a, b)
        await connect(a, c)
        await connect(b, c)
        await a.stop()  # A misses B's peer_update
        await b.stop()
        b2 = await stack.enter_async_context(make_node(tmp_path / "b"))
        assert await wait_for(lambda: c.connections[b2.agent_id]["agent_url"] == b2.base_url, 10)
        a2 = await stack.enter_async_context(make_node(tmp_path / "a", port=a_port))
        stale = a2.connections[b2.agent_id]["agent_url"]
        assert stale != b2.base_url
        result = await actions.send_message(a2, "via lookup", b2.agent_id)
        mid = result["message_id"]
        record = a2.state["sent_messages"][mid]
        assert await wait_for(lambda: record["deliveries"][b2.agent_id]["state"] == "delivered", 20)
        assert a2.connections[b2.agent_id]["agent_url"] == b2.base_url
        assert b2.state["inbox"][-1]["content"] == "via lookup"


async def test_peer_update_pointing_at_an_impostor_is_refused(tmp_path):
    from darkmatter.api import peer_update_string
    from darkmatter.api import now_iso

    async with make_node(tmp_path / "a") as a, make_node(tmp_path / "evil") as evil_node:
        peer = RawPeer()
        await peer.connect(a)
        url_before = a.connections[peer.agent_id]["agent_url"]
        ts = now_iso()
        body = {"agent_id": peer.agent_id, "new_url": evil_node.base_url, "public_key_hex": peer.identity.public_key_hex,
                "timestamp": ts, "signature": peer.identity.sign(peer_update_string(peer.agent_id, evil_node.base_url, ts))}
        response = await peer.post(a, "/__darkmatter__/peer_update", body)
        assert response.status_code == 403 and response.json()["code"] == "key_mismatch"
        unsigned = {"agent_id": peer.agent_id, "new_url": evil_node.base_url}
        response = await peer.post(a, "/__darkmatter__/peer_update", unsigned)
        assert response.status_code == 403 and response.json()["code"] == "signature_required"
        assert a.connections[peer.agent_id]["agent_url"] == url_before
