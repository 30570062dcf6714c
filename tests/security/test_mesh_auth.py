"""Mesh authentication and replay (docs/protocol.md §1.3 refusals, §3.3–§3.7, §4.3–§4.4, §6.1–§6.3).

An evil peer holds its own Ed25519 key (``RawPeer``) and crafts exact wire bodies. Every refusal must
leave the node's state byte-for-byte unchanged.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from dm_acceptance import Answer, CaptureServer, NodeProcess, free_port, sign_peer_update, wait_for, \
    well_known_doc

from darkmatter.mesh import outbound as actions
from darkmatter.identity import v1_string, v2_message, v2_string
from darkmatter.testing import RawPeer, node_context
from darkmatter.wire import new_message_id, now_iso

pytestmark = pytest.mark.anyio

MSG = "/__darkmatter__/message"


def fingerprint(node) -> str:
    return json.dumps(node.state, sort_keys=True, default=str)


def shifted(seconds: int) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def resign(peer: RawPeer, node, body: dict, *, v1: bool = True, v2: bool = True) -> dict:
    """Sign `body` as it stands (after a change) with the peer's key."""
    ts = body["timestamp"]
    if v1:
        body["signature_hex"] = peer.identity.sign(v1_string(peer.agent_id, body["message_id"], ts, body["content"]))
    if v2:
        body["signature_v2_hex"] = peer.identity.sign(v2_message(
            peer.agent_id, node.agent_id, body["message_id"], ts, body["hops_remaining"], body["webhook"],
            body["content"], body["metadata"]))
    return body


async def test_forged_and_tampered_messages_from_a_keyed_peer_are_refused(tmp_path):
    async with node_context(tmp_path) as node:
        peer = RawPeer()
        await peer.connect(node)
        stranger = RawPeer()
        cases: dict[str, tuple[dict, str]] = {}

        def case(name: str, body: dict, code: str) -> None:
            cases[name] = (body, code)

        case("unsigned", peer.message(node, "x", v1=False, v2=False), "signature_required")
        body = peer.message(node, "x")
        body.pop("from_public_key_hex")
        case("no key", body, "signature_required")
        case("other key", {**peer.message(node, "x"), "from_public_key_hex": stranger.identity.public_key_hex},
             "key_mismatch")
        body = peer.message(node, "x")
        body["signature_v2_hex"] = stranger.message(node, "x", message_id=body["message_id"],
                                                    webhook=body["webhook"], timestamp=body["timestamp"]
                                                    )["signature_v2_hex"]
        case("signed by a stranger", body, "invalid_signature")
        body = peer.message(node, "x")
        body["signature_v2_hex"] = "00" * 64
        case("bad v2 next to a good v1 (no fallback)", body, "invalid_signature")
        body = peer.message(node, "x")
        del body["signature_v2_hex"]
        case("v1 only from a known 0.3 peer (downgrade)", body, "signature_required")
        for field, value in (("content", "tampered"), ("hops_remaining", 50), ("metadata", {"topic": "other"}),
                             ("webhook", "http://127.0.0.1:8/__darkmatter__/webhook/{id}"),
                             ("timestamp", now_iso())):
            body = peer.message(node, "x", metadata={"topic": "t"}, hops=3)
            body[field] = value.replace("{id}", body["message_id"]) if isinstance(value, str) else value
            case(f"tampered {field}", body, "invalid_signature")
        body = peer.message(node, "x")
        new_id = new_message_id()
        body["webhook"] = body["webhook"].replace(body["message_id"], new_id)
        body["message_id"] = new_id
        case("tampered message_id", body, "invalid_signature")
        case("stale timestamp, validly signed", peer.message(node, "x", timestamp=shifted(-400)), "stale_timestamp")
        case("future timestamp, validly signed", peer.message(node, "x", timestamp=shifted(+400)), "stale_timestamp")
        case("unparseable timestamp", peer.message(node, "x", timestamp="yesterday"), "stale_timestamp")
        case("from a stranger", stranger.message(node, "x"), "not_connected")

        before = fingerprint(node)
        for name, (body, code) in cases.items():
            reply = await peer.post(node, MSG, body)
            assert reply.status_code == 403, (name, reply.text)
            assert reply.json()["code"] == code, (name, reply.json())
        assert fingerprint(node) == before, "a refused message changed the state"


