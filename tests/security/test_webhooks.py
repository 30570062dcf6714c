"""Webhooks (docs/protocol.md §5.5–§5.7, §13.2, §2.3): forged updates, what outsiders can read, caps and sizes."""

from __future__ import annotations

import json
import uuid

import pytest

from darkmatter.mesh import outbound as actions
from darkmatter.identity import v2_webhook_update
from darkmatter.testing import RawPeer, client, mesh
from darkmatter.wire import now_iso

pytestmark = pytest.mark.anyio


def fingerprint(node) -> str:
    return json.dumps(node.state, sort_keys=True, default=str)


def stranger() -> RawPeer:
    return RawPeer(agent_id=str(uuid.uuid4()), keyed=False)


async def test_forged_responses_are_refused_and_never_replace_a_verified_one(tmp_path):
    """§5.6: an outsider's response is off the route (403 ``not_on_route``), before and after the real answer;
    claims to be B that B did not sign are refused; only B's answer is recorded."""
    async with mesh(tmp_path, 2) as (a, b):
        mid = (await actions.send_message(a, "question", b.agent_id))["message_id"]
        path = f"/__darkmatter__/webhook/{mid}"
        record = a.state["sent_messages"][mid]
        outsider = stranger()
        early = await outsider.post(a, path, {"type": "response", "agent_id": outsider.agent_id,
                                             "response": "forged early", "metadata": {}})
        assert early.status_code == 403 and early.json()["code"] == "not_on_route"
        assert record["status"] == "active"
        await actions.respond_message(b, mid, "the real answer")
        assert record["response"]["response"] == "the real answer" and record["response"]["verified"] is True
        late = await stranger().post(a, path, {"type": "response", "agent_id": str(uuid.uuid4()),
                                               "response": "forged late", "metadata": {}})
        assert late.status_code == 403 and late.json()["code"] == "not_on_route"
        assert record["response"]["response"] == "the real answer"
        # claiming to be B: unsigned, signed by another key, or with another key presented
        evil = RawPeer()
        ts = now_iso()
        claims = {
            "unsigned": {"type": "response", "agent_id": b.agent_id, "response": "impostor", "metadata": {}},
            "evil signature": {"type": "response", "agent_id": b.agent_id, "response": "impostor", "metadata": {},
                               "timestamp": ts, "from_public_key_hex": b.public_key_hex,
                               "signature_v2_hex": evil.identity.sign(v2_webhook_update(
                                   mid, "response", b.agent_id, None, ts, "impostor", {}))},
            "evil key": {"type": "forwarded", "agent_id": b.agent_id, "target_agent_id": evil.agent_id,
                         "timestamp": ts, "from_public_key_hex": evil.identity.public_key_hex,
                         "signature_v2_hex": evil.identity.sign(v2_webhook_update(
                             mid, "forwarded", b.agent_id, evil.agent_id, ts, None, {}))},
            "unsigned forward by B": {"type": "forwarded", "agent_id": b.agent_id, "target_agent_id": "x"},
        }
        before = fingerprint(a)
        for name, body in claims.items():
            reply = await evil.post(a, path, body)
            assert reply.status_code == 403, (name, reply.text)
        assert fingerprint(a) == before
        assert [(r["response"], r["verified"]) for r in record["responses"]] == [("the real answer", True)]


def signed_update(signer, mid: str, kind: str, agent_id: str, target: str | None = None, text: str | None = None,
                  metadata: dict | None = None) -> dict:
    """A v2-signed webhook update; ``signer`` is a node or a RawPeer's identity."""
    ts = now_iso()
    body = {"type": kind, "agent_id": agent_id, "timestamp": ts, "from_public_key_hex": agent_id,
            "signature_v2_hex": signer.sign(v2_webhook_update(mid, kind, agent_id, target, ts, text, metadata or {}))}
    if target is not None:
        body["target_agent_id"] = target
    if kind == "response":
        body.update(response=text, metadata=metadata or {})
    elif text is not None:
        body["note"] = text
    return body


