"""Connections both ways over real HTTP (docs/protocol.md §4.2–§4.6)."""

import pytest

from darkmatter import api as actions
from darkmatter.testing import RawPeer, client, node_context
from darkmatter.api import ToolError

pytestmark = pytest.mark.anyio


async def test_genesis_auto_accepts_and_both_sides_record_the_connection(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        result = await actions.request_connection(a, f"http://localhost:{b.port}/mcp/")
        assert result["status"] == "connected"
        assert result["agent_id"] == b.agent_id
        assert a.connections[b.agent_id]["direction"] == "outbound"
        assert a.connections[b.agent_id]["agent_url"] == f"http://localhost:{b.port}"
        assert b.connections[a.agent_id]["direction"] == "inbound"
        assert b.connections[a.agent_id]["agent_public_key_hex"] == a.public_key_hex
        # §4.2: B recorded the URL it gave A, spelled as A typed it.
        assert b.connections[a.agent_id]["self_url"] == f"http://localhost:{b.port}"
        again = await actions.request_connection(a, b.base_url)
        assert again["status"] == "connected" and "Already connected" in again["message"]
        assert len(b.connections) == 1


async def test_queued_request_is_accepted_later_and_the_requester_learns_it(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b", DARKMATTER_GENESIS="false") as b:
        result = await actions.request_connection(a, b.base_url)
        assert result["status"] == "pending"
        request_id = result["request_id"]
        assert request_id in b.state["pending_requests"]
        assert not a.connections and a.state["pending_outbound"]
        # the same requester asking again gets the same request id
        assert (await actions.request_connection(a, b.base_url))["request_id"] == request_id
        accepted = await actions.respond_connection(b, request_id, accept=True)
        assert accepted["status"] == "connected"
        assert accepted["acceptance_delivery"] == "delivered"
        assert b.agent_id in a.connections
        assert a.connections[b.agent_id]["agent_public_key_hex"] == b.public_key_hex
        assert not a.state["pending_outbound"]


async def test_rejected_request_notifies_the_requester(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b", DARKMATTER_GENESIS="false") as b:
        request_id = (await actions.request_connection(a, b.base_url))["request_id"]
        rejected = await actions.respond_connection(b, request_id, accept=False)
        assert rejected["status"] == "rejected" and rejected["notified"] is True
        assert not a.state["pending_outbound"]
        assert a.state["notices"][-1]["type"] == "rejected"
        assert not b.state["pending_requests"] and not b.connections


async def test_disconnect_removes_both_sides(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        await actions.request_connection(a, b.base_url)
        result = await actions.disconnect(a, b.agent_id)
        assert result["peer_notified"] is True
        assert not a.connections and not b.connections
        assert b.state["notices"][-1]["type"] == "disconnected"
        with pytest.raises(ToolError):
            await actions.disconnect(a, b.agent_id)


async def test_forged_connection_accepted_without_pending_request_is_refused(tmp_path):
    async with node_context(tmp_path / "a") as a:
        evil = RawPeer()
        body = {"agent_id": evil.agent_id, "agent_url": evil.url, "agent_public_key_hex": evil.identity.public_key_hex}
        response = await evil.post(a, "/__darkmatter__/connection_accepted", body)
        assert response.status_code == 403
        assert not a.connections


async def test_connection_request_that_changes_a_stored_key_is_refused(tmp_path):
    async with node_context(tmp_path / "a") as a:
        peer = RawPeer()
        assert (await peer.connect(a))["auto_accepted"] is True
        impostor = RawPeer(agent_id=peer.agent_id)  # same id, another key
        body = impostor.connection_request(sign=False, from_agent_public_key_hex=impostor.identity.public_key_hex)
        response = await impostor.post(a, "/__darkmatter__/connection_request", body)
        assert response.status_code == 403
        assert a.connections[peer.agent_id]["agent_public_key_hex"] == peer.identity.public_key_hex


async def test_unsigned_request_from_a_legacy_uuid_node_is_accepted_keyless(tmp_path):
    async with node_context(tmp_path / "a") as a:
        legacy = RawPeer(agent_id="6f1e4b0a-8d53-4c1e-9d2b-3a7f5e8c9b10", keyed=False)
        reply = await legacy.connect(a, sign=False)
        assert reply["auto_accepted"] is True
        assert a.connections[legacy.agent_id]["agent_public_key_hex"] is None
        # unsigned messages from a keyless connection are accepted unverified (§3.6)
        response = await legacy.post(a, "/__darkmatter__/message", legacy.message(a, "hi from 0.2"))
        assert response.status_code == 200, response.text
        assert a.state["inbox"][-1]["verified"] is False


async def test_inactive_node_refuses_requests_and_messages_but_serves_status(tmp_path):
    """§2.1: an inactive node answers 503 ``inactive`` to connection requests and to messages, even from a
    connected peer, and keeps nothing of them; /status still answers."""
    async with node_context(tmp_path / "a") as a:
        friend = RawPeer()
        await friend.connect(a)
        a.state["status"] = "inactive"
        peer = RawPeer()
        response = await peer.post(a, "/__darkmatter__/connection_request", peer.connection_request())
        assert response.status_code == 503 and response.json()["code"] == "inactive"
        assert peer.agent_id not in a.connections and a.state["pending_requests"] == {}
        message = friend.message(a, "are you there?")
        response = await friend.post(a, "/__darkmatter__/message", message)
        assert response.status_code == 503 and response.json()["code"] == "inactive", response.text
        assert a.state["inbox"] == [] and message["message_id"] not in a.state["seen_message_ids"]
        # (the same message is accepted once the node is active again: nothing of it was remembered)
        a.state["status"] = "active"
        assert (await friend.post(a, "/__darkmatter__/message", message)).status_code == 200
        assert [m["message_id"] for m in a.state["inbox"]] == [message["message_id"]]
        a.state["status"] = "inactive"
        async with client(a) as http:
            status = await http.get("/__darkmatter__/status")
        assert status.status_code == 200 and status.json()["status"] == "inactive"
        assert status.json()["accepting_connections"] is False
