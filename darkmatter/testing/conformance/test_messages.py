"""Messages between connections: verification, duplicates and refusals (docs/protocol.md §3.6, §3.7, §4.7).

Every case runs over the transport a node registered through ``dm_register_transports`` (``dm_transport``)."""

import pytest

from darkmatter.mesh import outbound
from darkmatter.testing import RawPeer

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]

MESSAGE = "/__darkmatter__/message"


async def connected_raw_peer(dm, node) -> RawPeer:
    peer = RawPeer(dm.raw_url())
    reply = await dm.post(node, "/__darkmatter__/connection_request", peer.connection_request())
    assert reply.status == 200 and reply.body["auto_accepted"] is True
    return peer


async def test_a_sent_message_arrives_verified(dm):
    a, b = await dm.mesh(2)
    result = await outbound.send_message(a, "hello b", b.agent_id, metadata={"topic": "t"})
    assert result["deliveries"][b.agent_id]["state"] == "delivered"
    [entry] = b.state["inbox"]
    assert entry["content"] == "hello b" and entry["from_agent_id"] == a.agent_id
    assert entry["verified"] is True and entry["signature_version"] == 2
    assert entry["metadata"] == {"topic": "t"}
    assert entry["message_id"] == result["message_id"]
    assert entry["transport"] == dm.transport  # on webrtc: carried by the data channel, not by HTTP
    assert result["deliveries"][b.agent_id]["transport"] == dm.transport
    assert a.state["sent_messages"][result["message_id"]]["routed_to"] == [b.agent_id]


async def test_a_broadcast_reaches_every_connection(dm):
    a, b, c = await dm.mesh(3, connect_as="none")
    await dm.connect(a, b)
    await dm.connect(a, c)
    result = await outbound.send_message(a, "to all")
    assert result["broadcast"] is True
    assert {k for k, d in result["deliveries"].items() if d["state"] == "delivered"} == {b.agent_id, c.agent_id}
    assert [m["content"] for m in b.state["inbox"]] == ["to all"]
    assert [m["content"] for m in c.state["inbox"]] == ["to all"]


async def test_a_duplicate_message_id_is_acknowledged_once(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    body = peer.message(b, "once")
    first = await dm.post(b, MESSAGE, body)
    second = await dm.post(b, MESSAGE, peer.message(b, "once", message_id=body["message_id"]))
    assert first.status == 200 and first.body.get("duplicate") is not True
    assert second.status == 200 and second.body["duplicate"] is True
    assert len(b.state["inbox"]) == 1


async def test_a_message_from_a_stranger_is_refused(dm):
    b = await dm.node()
    stranger = RawPeer(dm.raw_url())
    reply = await dm.post(b, MESSAGE, stranger.message(b))
    assert reply.status == 403 and reply.body["code"] == "not_connected"
    assert b.state["inbox"] == []


async def test_a_tampered_message_is_refused(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    body = peer.message(b, "original")
    body["content"] = "tampered"
    reply = await dm.post(b, MESSAGE, body)
    assert reply.status == 403 and reply.body["code"] == "invalid_signature"
    assert b.state["inbox"] == []


async def test_a_stale_message_is_refused(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    reply = await dm.post(b, MESSAGE, peer.message(b, timestamp="2020-01-01T00:00:00+00:00"))
    assert reply.status == 403 and reply.body["code"] == "stale_timestamp"
    assert b.state["inbox"] == []


async def test_a_message_signed_for_another_recipient_is_refused(dm):
    b, c = await dm.mesh(2, connect_as="none")
    peer = await connected_raw_peer(dm, b)
    assert (await dm.post(c, "/__darkmatter__/connection_request", peer.connection_request())).status == 200
    body = peer.message(b, "meant for b", v1=False)
    assert (await dm.post(b, MESSAGE, body)).status == 200
    replayed = await dm.post(c, MESSAGE, body)
    assert replayed.status == 403 and replayed.body["code"] == "invalid_signature"
    assert c.state["inbox"] == []


async def test_a_message_without_required_fields_is_refused(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    body = peer.message(b)
    del body["webhook"]
    reply = await dm.post(b, MESSAGE, body)
    assert reply.status == 400 and reply.body["code"] == "missing_fields"
    assert b.state["inbox"] == []


async def test_an_inactive_node_refuses_messages(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    b.state["status"] = "inactive"
    reply = await dm.post(b, MESSAGE, peer.message(b))
    assert reply.status == 503 and reply.body["code"] == "inactive"
    assert b.state["inbox"] == []


async def test_a_full_inbox_refuses_with_429_and_keeps_what_it_has(dm):
    b = await dm.node(DARKMATTER_INBOX_MAX="4", DARKMATTER_RATE_LIMITS="off")
    peers = [await connected_raw_peer(dm, b) for _ in range(3)]
    for peer in peers[:2]:
        for _ in range(2):
            assert (await dm.post(b, MESSAGE, peer.message(b))).status == 200
    reply = await dm.post(b, MESSAGE, peers[2].message(b))
    assert reply.status == 429 and reply.body["code"] == "capacity"
    assert len(b.state["inbox"]) == 4


async def test_one_sender_gets_at_most_half_the_inbox(dm):
    b = await dm.node(DARKMATTER_INBOX_MAX="4", DARKMATTER_RATE_LIMITS="off")
    peer = await connected_raw_peer(dm, b)
    statuses = [(await dm.post(b, MESSAGE, peer.message(b))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert len(b.state["inbox"]) == 2


async def test_an_accepted_message_is_on_disk_when_acknowledged(dm):
    a, b = await dm.mesh(2)
    result = await outbound.send_message(a, "durable", b.agent_id)
    assert result["deliveries"][b.agent_id]["state"] == "delivered"
    restarted = await dm.restart(b)
    assert [m["message_id"] for m in restarted.state["inbox"]] == [result["message_id"]]


async def test_a_message_id_that_is_not_valid_is_refused(dm):
    b = await dm.node()
    peer = await connected_raw_peer(dm, b)
    reply = await dm.post(b, MESSAGE, peer.message(b, message_id="not valid/../x"))
    assert reply.status == 400
    assert b.state["inbox"] == []