async def test_outsiders_learn_nothing_but_the_status(tmp_path):
    async with mesh(tmp_path, 3) as (a, b, c):
        secret = "the secret content"
        mid = (await actions.send_message(a, secret, b.agent_id, metadata={"secret": "meta"}))["message_id"]
        await actions.forward_message(b, mid, c.agent_id, note="secret note")
        await actions.respond_message(c, mid, "secret response")
        outsider = stranger()
        async with client(a) as http:
            trail = await http.get(f"/__darkmatter__/webhook/{mid}")
            assert trail.status_code == 200
            body = trail.json()
            assert set(body) == {"message_id", "status", "initial_hops", "hops_remaining", "created_at",
                                 "origin_agent_id", "routed_to", "response_count", "updates"}
            for update in body["updates"]:
                assert set(update) <= {"type", "agent_id", "target_agent_id", "timestamp", "sent_at", "verified"}
            text = trail.text
            for leak in ("secret", a.state["private_key_hex"]):
                assert leak not in text
            # unknown ids are a plain 404 that echoes nothing else
            unknown = await http.get("/__darkmatter__/webhook/msg-unknown")
            assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_message"
            # peer_lookup only says where a *connection* is; impressions need a signed request from one
            assert (await http.get(f"/__darkmatter__/peer_lookup/{outsider.agent_id}")).status_code == 404
            await actions_set_impression(a, b.agent_id, "private opinion")
            imp = await http.get(f"/__darkmatter__/impression/{b.agent_id}")
            assert imp.status_code == 403 and "private opinion" not in imp.text
            evil = RawPeer()
            headers = {"X-DarkMatter-Agent-Id": evil.agent_id, "X-DarkMatter-Timestamp": now_iso(),
                       "X-DarkMatter-Signature": "00" * 64}
            imp = await http.get(f"/__darkmatter__/impression/{b.agent_id}", headers=headers)
            assert imp.status_code == 403 and imp.json()["code"] == "not_connected"
            # a connection replaying B's signed headers for another path gets nothing either
            signed = b.signed_get_headers(f"/__darkmatter__/impression/{c.agent_id}", a.agent_id)
            imp = await http.get(f"/__darkmatter__/impression/{b.agent_id}", headers=signed)
            assert imp.status_code == 403 and "private opinion" not in imp.text
            for public in ("/__darkmatter__/status", "/.well-known/darkmatter.json"):
                doc = (await http.get(public)).text
                assert a.state["private_key_hex"] not in doc and "secret" not in doc and "private opinion" not in doc


async def actions_set_impression(node, agent_id: str, text: str) -> None:
    tool = node.tools["darkmatter_set_impression"]
    from darkmatter.tools import Session

    await tool.handler(node, {"agent_id": agent_id, "impression": text}, Session())


