"""Impressions (docs/protocol.md §10), peer_update (§6.3), peer_lookup recovery (§6.2) and the outbox
(§5.2): a node whose peer moved or went down still gets its message through."""

import pytest

from darkmatter.identity import peer_update_string
from darkmatter.mesh import outbound
from darkmatter.mesh.healing import broadcast_peer_update
from darkmatter.testing import RawPeer
from darkmatter.tools import Session, ToolError
from darkmatter.wire import now_iso

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]


async def set_impression(node, about: str, text: str) -> None:
    await node.tools["darkmatter_set_impression"].handler(node, {"agent_id": about, "impression": text},
                                                          Session())


async def test_a_connection_shares_its_impression_when_asked(dm):
    a, b = await dm.mesh(2)
    await set_impression(b, "c" * 64, "reliable")
    result = await outbound.ask_impression(a, b.agent_id, "c" * 64)
    assert result == {"agent_id": b.agent_id, "about": "c" * 64, "has_impression": True, "impression": "reliable"}
    none = await outbound.ask_impression(a, b.agent_id, "d" * 64)
    assert none["has_impression"] is False


async def test_an_unsigned_impression_request_is_refused(dm):
    a, b = await dm.mesh(2)
    await set_impression(b, "c" * 64, "secret notes")
    reply = await dm.get(b, "/__darkmatter__/impression/" + "c" * 64)
    assert reply.status == 403 and reply.body["code"] == "signature_required"
    assert "impression" not in reply.body


async def test_an_impression_request_from_a_stranger_is_refused(dm):
    b = await dm.node()
    stranger = await dm.node()
    await set_impression(b, "c" * 64, "secret notes")
    path = "/__darkmatter__/impression/" + "c" * 64
    reply = await dm.get(b, path, headers=stranger.signed_get_headers(path, b.agent_id))
    assert reply.status == 403 and reply.body["code"] == "not_connected"
    with pytest.raises(ToolError):
        await outbound.ask_impression(stranger, b.agent_id, "c" * 64)


async def test_a_moved_node_tells_its_connections_with_a_signed_peer_update(dm, wait_for):
    a, b = await dm.mesh(2)
    old_url = a.connections[b.agent_id]["agent_url"]
    moved = await dm.restart(b, move=True)
    assert moved.base_url != old_url
    results = await broadcast_peer_update(moved)
    assert results == {a.agent_id: "delivered"}
    assert a.connections[b.agent_id]["agent_url"] == moved.base_url
    sent = await outbound.send_message(a, "found you", b.agent_id)
    assert sent["deliveries"][b.agent_id]["state"] == "delivered"
    assert [m["content"] for m in moved.state["inbox"]] == ["found you"]


async def test_a_peer_update_with_a_bad_signature_is_refused(dm):
    a = await dm.node()
    peer = RawPeer(dm.raw_url())
    assert (await dm.post(a, "/__darkmatter__/connection_request", peer.connection_request())).status == 200
    before = a.connections[peer.agent_id]["agent_url"]
    ts = now_iso()
    body = {"agent_id": peer.agent_id, "new_url": dm.raw_url("elsewhere"), "timestamp": ts,
            "public_key_hex": peer.identity.public_key_hex,
            "signature": peer.identity.sign(peer_update_string(peer.agent_id, dm.raw_url("other"), ts))}
    reply = await dm.post(a, "/__darkmatter__/peer_update", body)
    assert reply.status == 403 and reply.body["code"] == "invalid_signature"
    assert a.connections[peer.agent_id]["agent_url"] == before


async def test_a_peer_update_to_a_url_serving_another_identity_is_refused(dm):
    a, b = await dm.mesh(2)
    other = await dm.node()
    ts = now_iso()
    body = {"agent_id": b.agent_id, "new_url": other.base_url, "timestamp": ts,
            "public_key_hex": b.public_key_hex, "signature": b.sign(peer_update_string(b.agent_id, other.base_url, ts))}
    reply = await dm.post(a, "/__darkmatter__/peer_update", body)
    assert reply.status == 403 and reply.body["code"] == "key_mismatch"
    assert a.connections[b.agent_id]["agent_url"] == b.base_url


async def test_a_replayed_peer_update_is_refused(dm):
    a, b = await dm.mesh(2)
    moved = await dm.restart(b, move=True)
    ts = now_iso()
    body = {"agent_id": b.agent_id, "new_url": moved.base_url, "timestamp": ts, "public_key_hex": b.public_key_hex,
            "signature": moved.sign(peer_update_string(b.agent_id, moved.base_url, ts))}
    assert (await dm.post(a, "/__darkmatter__/peer_update", body)).status == 200
    replay = await dm.post(a, "/__darkmatter__/peer_update", body)
    assert replay.status == 403 and replay.body["code"] == "stale_timestamp"


async def test_a_node_finds_a_moved_peer_through_peer_lookup(dm, wait_for):
    a, b, c = await dm.mesh(3, connect_as="full")
    old_url = a.connections[b.agent_id]["agent_url"]
    moved = await dm.restart(b, move=True)
    ts = now_iso()
    body = {"agent_id": b.agent_id, "new_url": moved.base_url, "timestamp": ts, "public_key_hex": b.public_key_hex,
            "signature": moved.sign(peer_update_string(b.agent_id, moved.base_url, ts))}
    assert (await dm.post(c, "/__darkmatter__/peer_update", body)).status == 200
    assert c.connections[b.agent_id]["agent_url"] == moved.base_url
    if dm.transport != "memory":  # http_transport's lifespan announces a restart on a new URL by itself
        await wait_for(lambda: a.connections[b.agent_id]["agent_url"] == moved.base_url, what="the announcement")
    # A missed the move (it was down, say): it learns it by asking its other connections when delivery fails.
    a.connections[b.agent_id]["agent_url"] = old_url
    result = await outbound.send_message(a, "where are you", b.agent_id)
    assert result["success"] is True
    await wait_for(lambda: [m["content"] for m in moved.state["inbox"]] == ["where are you"], timeout=30,
                   what="delivery after peer_lookup recovery")
    assert a.connections[b.agent_id]["agent_url"] == moved.base_url


async def test_the_outbox_delivers_to_a_peer_that_comes_back(dm, wait_for):
    a, b = await dm.mesh(2)
    await dm.kill(b)
    result = await outbound.send_message(a, "are you there", b.agent_id)
    assert result["deliveries"][b.agent_id]["state"] == "queued"
    back = await dm.revive(b)
    await wait_for(lambda: [m["content"] for m in back.state["inbox"]] == ["are you there"], timeout=30,
                   what="the retried delivery")
    sent = a.state["sent_messages"][result["message_id"]]
    await wait_for(lambda: sent["deliveries"][b.agent_id]["state"] == "delivered", what="the delivery record")


async def test_status_and_network_info_answer_with_the_identity(dm):
    a, b = await dm.mesh(2)
    status = await dm.get(a, "/__darkmatter__/status")
    assert status.status == 200 and status.body["agent_id"] == a.agent_id
    assert status.body["public_key_hex"] == a.public_key_hex and status.body["num_connections"] == 1
    document = await dm.get(a, "/.well-known/darkmatter.json")
    assert document.body["darkmatter"] is True and document.body["agent_id"] == a.agent_id
    info = await dm.get(a, "/__darkmatter__/network_info")
    assert info.body["agent_id"] == a.agent_id and info.body["accepting_connections"] is True


async def test_an_unknown_path_is_404(dm):
    a = await dm.node()
    reply = await dm.get(a, "/__darkmatter__/nothing_here")
    assert reply.status == 404
