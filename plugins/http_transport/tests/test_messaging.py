"""Messages, forwarding, responses and webhooks between real nodes (docs/protocol.md §3.6, §3.7, §5)."""

import asyncio

import pytest

from darkmatter import api as actions
from darkmatter.api import v2_webhook_update
from darkmatter.testing import RawPeer, client, mesh, node_context
from darkmatter.api import ToolError
from darkmatter.api import now_iso

pytestmark = pytest.mark.anyio


async def wait_for(predicate, timeout: float = 10.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_direct_message_arrives_verified_with_v2(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        result = await actions.send_message(a, "hello B", b.agent_id, metadata={"topic": "t"})
        assert result["success"] and result["deliveries"][b.agent_id]["state"] == "delivered"
        entry = b.state["inbox"][-1]
        assert entry["content"] == "hello B" and entry["metadata"] == {"topic": "t"}
        assert entry["verified"] is True and entry["signature_version"] == 2
        assert entry["webhook"].endswith("/__darkmatter__/webhook/" + result["message_id"])
        assert a.state["sent_messages"][result["message_id"]]["routed_to"] == [b.agent_id]
        assert b.connections[a.agent_id]["messages_received"] == 1
        assert a.connections[b.agent_id]["messages_sent"] == 1


async def test_three_hop_chain_response_reaches_origin_webhook_with_every_update(tmp_path):
    async with mesh(tmp_path, 3) as (a, b, c):
        sent = await actions.send_message(a, "who tunes sqlite?", b.agent_id, hops_remaining=5)
        mid = sent["message_id"]
        fwd = await actions.forward_message(b, mid, c.agent_id, note="C maintains storage")
        assert fwd["delivery"] == "delivered" and fwd["hops_remaining"] == 4
        assert c.state["inbox"][-1]["hops_remaining"] == 4
        record = a.state["sent_messages"][mid]
        assert await wait_for(lambda: record["updates"])
        update = record["updates"][0]
        assert update["type"] == "forwarded" and update["agent_id"] == b.agent_id
        assert update["target_agent_id"] == c.agent_id and update["verified"] is True
        assert update["note"] == "C maintains storage" and update["sent_at"]
        answer = await actions.respond_message(c, mid, "wal_autocheckpoint=0")
        assert answer["delivery"] == "delivered"
        assert not c.state["inbox"]
        assert record["status"] == "responded"
        assert record["response"]["agent_id"] == c.agent_id and record["response"]["verified"] is True
        async with client(a) as http:
            trail = (await http.get(f"/__darkmatter__/webhook/{mid}")).json()
        assert trail["status"] == "responded" and trail["hops_remaining"] == 4
        assert trail["routed_to"] == [b.agent_id] and trail["response_count"] == 1
        assert "content" not in trail and "note" not in trail["updates"][0]


async def test_forwarding_back_into_the_loop_is_refused_unless_forced(tmp_path):
    async with mesh(tmp_path, 3, connect_as="full") as (a, b, c):
        mid = (await actions.send_message(a, "loop?", b.agent_id))["message_id"]
        await actions.forward_message(b, mid, c.agent_id)
        with pytest.raises(ToolError, match="already received"):
            await actions.forward_message(c, mid, a.agent_id)  # the origin
        with pytest.raises(ToolError, match="already received"):
            await actions.forward_message(c, mid, b.agent_id)  # the previous hop
        # B's forward to C is recorded at A's webhook; forwarding to C again is a loop too
        assert await wait_for(lambda: a.state["sent_messages"][mid]["updates"])
        with pytest.raises(ToolError, match="already received"):
            await actions.forward_message(b, mid, c.agent_id)


async def test_fork_to_two_peers_each_gets_one_hop_less(tmp_path):
    async with mesh(tmp_path, 4, connect_as="none") as (a, b, c, d):
        from darkmatter.testing import connect

        await connect(a, b)
        await connect(b, c)
        await connect(b, d)
        mid = (await actions.send_message(a, "fork me", b.agent_id, hops_remaining=3))["message_id"]
        r1 = await actions.forward_message(b, mid, c.agent_id)
        r2 = await actions.forward_message(b, mid, d.agent_id)
        assert r1["hops_remaining"] == r2["hops_remaining"] == 2
        assert c.state["inbox"][-1]["hops_remaining"] == 2 and d.state["inbox"][-1]["hops_remaining"] == 2
        assert sorted(b.state["inbox"][-1]["forwarded_to"]) == sorted([c.agent_id, d.agent_id])


async def test_expired_ttl_stops_forwarding_and_reports_expiry(tmp_path):
    async with mesh(tmp_path, 3) as (a, b, c):
        mid = (await actions.send_message(a, "short lived", b.agent_id, hops_remaining=1))["message_id"]
        await actions.forward_message(b, mid, c.agent_id)
        assert c.state["inbox"][-1]["hops_remaining"] == 0
        with pytest.raises(ToolError, match="Message expired"):
            await actions.forward_message(c, mid, b.agent_id, force=True)
        record = a.state["sent_messages"][mid]
        assert await wait_for(lambda: any(u["type"] == "expired" for u in record["updates"]))
        assert record["status"] == "active"  # an expired fork never changes the status
        assert c.state["inbox"], "the message stays in the inbox so it can still be answered"


async def test_owner_expiry_makes_forwarders_drop_the_message(tmp_path):
    async with mesh(tmp_path, 3) as (a, b, c):
        mid = (await actions.send_message(a, "stale soon", b.agent_id))["message_id"]
        await actions.expire_message(a, mid)
        with pytest.raises(ToolError, match="already expired"):
            await actions.forward_message(b, mid, c.agent_id)
        assert not b.state["inbox"]
        assert not c.state["inbox"]


async def test_byte_identical_replay_is_a_duplicate_and_not_queued_twice(tmp_path):
    async with node_context(tmp_path / "a") as a:
        peer = RawPeer()
        await peer.connect(a)
        body = peer.message(a, "once")
        first = await peer.post(a, "/__darkmatter__/message", body)
        second = await peer.post(a, "/__darkmatter__/message", body)
        assert first.json()["queued"] is True
        assert second.status_code == 200 and second.json() == {"success": True, "duplicate": True}
        assert len(a.state["inbox"]) == 1
        assert a.connections[peer.agent_id]["messages_received"] == 1


async def test_tampered_messages_are_refused(tmp_path):
    async with node_context(tmp_path / "a") as a:
        peer = RawPeer()
        await peer.connect(a)
        cases = {}
        body = peer.message(a, "original")
        body["content"] = "tampered"
        cases["content"] = body
        body = peer.message(a, "x", hops=3)
        body["hops_remaining"] = 50
        cases["hops"] = body
        body = peer.message(a, "x")
        body["webhook"] = "http://127.0.0.1:9/__darkmatter__/webhook/" + body["message_id"] + "x"
        body["message_id"] += "x"
        cases["id_and_webhook"] = body
        body = peer.message(a, "x", metadata={"a": 1})
        body["metadata"] = {"a": 2}
        cases["metadata"] = body
        body = peer.message(a, "x", timestamp="2020-01-01T00:00:00+00:00")
        cases["stale"] = body
        body = peer.message(a, "x")
        del body["signature_v2_hex"]
        cases["downgrade_to_v1"] = body  # this peer is known 0.3 (signed handshake)
        body = peer.message(a, "x", v1=False, v2=False)
        cases["unsigned"] = body
        for name, body in cases.items():
            response = await peer.post(a, "/__darkmatter__/message", body)
            assert response.status_code == 403, (name, response.text)
        assert not a.state["inbox"]


async def test_message_for_another_recipient_cannot_be_replayed_here(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        peer = RawPeer()
        await peer.connect(a)
        await peer.connect(b)
        body_for_a = peer.message(a, "only for A")
        assert (await peer.post(a, "/__darkmatter__/message", body_for_a)).status_code == 200
        replayed = await peer.post(b, "/__darkmatter__/message", body_for_a)
        assert replayed.status_code == 403
        assert not b.state["inbox"]


async def test_forged_webhook_response_from_off_the_route_is_refused(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        mid = (await actions.send_message(a, "question", b.agent_id))["message_id"]
        outsider = RawPeer(agent_id="0c3a4f9e-2b8d-4e71-a6c5-91d0e7b3f284", keyed=False)  # a UUID stranger
        forged = {"type": "response", "agent_id": outsider.agent_id, "response": "forged answer", "metadata": {}}
        response = await outsider.post(a, f"/__darkmatter__/webhook/{mid}", forged)
        assert response.status_code == 403 and response.json()["code"] == "not_on_route"  # §5.6
        record = a.state["sent_messages"][mid]
        assert record["response"] is None and record["status"] == "active"
        await actions.respond_message(b, mid, "real answer")
        assert record["response"]["response"] == "real answer" and record["response"]["verified"] is True
        # a forged update claiming to be B (self-certifying) without B's signature is refused
        claim = {"type": "response", "agent_id": b.agent_id, "response": "impostor", "metadata": {}}
        assert (await outsider.post(a, f"/__darkmatter__/webhook/{mid}", claim)).status_code == 403
        evil = RawPeer()
        ts = now_iso()
        wrong = {**claim, "timestamp": ts, "from_public_key_hex": b.public_key_hex,
                 "signature_v2_hex": evil.identity.sign(v2_webhook_update(mid, "response", b.agent_id, None, ts,
                                                                          "impostor", {}))}
        assert (await evil.post(a, f"/__darkmatter__/webhook/{mid}", wrong)).status_code == 403
        assert record["response"]["response"] == "real answer"
        assert [r["verified"] for r in record["responses"]] == [True]


async def test_broadcast_reaches_every_connection(tmp_path):
    async with mesh(tmp_path, 4, connect_as="none") as nodes:
        from darkmatter.testing import connect

        hub, *spokes = nodes
        for spoke in spokes:
            await connect(hub, spoke)
        result = await actions.send_message(hub, "to all")
        assert result["broadcast"] is True
        assert {k: v["state"] for k, v in result["deliveries"].items()} == {s.agent_id: "delivered" for s in spokes}
        for spoke in spokes:
            assert spoke.state["inbox"][-1]["content"] == "to all"


async def test_webhook_get_for_unknown_message_is_404_json(tmp_path):
    async with node_context(tmp_path / "a") as a:
        async with client(a) as http:
            response = await http.get("/__darkmatter__/webhook/msg-unknown")
        assert response.status_code == 404 and response.json()["code"] == "unknown_message"


async def test_a_02_peer_with_a_key_talks_v1_and_its_unsigned_updates_are_recorded_unverified(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        legacy = RawPeer(agent_id="3d6f7c2e-5b1a-4f8e-9c0d-7a2b6e4f1c33")
        body = legacy.connection_request(sign=False)  # 0.2: key presented, no timestamp or v2 signature
        body.pop("protocol_version")
        assert (await legacy.post(b, "/__darkmatter__/connection_request", body)).json()["auto_accepted"] is True
        v1_only = legacy.message(b, "from the past", v2=False)
        response = await legacy.post(b, "/__darkmatter__/message", v1_only)
        assert response.status_code == 200, response.text
        assert b.state["inbox"][-1]["verified"] is True and b.state["inbox"][-1]["signature_version"] == 1
        # a 0.2 forwarder reports a forward without signing it
        mid = (await actions.send_message(a, "q", b.agent_id))["message_id"]
        ts = now_iso()  # B forwarded it to the 0.2 peer (B's signed update puts it on the route, §5.6)
        by_b = {"type": "forwarded", "agent_id": b.agent_id, "target_agent_id": legacy.agent_id, "note": None,
                "timestamp": ts, "from_public_key_hex": b.public_key_hex,
                "signature_v2_hex": b.sign(v2_webhook_update(mid, "forwarded", b.agent_id, legacy.agent_id, ts,
                                                             None, {}))}
        assert (await legacy.post(a, f"/__darkmatter__/webhook/{mid}", by_b)).status_code == 200
        update = {"type": "forwarded", "agent_id": legacy.agent_id, "target_agent_id": "someone", "note": None}
        reply = await legacy.post(a, f"/__darkmatter__/webhook/{mid}", update)
        assert reply.json() == {"success": True, "recorded": "forwarded", "verified": False, "status": "active"}
        again = await legacy.post(a, f"/__darkmatter__/webhook/{mid}", update)
        assert again.json()["duplicate"] is True
        assert len(a.state["sent_messages"][mid]["updates"]) == 2