async def test_update_and_response_counts_are_capped(tmp_path):
    """§5.6, §13.2: 200 verified updates and 50 verified responses; unverified (0.2) ones have their own caps
    (20 updates, 10 responses) and never crowd out a verified one; repeats are duplicates."""
    async with mesh(tmp_path, 2, DARKMATTER_RATE_LIMITS="off") as (a, b):
        legacy = RawPeer(agent_id=str(uuid.uuid4()))  # a 0.2 route member: keyed, never signs updates
        assert (await legacy.connect(a, sign=False))["auto_accepted"] is True
        mid = (await actions.send_message(a, "popular"))["message_id"]  # to B and the 0.2 peer
        path = f"/__darkmatter__/webhook/{mid}"
        record = a.state["sent_messages"][mid]
        responders = [RawPeer() for _ in range(51)]
        async with client(a) as http:
            for i in range(20):
                body = {"type": "forwarded", "agent_id": legacy.agent_id, "target_agent_id": f"old{i}"}
                assert (await http.post(path, json=body)).status_code == 200
            over = await http.post(path, json={"type": "forwarded", "agent_id": legacy.agent_id,
                                               "target_agent_id": "one-too-many"})
            assert over.status_code == 429 and over.json()["code"] == "capacity"
            targets = [p.agent_id for p in responders] + [f"t{i}" for i in range(200 - len(responders))]
            for target in targets:
                reply = await http.post(path, json=signed_update(b, mid, "forwarded", b.agent_id, target))
                assert reply.status_code == 200 and reply.json()["verified"] is True, reply.text
            # a repeat is a duplicate, not a new record
            repeat = {"type": "forwarded", "agent_id": legacy.agent_id, "target_agent_id": "old0"}
            assert (await http.post(path, json=repeat)).json()["duplicate"] is True
            over = await http.post(path, json=signed_update(b, mid, "forwarded", b.agent_id, "one-too-many"))
            assert over.status_code == 429 and over.json()["code"] == "capacity"
            for i in range(10):
                body = {"type": "response", "agent_id": legacy.agent_id, "response": f"old r{i}", "metadata": {}}
                assert (await http.post(path, json=body)).status_code == 200
            assert record["status"] == "responded"  # an unverified answer from a 0.2 route member, none verified
            over = await http.post(path, json={"type": "response", "agent_id": legacy.agent_id,
                                               "response": "11th", "metadata": {}})
            assert over.status_code == 429 and over.json()["code"] == "capacity"
            for peer in responders[:50]:
                reply = await http.post(path, json=signed_update(peer.identity, mid, "response", peer.agent_id,
                                                                 text=f"answer of {peer.agent_id[:8]}"))
                assert reply.status_code == 200 and reply.json()["verified"] is True, reply.text
            assert record["response"]["verified"] is True
            before = fingerprint(a)
            peer = responders[50]
            over = await http.post(path, json=signed_update(peer.identity, mid, "response", peer.agent_id, text="51st"))
            assert over.status_code == 429 and over.json()["code"] == "capacity"
            assert fingerprint(a) == before
        assert len(record["updates"]) == 220
        assert len(record["responses"]) == 60


async def test_oversized_or_malformed_updates_are_refused_without_a_trace(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        mid = (await actions.send_message(a, "q", b.agent_id))["message_id"]
        path = f"/__darkmatter__/webhook/{mid}"
        who = str(uuid.uuid4())
        deep: dict = {}
        cursor = deep
        for _ in range(20):
            cursor["d"] = {}
            cursor = cursor["d"]
        cases = {
            "response over 65536 bytes": ({"type": "response", "agent_id": who, "response": "é" * 32769}, 413),
            "metadata over 16 KiB": ({"type": "response", "agent_id": who, "response": "x",
                                      "metadata": {"k": "v" * 16400}}, 413),
            "metadata too deep": ({"type": "response", "agent_id": who, "response": "x", "metadata": deep}, 400),
            "metadata not an object": ({"type": "response", "agent_id": who, "response": "x", "metadata": [1]}, 400),
            "note over 1000": ({"type": "forwarded", "agent_id": who, "target_agent_id": "t", "note": "n" * 1001},
                               400),
            "unknown type": ({"type": "hijack", "agent_id": who}, 400),
            "no agent": ({"type": "expired"}, 400),
            "id with a newline": ({"type": "expired", "agent_id": "a\nb"}, 400),
            "response not a string": ({"type": "response", "agent_id": who, "response": 5}, 400),
        }
        before = fingerprint(a)
        async with client(a) as http:
            for name, (body, status) in cases.items():
                reply = await http.post(path, json=body)
                assert reply.status_code == status, (name, reply.text)
                assert "error" in reply.json() and "Traceback" not in reply.text
            for bad_id in ("msg-unknown", "..", "a%20b", "x" * 200):
                reply = await http.post(f"/__darkmatter__/webhook/{bad_id}",
                                        json={"type": "expired", "agent_id": who})
                assert reply.status_code in (400, 404), bad_id
        assert fingerprint(a) == before


async def test_an_expired_message_stays_expired(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        mid = (await actions.send_message(a, "q", b.agent_id))["message_id"]
        await actions.expire_message(a, mid)
        answer = await actions.respond_message(b, mid, "too late")
        assert answer["delivery"] == "delivered"
        record = a.state["sent_messages"][mid]
        assert record["status"] == "expired"
        assert record["responses"][0]["after_expiry"] is True
