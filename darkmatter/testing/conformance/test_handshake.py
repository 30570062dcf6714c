"""Connecting, accepting, rejecting and disconnecting (docs/protocol.md §4.2–§4.6)."""

import pytest

from darkmatter.mesh import outbound
from darkmatter.testing import RawPeer

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]


async def test_a_genesis_node_accepts_and_both_sides_record_the_connection(dm):
    a, b = await dm.mesh(2, connect_as="none")
    result = await outbound.request_connection(a, b.base_url)
    assert result["status"] == "connected" and result["agent_id"] == b.agent_id
    assert a.connections[b.agent_id]["agent_public_key_hex"] == b.public_key_hex
    assert b.connections[a.agent_id]["agent_public_key_hex"] == a.public_key_hex
    assert a.connections[b.agent_id]["direction"] == "outbound"
    assert b.connections[a.agent_id]["direction"] == "inbound"


async def test_a_non_genesis_node_queues_the_request(dm):
    a = await dm.node()
    b = await dm.node(DARKMATTER_GENESIS="false")
    result = await outbound.request_connection(a, b.base_url)
    assert result["status"] == "pending"
    pending = list(b.state["pending_requests"].values())
    assert [p["from_agent_id"] for p in pending] == [a.agent_id]
    assert pending[0]["signed"] is True
    assert b.agent_id not in a.connections and a.agent_id not in b.connections
    assert [p["expected_agent_id"] for p in a.state["pending_outbound"]] == [b.agent_id]


async def test_accepting_a_queued_request_connects_both_sides(dm, wait_for):
    a = await dm.node()
    b = await dm.node(DARKMATTER_GENESIS="false")
    await outbound.request_connection(a, b.base_url)
    request_id = next(iter(b.state["pending_requests"]))
    result = await outbound.respond_connection(b, request_id, True)
    assert result["status"] == "connected"
    assert a.agent_id in b.connections
    await wait_for(lambda: b.agent_id in a.connections, what="the acceptance to reach the requester")
    assert a.state["pending_outbound"] == []
    assert b.state["pending_requests"] == {}


async def test_rejecting_a_queued_request_tells_the_requester(dm, wait_for):
    a = await dm.node()
    b = await dm.node(DARKMATTER_GENESIS="false")
    await outbound.request_connection(a, b.base_url)
    request_id = next(iter(b.state["pending_requests"]))
    result = await outbound.respond_connection(b, request_id, False)
    assert result["status"] == "rejected" and result["notified"] is True
    assert a.state["pending_outbound"] == []
    assert [n["type"] for n in a.state["notices"]] == ["rejected"]
    assert b.agent_id not in a.connections and a.agent_id not in b.connections


async def test_disconnect_removes_the_connection_on_both_sides(dm):
    a, b = await dm.mesh(2)
    result = await outbound.disconnect(a, b.agent_id)
    assert result["peer_notified"] is True
    assert b.agent_id not in a.connections
    assert a.agent_id not in b.connections
    assert [n["type"] for n in b.state["notices"]] == ["disconnected"]


async def test_a_second_request_from_a_connection_is_answered_already_connected(dm):
    a, b = await dm.mesh(2)
    result = await outbound.request_connection(a, b.base_url)
    assert result["status"] == "connected"
    assert len(a.connections) == 1 and len(b.connections) == 1


async def test_a_request_claiming_the_nodes_own_id_is_refused(dm):
    b = await dm.node()
    peer = RawPeer(dm.raw_url())
    body = peer.connection_request(from_agent_id=b.agent_id, from_agent_public_key_hex=b.public_key_hex)
    reply = await dm.post(b, "/__darkmatter__/connection_request", body)
    assert reply.status == 403
    assert b.connections == {} and b.state["pending_requests"] == {}


async def test_a_request_with_another_key_for_a_connected_id_is_refused(dm):
    b = await dm.node()
    peer = RawPeer(dm.raw_url())
    assert (await dm.post(b, "/__darkmatter__/connection_request", peer.connection_request())).status == 200
    impostor = RawPeer(dm.raw_url("impostor"), agent_id=peer.agent_id)
    body = impostor.connection_request()
    reply = await dm.post(b, "/__darkmatter__/connection_request", body)
    assert reply.status == 403 and reply.body["code"] == "key_mismatch"
    assert b.connections[peer.agent_id]["agent_public_key_hex"] == peer.identity.public_key_hex


async def test_an_inactive_node_refuses_connection_requests(dm):
    b = await dm.node()
    b.state["status"] = "inactive"
    reply = await dm.post(b, "/__darkmatter__/connection_request", RawPeer(dm.raw_url()).connection_request())
    assert reply.status == 503 and reply.body["code"] == "inactive"
    assert b.connections == {}


async def test_an_unsigned_request_for_a_self_certifying_id_is_refused(dm):
    b = await dm.node()
    peer = RawPeer(dm.raw_url())
    reply = await dm.post(b, "/__darkmatter__/connection_request", peer.connection_request(sign=False))
    assert reply.status == 403 and reply.body["code"] == "signature_required"
    assert b.connections == {}