async def test_byte_identical_replay_is_a_duplicate_with_no_side_effects(tmp_path):
    async with node_context(tmp_path) as node, CaptureServer() as home:
        peer = RawPeer(home.url)
        await peer.connect(node)
        raw = json.dumps(peer.message(node, "once")).encode()
        first = await peer.post(node, MSG, raw)
        assert first.json()["queued"] is True
        before = fingerprint(node)
        for _ in range(5):
            again = await peer.post(node, MSG, raw)
            assert again.status_code == 200 and again.json() == {"success": True, "duplicate": True}
        assert fingerprint(node) == before
        assert len(node.state["inbox"]) == 1 and node.state["messages_handled"] == 1
        # still a duplicate once the message has left the inbox (answered)
        await actions.respond_message(node, node.state["inbox"][0]["message_id"], "ok")
        assert (await peer.post(node, MSG, raw)).json() == {"success": True, "duplicate": True}
        assert node.state["inbox"] == []


async def test_a_message_signed_for_one_recipient_is_refused_by_another(tmp_path):
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        peer = RawPeer()
        await peer.connect(a)
        await peer.connect(b)
        body = peer.message(a, "only for A")
        assert (await peer.post(a, MSG, body)).status_code == 200
        before = fingerprint(b)
        reply = await peer.post(b, MSG, body)
        assert reply.status_code == 403 and reply.json()["code"] == "invalid_signature"
        assert fingerprint(b) == before


async def test_replay_right_after_a_crash_restart_is_still_a_duplicate(tmp_path):
    """The dedup set survives kill -9 (§3.7: ids younger than 600 s are persisted before the 200)."""
    proc = NodeProcess(tmp_path / "n")
    await proc.start()
    try:
        status = await proc.wait_ready()

        class Remote:  # what RawPeer needs to know about the node
            agent_id = status["agent_id"]
            port = proc.port
        peer = RawPeer()
        assert (await peer.connect(Remote))["auto_accepted"] is True
        raw = json.dumps(peer.message(Remote, "before the crash")).encode()
        assert (await peer.post(Remote, MSG, raw)).json()["queued"] is True
        await proc.kill9()
        await proc.start()
        replay = await peer.post(Remote, MSG, raw)
        assert replay.status_code == 200 and replay.json() == {"success": True, "duplicate": True}
        fresh = await peer.post(Remote, MSG, peer.message(Remote, "after the crash"))
        assert fresh.json()["queued"] is True and fresh.json()["queue_position"] == 2
    finally:
        await proc.stop()


async def test_forged_connection_accepted_is_refused_while_a_real_request_is_pending(tmp_path):
    """§4.4: only the identity the requester asked for (from its well-known) may accept, and it must sign."""
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "t", DARKMATTER_GENESIS="false") as t:
        result = await actions.request_connection(a, t.base_url)
        assert result["status"] == "pending"
        evil = RawPeer()
        path = "/__darkmatter__/connection_accepted"

        def accepted(agent_id, key, url, signer=None):
            ts = now_iso()
            body = {"agent_id": agent_id, "agent_url": url, "agent_public_key_hex": key, "agent_bio": "evil",
                    "protocol_version": "0.3", "timestamp": ts}
            if signer is not None:
                body["signature_v2_hex"] = signer.sign(v2_string("connection_accepted", agent_id, url, key or "",
                                                                  a.agent_id, ts))
            return body

        cases = {
            "evil identity at the target's URL": (accepted(evil.agent_id, evil.identity.public_key_hex, t.base_url,
                                                           evil.identity), "key_mismatch"),
            "target id, evil key": (accepted(t.agent_id, evil.identity.public_key_hex, t.base_url, evil.identity),
                                    "key_mismatch"),
            "target id and copied key, unsigned": (accepted(t.agent_id, t.public_key_hex, t.base_url),
                                                   "signature_required"),
            "target id and copied key, signed by evil": (accepted(t.agent_id, t.public_key_hex, t.base_url,
                                                                  evil.identity), "invalid_signature"),
            "no pending request for this one": (accepted(evil.agent_id, evil.identity.public_key_hex,
                                                         "http://127.0.0.1:9", evil.identity), "forbidden"),
        }
        before = fingerprint(a)
        for name, (body, code) in cases.items():
            reply = await evil.post(a, path, body)
            assert reply.status_code == 403, (name, reply.text)
            assert reply.json()["code"] == code, (name, reply.json())
        assert fingerprint(a) == before and a.connections == {}
        # the real acceptance still works afterwards
        request_id = next(iter(t.state["pending_requests"]))
        await actions.respond_connection(t, request_id, True)
        assert await wait_for(lambda: t.agent_id in a.connections, 10)
        assert a.connections[t.agent_id]["agent_public_key_hex"] == t.public_key_hex


async def test_key_overwrite_attempts_never_change_a_stored_key(tmp_path):
    async with node_context(tmp_path) as node:
        # a UUID-id peer with a key (signed handshake)
        uid = str(uuid.uuid4())
        keyed = RawPeer(agent_id=uid)
        assert (await keyed.connect(node))["auto_accepted"] is True
        stored = node.connections[uid]["agent_public_key_hex"]
        assert stored == keyed.identity.public_key_hex
        usurper = RawPeer(agent_id=uid)  # same id, another key
        signed = await usurper.post(node, "/__darkmatter__/connection_request", usurper.connection_request())
        unsigned = await usurper.post(node, "/__darkmatter__/connection_request", usurper.connection_request(
            sign=False))
        assert signed.status_code == 403 and unsigned.status_code == 403
        assert unsigned.json()["code"] == "key_mismatch"
        # a self-certifying id with another key
        sc = RawPeer()
        await sc.connect(node)
        forged = RawPeer(agent_id=sc.agent_id)
        reply = await forged.post(node, "/__darkmatter__/connection_request", forged.connection_request())
        assert reply.status_code == 403 and reply.json()["code"] == "key_mismatch"
        # connection_accepted and peer_update presenting another key
        ts = now_iso()
        acc = {"agent_id": uid, "agent_url": keyed.url, "agent_public_key_hex": usurper.identity.public_key_hex,
               "protocol_version": "0.3", "timestamp": ts,
               "signature_v2_hex": usurper.identity.sign(v2_string(
                   "connection_accepted", uid, keyed.url, usurper.identity.public_key_hex, node.agent_id, ts))}
        assert (await usurper.post(node, "/__darkmatter__/connection_accepted", acc)).status_code == 403
        upd = {"agent_id": uid, "new_url": "http://127.0.0.1:7", "public_key_hex": usurper.identity.public_key_hex,
               "timestamp": ts, "signature": sign_peer_update(usurper.identity, uid, "http://127.0.0.1:7", ts)}
        reply = await usurper.post(node, "/__darkmatter__/peer_update", upd)
        assert reply.status_code == 403 and reply.json()["code"] == "key_mismatch"
        assert node.connections[uid]["agent_public_key_hex"] == stored
        assert node.connections[uid]["agent_url"] == keyed.url
        assert node.connections[sc.agent_id]["agent_public_key_hex"] == sc.agent_id


async def test_a_keyless_connection_never_gains_a_key_from_a_request(tmp_path):
    async with node_context(tmp_path) as node:
        uid = str(uuid.uuid4())
        legacy = RawPeer(agent_id=uid, keyed=False)
        assert (await legacy.connect(node, sign=False))["auto_accepted"] is True
        assert node.connections[uid]["agent_public_key_hex"] is None
        claimant = RawPeer(agent_id=uid)
        for sign in (False, True):
            reply = await claimant.post(node, "/__darkmatter__/connection_request",
                                        claimant.connection_request(sign=sign))
            assert reply.status_code in (200, 403), reply.text
            assert node.connections[uid]["agent_public_key_hex"] is None
            assert node.connections[uid]["agent_url"] == legacy.url
        # and its URL cannot be moved by peer_update (no K → 403, §6.3)
        ts = now_iso()
        upd = {"agent_id": uid, "new_url": "http://127.0.0.1:7", "public_key_hex": claimant.identity.public_key_hex,
               "timestamp": ts, "signature": sign_peer_update(claimant.identity, uid, "http://127.0.0.1:7", ts)}
        assert (await claimant.post(node, "/__darkmatter__/peer_update", upd)).status_code == 403
        assert node.connections[uid]["agent_url"] == legacy.url


async def test_unsigned_stale_or_replayed_peer_updates_are_refused(tmp_path):
    async with node_context(tmp_path) as node, CaptureServer() as new_home:
        peer = RawPeer()
        await peer.connect(node)
        url = new_home.url

        def update(ts: str | None, signature: str | None, **extra) -> dict:
            body = {"agent_id": peer.agent_id, "new_url": url, "public_key_hex": peer.identity.public_key_hex}
            if ts is not None:
                body["timestamp"] = ts
            if signature is not None:
                body["signature"] = signature
            body.update(extra)
            return body

        ts = now_iso()
        good_sig = sign_peer_update(peer.identity, peer.agent_id, url, ts)
        old = shifted(-400)
        cases = {
            "unsigned (earliest 0.2)": (update(None, None), "signature_required"),
            "signature without timestamp": (update(None, good_sig), "signature_required"),
            "timestamp without signature": (update(ts, None), "signature_required"),
            "stale": (update(old, sign_peer_update(peer.identity, peer.agent_id, url, old)), "stale_timestamp"),
            "signed by someone else": (update(ts, sign_peer_update(RawPeer().identity, peer.agent_id, url, ts)),
                                       "invalid_signature"),
            "signature over another URL": (update(ts, sign_peer_update(peer.identity, peer.agent_id,
                                                                       "http://127.0.0.1:7", ts)),
                                           "invalid_signature"),
        }
        before = fingerprint(node)
        for name, (body, code) in cases.items():
            reply = await peer.post(node, "/__darkmatter__/peer_update", body)
            assert reply.status_code == 403, (name, reply.text)
            assert reply.json()["code"] == code, (name, reply.json())
        assert fingerprint(node) == before
        assert new_home.requests == [], "a refused peer_update made the node fetch the new URL"
        unknown = {**update(ts, good_sig), "agent_id": RawPeer().agent_id}
        assert (await peer.post(node, "/__darkmatter__/peer_update", unknown)).status_code == 404
        # a valid update is accepted once; the same bytes again are not later than the last one: refused
        same = {"agent_id": peer.agent_id, "new_url": peer.url, "public_key_hex": peer.identity.public_key_hex,
                "timestamp": ts, "signature": sign_peer_update(peer.identity, peer.agent_id, peer.url, ts)}
        first = await peer.post(node, "/__darkmatter__/peer_update", same)
        assert first.status_code == 200 and first.json() == {"success": True, "updated": False}
        replay = await peer.post(node, "/__darkmatter__/peer_update", same)
        assert replay.status_code == 403 and replay.json()["code"] == "stale_timestamp"


async def test_peer_lookup_answers_pointing_at_an_impostor_are_ignored(tmp_path):
    """§6.2: several connections name an impostor URL for B; its well-known shows another key, so A keeps
    B's URL and never sends B's message to the impostor."""
    b = RawPeer(f"http://127.0.0.1:{free_port()}")  # B is down
    impostor_key = RawPeer().identity.public_key_hex
    async with CaptureServer(lambda req: Answer(body=well_known_doc(b.agent_id, impostor_key, "http://x"))) as imp:
        lookup = {"agent_id": b.agent_id, "url": imp.url, "status": "connected"}
        liars = [CaptureServer(lambda req: Answer(body=lookup)) for _ in range(3)]
        async with node_context(tmp_path) as a, liars[0] as l0, liars[1] as l1, liars[2] as l2:
            await b.connect(a)
            for srv in (l0, l1, l2):
                await RawPeer(srv.url).connect(a)
            sent = await actions.send_message(a, "for B only", b.agent_id)
            assert sent["deliveries"][b.agent_id]["state"] == "queued"
            assert await wait_for(lambda: imp.requests, 15), "peer_lookup recovery never checked the answer"
            await wait_for(lambda: False, 1.0)
            assert all(srv.paths() == [f"/__darkmatter__/peer_lookup/{b.agent_id}"] for srv in (l0, l1, l2))
            assert imp.paths() == ["/__darkmatter__/challenge"]  # §6.1: asked to prove B's key, and failed
            assert a.connections[b.agent_id]["agent_url"] == b.url
            assert any(e["target_agent_id"] == b.agent_id for e in a.state["outbox"])


async def test_an_unauthenticated_re_request_cannot_switch_on_downgrade_protection(tmp_path):
    """§3.3: only an authenticated v2 signature makes a peer "known 0.3". Otherwise anyone could re-send a
    connection_request claiming protocol 0.3 for a 0.2 peer, and the node would then refuse that peer's
    v1-only messages and unsigned webhook updates (a denial of service against 0.2 peers, §1.3)."""
    async with node_context(tmp_path) as node:
        keyed = RawPeer(agent_id=str(uuid.uuid4()))  # a 0.2 node: key presented, nothing signed
        keyless = RawPeer(agent_id=str(uuid.uuid4()), keyed=False)
        for legacy in (keyed, keyless):
            assert (await legacy.connect(node, sign=False))["auto_accepted"] is True
        mid = (await actions.send_message(node, "question", keyless.agent_id))["message_id"]
        attacker_a = RawPeer(agent_id=keyed.agent_id)
        forged_a = attacker_a.connection_request(sign=False, protocol_version="0.3",
                                                 from_agent_public_key_hex=keyed.identity.public_key_hex)
        attacker_b = RawPeer(agent_id=keyless.agent_id)
        forged_b = attacker_b.connection_request(sign=True, protocol_version="0.3")
        for attacker, body in ((attacker_a, forged_a), (attacker_b, forged_b)):
            reply = await attacker.post(node, "/__darkmatter__/connection_request", body)
            assert reply.status_code in (200, 403), reply.text
        # the real 0.2 peers still get through
        v1_only = await keyed.post(node, MSG, keyed.message(node, "0.2 message", v2=False))
        assert v1_only.status_code == 200, v1_only.text
        assert node.state["inbox"][-1]["signature_version"] == 1
        update = await keyless.post(node, f"/__darkmatter__/webhook/{mid}",
                                    {"type": "response", "agent_id": keyless.agent_id, "response": "0.2 answer"})
        assert update.status_code == 200, update.text


async def test_an_older_peer_update_checked_while_a_newer_one_lands_is_refused(tmp_path):
    """§6.3: an update is applied only if it is later than the last accepted one when it is applied, not only
    when it arrived. The older update's URL check is held back while a newer update lands; applying the
    older one afterwards would move the last accepted timestamp back and let the newer one be replayed."""
    from urllib.parse import urlsplit

    from darkmatter.identity import peer_update_string
    from darkmatter.testing.harness import Harness

    async with Harness(tmp_path, "memory") as dm:
        a, b = await dm.mesh(2)
        moved = await dm.restart(b, move=True)

        def update(ts: str) -> dict:
            return {"agent_id": b.agent_id, "new_url": moved.base_url, "timestamp": ts,
                    "public_key_hex": b.public_key_hex,
                    "signature": moved.sign(peer_update_string(b.agent_id, moved.base_url, ts))}

        older, newer = update(now_iso()), update(now_iso())
        held = dm.network.delay(0.5, urlsplit(a.base_url).hostname, urlsplit(moved.base_url).hostname)
        first = asyncio.create_task(dm.post(a, "/__darkmatter__/peer_update", older))
        await asyncio.sleep(0.1)  # the older update is now waiting on its URL check
        dm.network.delays.remove(held)
        landed = await dm.post(a, "/__darkmatter__/peer_update", newer)
        assert landed.status == 200 and landed.body["updated"] is True, landed
        late = await first
        assert late.status == 403 and late.body["code"] == "stale_timestamp", late
        conn = a.connections[b.agent_id]
        assert conn["agent_url"] == moved.base_url and conn["last_peer_update_ts"] == newer["timestamp"]
        replay = await dm.post(a, "/__darkmatter__/peer_update", newer)
        assert replay.status == 403 and replay.body["code"] == "stale_timestamp", replay
