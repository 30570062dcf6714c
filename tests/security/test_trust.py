"""Trust holes of issue 14 (docs/protocol.md revision 2): one black-box case per property, each failing on the
code before the fix. Real nodes (loopback HTTP, or the memory transport where the transport does not
matter), real MCP clients and real subprocesses; evil peers are hand-driven servers and ``RawPeer`` keys.

The README of this directory maps every case to its rule.
"""

from __future__ import annotations

import json
import uuid

import pytest
from dm_acceptance import Answer, CaptureServer, free_port, wait_for, well_known_doc

from darkmatter.identity import Identity, v2_string
from darkmatter.mesh import outbound as actions
from darkmatter.testing import PeerServer, RawPeer, connect, make_node, node_context
from darkmatter.tools import Session
from darkmatter.wire import new_message_id, now_iso

pytestmark = pytest.mark.anyio

MSG = "/__darkmatter__/message"
DEEP = b"[" * 60000  # a peer's reply nested far deeper than any parser's recursion limit


def lookup_answer(agent_id: str, url: str) -> dict:
    return {"agent_id": agent_id, "url": url, "status": "connected"}


async def lose_url(a, b) -> str:
    """A's stored URL for B points nowhere (B moved and its peer_update was lost): the next send to B fails
    with a connect error and A runs peer_lookup recovery (§6.2)."""
    dead = f"http://127.0.0.1:{free_port()}"
    a.connections[b.agent_id]["agent_url"] = dead
    return dead


# --- 2. proof of possession before a learned URL is used (§6.1) -----------------------------------------


async def test_a_copy_of_the_well_known_document_no_longer_wins_peer_lookup(tmp_path):
    """§6.1, §6.2: three connections name an impostor that serves a byte-exact copy of B's well-known document
    (B's real key); one names B's real URL. Only the real URL signs A's nonce, so A adopts it and B gets the
    message; the impostor is asked the challenge and never sees the message."""
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        await connect(a, b)
        forged = Identity.generate()

        def impostor_answer(req):
            if req.path == "/.well-known/darkmatter.json":
                return Answer(body=well_known_doc(b.agent_id, b.public_key_hex, imp.url))
            if req.path == "/__darkmatter__/challenge":  # it cannot sign with B's key: it signs with its own
                asked, ts = req.json(), now_iso()
                return Answer(body={"agent_id": b.agent_id, "url": imp.url, "timestamp": ts, "signature_v2_hex":
                                    forged.sign(v2_string("challenge", asked["nonce"], b.agent_id, a.agent_id,
                                                          imp.url, ts))})
            return Answer()

        async with CaptureServer(impostor_answer) as imp:
            liars = [CaptureServer(lambda req: Answer(body=lookup_answer(b.agent_id, imp.url))) for _ in range(3)]
            honest = CaptureServer(lambda req: Answer(body=lookup_answer(b.agent_id, b.base_url)))
            async with liars[0] as l0, liars[1] as l1, liars[2] as l2, honest as h:
                for server in (l0, l1, l2, h):
                    await RawPeer(server.url).connect(a)
                await lose_url(a, b)
                sent = await actions.send_message(a, "for B only", b.agent_id)
                assert await wait_for(lambda: any(m["message_id"] == sent["message_id"] for m in b.state["inbox"]),
                                      20), "B never got the message after recovery"
                assert a.connections[b.agent_id]["agent_url"] == b.base_url
                assert "/__darkmatter__/challenge" in imp.paths("POST")
                assert MSG not in imp.paths(), "the impostor received a message meant for B"


async def test_a_discovered_url_is_recorded_only_once_it_proved_the_key(tmp_path):
    """§6.1, §8.1: a port serving a copy of a real node's well-known document is not recorded as that node;
    the node's own port, which signs the nonce, is."""
    async with node_context(tmp_path / "b") as b:
        doc = well_known_doc(b.agent_id, b.public_key_hex, b.base_url)
        async with PeerServer(None, doc) as impostor:
            scanner = make_node(tmp_path / "scanner", plugins="http_transport,discovery_local",
                                DARKMATTER_DISCOVERY="true", DARKMATTER_DISCOVERY_INTERVAL="3600",
                                DARKMATTER_DISCOVERY_PORTS=f"{impostor.port},{b.port}")
            async with scanner:
                result = await scanner.tools["darkmatter_discover_local"].handler(scanner, {}, Session())
                urls = [p["url"] for p in result["peers"] if p["agent_id"] == b.agent_id]
                assert urls == [b.base_url], result
                assert ("POST", "/__darkmatter__/challenge") in impostor.requests


async def test_a_replayed_lan_beacon_does_not_point_a_peer_elsewhere(tmp_path):
    """§6.1, §8.2: B's genuine signed beacon, replayed within its 300 s from another address (127.0.0.2, where an
    impostor serves a copy of B's document on B's port), is fresh and verifies; but that address cannot sign
    for B, so the listener never records B there. B's own beacon, from B's address, is recorded."""
    import asyncio
    import socket

    from darkmatter_discovery_lan import build_beacon, encode

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        udp = sock.getsockname()[1]
    async with node_context(tmp_path / "b") as b:
        doc = json.dumps(well_known_doc(b.agent_id, b.public_key_hex, b.base_url)).encode()
        asked: list[bytes] = []

        async def impostor(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            asked.append(head.split(b" ", 2)[1])
            status, body = (200, doc) if b" /.well-known/darkmatter.json " in head else (404, b"{}")
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body))
                         + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(impostor, "127.0.0.2", b.port)
        try:
            listener = make_node(tmp_path / "listener", plugins="http_transport,discovery_lan",
                                 DARKMATTER_DISCOVERY="true", DARKMATTER_LAN_PORT=str(udp),
                                 DARKMATTER_LAN_INTERFACE="127.0.0.1")
            async with listener:
                source = next(s for s in listener.discovery_sources if s.name == "lan")
                assert await wait_for(lambda: source._listener is not None)
                beacon = encode(build_beacon(b))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    out.bind(("127.0.0.2", 0))
                    out.sendto(beacon, ("127.0.0.1", udp))  # the replay, from the impostor's address
                assert await wait_for(lambda: asked, 10), "the replayed beacon was never looked at"
                await listener.discovery_settled()
                assert b.agent_id not in listener.discovered, listener.discovered
                assert b"/__darkmatter__/challenge" in asked
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    out.sendto(beacon, ("127.0.0.1", udp))  # the same beacon from B's own address
                assert await wait_for(lambda: b.agent_id in listener.discovered, 10)
                assert listener.discovered[b.agent_id]["url"] == b.base_url
        finally:
            server.close()


# --- 6. everything a peer sends back is parsed strictly (§2.1) -------------------------------------------


async def test_deeply_nested_peer_lookup_answer_does_not_abort_recovery(tmp_path):
    """§2.1, §6.2: one connection answers peer_lookup with JSON nested 60 000 deep; that answer is a failed
    call, and the honest answer of another connection still heals the connection."""
    async with node_context(tmp_path / "a") as a, node_context(tmp_path / "b") as b:
        await connect(a, b)
        async with CaptureServer(lambda req: Answer(body=DEEP)) as deep, \
                CaptureServer(lambda req: Answer(body=lookup_answer(b.agent_id, b.base_url))) as honest:
            for server in (deep, honest):
                await RawPeer(server.url).connect(a)
            await lose_url(a, b)
            sent = await actions.send_message(a, "still arrives", b.agent_id)
            assert await wait_for(lambda: any(m["message_id"] == sent["message_id"] for m in b.state["inbox"]), 20)
            assert deep.paths() == [f"/__darkmatter__/peer_lookup/{b.agent_id}"]
            assert a.connections[b.agent_id]["agent_url"] == b.base_url


async def test_deeply_nested_webhook_answer_does_not_abort_a_forward(tmp_path):
    """§2.1, §5.3 step 4: the webhook's GET answers nested JSON; the forward goes on with local loop detection
    and a warning, instead of failing with an internal error."""
    async with CaptureServer(lambda req: Answer(body=DEEP)) as owner, node_context(tmp_path / "a") as a, \
            node_context(tmp_path / "c") as c:
        sender = RawPeer(owner.url)
        await sender.connect(a)
        await connect(a, c)
        mid = new_message_id()
        reply = await sender.post(a, MSG, sender.message(a, "please forward", message_id=mid))
        assert reply.status_code == 200, reply.text
        result = await actions.forward_message(a, mid, c.agent_id)
        assert result["success"] is True and "warning" in result, result
        assert await wait_for(lambda: any(m["message_id"] == mid for m in c.state["inbox"]), 10)


async def test_deeply_nested_well_known_does_not_abort_a_discovery_scan(tmp_path):
    """§2.1, §8.1: one scanned port answers nested JSON; the scan still records the real node on another."""
    async with node_context(tmp_path / "b") as b, CaptureServer(lambda req: Answer(body=DEEP)) as deep:
        scanner = make_node(tmp_path / "scanner", plugins="http_transport,discovery_local",
                            DARKMATTER_DISCOVERY="true", DARKMATTER_DISCOVERY_INTERVAL="3600",
                            DARKMATTER_DISCOVERY_PORTS=f"{deep.port},{b.port}")
        async with scanner:
            result = await scanner.tools["darkmatter_discover_local"].handler(scanner, {}, Session())
            assert [p["agent_id"] for p in result["peers"]] == [b.agent_id]
            assert deep.paths() == ["/.well-known/darkmatter.json"] * len(deep.paths()) and deep.paths()


# --- 1. webhook updates only from the message's route (§5.6) ---------------------------------------------


def signed_update(signer, mid: str, kind: str, agent_id: str, target: str | None = None,
                  text: str | None = None) -> dict:
    from darkmatter.identity import v2_webhook_update

    ts = now_iso()
    body = {"type": kind, "agent_id": agent_id, "timestamp": ts, "from_public_key_hex": agent_id,
            "signature_v2_hex": signer.sign(v2_webhook_update(mid, kind, agent_id, target, ts, text, {}))}
    if target is not None:
        body["target_agent_id"] = target
    if kind == "response":
        body.update(response=text, metadata={})
    return body


async def test_only_agents_on_the_route_can_update_a_webhook(tmp_path):
    """§5.6: an outsider who learned the message_id, and a connection that never held the message (even with a
    valid signature), get 403 ``not_on_route`` for every update type, and the message stays active. A 0.2
    route member's unsigned answers fill only their own cap of 10; the recipient's signed answer still lands,
    and becomes the answer."""
    from darkmatter.testing.harness import Harness

    async with Harness(tmp_path, "memory") as dm:
        a, b, c = await dm.node(), await dm.node(), await dm.node()
        await dm.connect(b, a)
        await dm.connect(c, a)
        legacy = RawPeer(dm.raw_url("legacy"), agent_id=str(uuid.uuid4()))  # a 0.2 node: keyed, signs nothing
        joined = await dm.post(a, "/__darkmatter__/connection_request", legacy.connection_request(sign=False))
        assert joined.status == 200 and joined.body["auto_accepted"] is True, joined.body
        mid = (await actions.send_message(a, "question", b.agent_id))["message_id"]
        path = f"/__darkmatter__/webhook/{mid}"
        record = a.state["sent_messages"][mid]
        made_up = str(uuid.uuid4())
        forged = {
            "outsider response": {"type": "response", "agent_id": made_up, "response": "done!", "metadata": {}},
            "outsider expired": {"type": "expired", "agent_id": made_up, "note": "gone"},
            "outsider forwarded": {"type": "forwarded", "agent_id": made_up, "target_agent_id": made_up},
            "signed response from a connection off the route": signed_update(c, mid, "response", c.agent_id,
                                                                            text="I never got it"),
            "signed forward from a connection off the route": signed_update(c, mid, "forwarded", c.agent_id,
                                                                           target=made_up),
            "unsigned response from a 0.2 connection off the route": {
                "type": "response", "agent_id": legacy.agent_id, "response": "me neither", "metadata": {}},
        }
        for name, body in forged.items():
            reply = await dm.post(a, path, body)
            assert reply.status == 403 and reply.body["code"] == "not_on_route", (name, reply.body)
        assert record["status"] == "active" and record["responses"] == [] and record["updates"] == []
        assert (await dm.get(a, path)).body["status"] == "active"  # forwarders keep forwarding

        mid = (await actions.send_message(a, "second question"))["message_id"]  # to B, C and the 0.2 peer
        path = f"/__darkmatter__/webhook/{mid}"
        record = a.state["sent_messages"][mid]
        for i in range(10):
            reply = await dm.post(a, path, {"type": "response", "agent_id": legacy.agent_id,
                                            "response": f"unsigned {i}", "metadata": {}})
            assert reply.status == 200 and reply.body["verified"] is False, reply.body
        eleventh = await dm.post(a, path, {"type": "response", "agent_id": legacy.agent_id, "response": "more",
                                           "metadata": {}})
        assert eleventh.status == 429 and eleventh.body["code"] == "capacity"
        answer = await actions.respond_message(b, mid, "the signed answer")
        assert answer["delivery"] == "delivered", answer
        assert record["response"]["response"] == "the signed answer" and record["response"]["verified"] is True
        assert record["status"] == "responded"


# --- 3. the private key never in an MCP result, HTTP response or log (§12.3) -----------------------------


def mcp_client(node, headers: dict | None = None):
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(trust_env=False, headers=headers or {}, timeout=httpx2.Timeout(30.0, read=60.0))
    return Client(streamable_http_client(f"http://127.0.0.1:{node.port}/mcp", http_client=http))


async def test_authenticate_gives_a_backup_file_never_the_key_and_the_cli_restores_it(tmp_path):
    """§12.3: a loopback session (as every spawned agent is) calling darkmatter_authenticate gets the path of a
    0600 backup file and the public key, never the private key; `darkmatter identity restore` brings the same
    identity back into a new state file, and a node started there is the same agent."""
    from dm_acceptance import run_cli

    async with node_context(tmp_path / "a") as node:
        private = node.state["private_key_hex"]
        async with mcp_client(node) as c:
            result = await c.call_tool("darkmatter_authenticate", {})
            assert not result.is_error, result.content
            assert private not in json.dumps(result.model_dump())
            backup = result.structured_content["identity_backup"]
        agent_id = node.agent_id
    from pathlib import Path

    path = Path(backup)
    assert path.stat().st_mode & 0o777 == 0o600 and json.loads(path.read_text())["private_key_hex"] == private
    fresh = tmp_path / "elsewhere" / "state.json"
    done = run_cli(tmp_path, "identity", "restore", str(path), "--state-file", str(fresh))
    assert done.returncode == 0, done.stderr
    assert private not in done.stdout + done.stderr
    async with node_context(tmp_path / "b", DARKMATTER_STATE_FILE=str(fresh)) as restored:
        assert restored.agent_id == agent_id
    other = tmp_path / "other.json"
    async with node_context(tmp_path / "c", DARKMATTER_STATE_FILE=str(other)):
        pass
    refused = run_cli(tmp_path, "identity", "restore", str(path), "--state-file", str(other))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--replace" in refused.stderr


# --- 7. forwarding headers on mesh routes (§2.1) ---------------------------------------------------------

PROXY = {"X-Forwarded-For": "198.51.100.7"}


async def test_a_request_through_a_same_host_proxy_is_not_a_loopback_caller(tmp_path):
    """§2.1: a mesh request from 127.0.0.1 carrying X-Forwarded-For came through a reverse proxy: network_info
    hides the peer list from it as from any stranger, and its connection requests share one rate-limit bucket
    instead of one per claimed id (5 per minute, then 429)."""
    from darkmatter.testing import client

    async with node_context(tmp_path / "a", DARKMATTER_GENESIS="false") as a, node_context(tmp_path / "b") as b:
        await connect(a, b)
        async with client(a) as http:
            direct = (await http.get("/__darkmatter__/network_info")).json()
            assert [p["agent_id"] for p in direct["peers"]] == [b.agent_id]  # a loopback caller sees them
            for header in ({"X-Forwarded-For": "198.51.100.7"}, {"X-Real-IP": "198.51.100.7"},
                           {"Forwarded": "for=198.51.100.7"}):
                proxied = await http.get("/__darkmatter__/network_info", headers=header)
                assert proxied.status_code == 200 and proxied.json()["peers"] == [], header
            codes = []
            for _ in range(6):
                peer = RawPeer()
                reply = await http.post("/__darkmatter__/connection_request", json=peer.connection_request(),
                                        headers=PROXY)
                codes.append(reply.status_code)
            assert codes == [200] * 5 + [429], codes


async def test_a_trusted_proxy_gives_each_client_its_own_bucket(tmp_path):
    """§2.1: with DARKMATTER_TRUSTED_PROXIES naming the proxy, the client it names is the rate-limit key."""
    from darkmatter.testing import client

    async with node_context(tmp_path / "a", DARKMATTER_GENESIS="false",
                            DARKMATTER_TRUSTED_PROXIES="127.0.0.1") as a:
        async with client(a) as http:
            codes = {}
            for who in ("198.51.100.7", "198.51.100.8"):
                codes[who] = [(await http.post("/__darkmatter__/connection_request",
                                               json=RawPeer().connection_request(),
                                               headers={"X-Forwarded-For": f"10.9.9.9, {who}"})).status_code
                              for _ in range(6)]
            assert codes == {w: [200] * 5 + [429] for w in codes}, codes


# --- 8. a node that advertises a public address is not "local" (§7.3) ------------------------------------


async def test_a_wildcard_node_with_a_public_url_does_not_reach_unknown_private_targets(tmp_path):
    """§6.5, §7.3: a wildcard-bound node (not serving here: nothing listens on 0.0.0.0) whose IP lookup gave it
    a public URL is not local, so a webhook on a loopback origin it does not know is blocked, and nothing is
    sent there."""
    from darkmatter.api import Caller, handle

    async with CaptureServer(lambda req: Answer(body={"ip": "8.8.8.8"})) as lookup, \
            CaptureServer() as internal:
        node = make_node(tmp_path / "n", DARKMATTER_HOST="0.0.0.0", DARKMATTER_IP_LOOKUP_URL=lookup.url + "/ip",
                         DARKMATTER_ADDRESS_INTERVAL="0.05")
        await node.start(serve=False)
        try:
            assert await wait_for(lambda: "8.8.8.8" in node.base_url, 10), node.base_url
            peer = RawPeer("http://127.0.0.1:9")
            caller = Caller(ip="192.0.2.10", host="example.net")
            await handle(node, "connection_request", caller, peer.connection_request())
            mid = new_message_id()
            hook = f"{internal.url}/__darkmatter__/webhook/{mid}"
            await handle(node, "message", caller, peer.message(node, "hi", message_id=mid, webhook=hook))
            with pytest.raises(Exception, match="Webhook blocked"):
                await actions.respond_message(node, mid, "internal data")
            assert internal.requests == []
        finally:
            await node.stop()


# --- 5. no lock-out (§13.2) -----------------------------------------------------------------------------


async def test_a_flood_of_fresh_identities_never_locks_a_real_peer_out(tmp_path):
    """§13.2: 100 fresh identities fill a genesis node's 50 connections and would fill its 50 pending slots
    for 7 days; a real peer arriving afterwards still connects (a probationary flood connection gives way,
    with a signed disconnect), and a peer that already exchanged a message is never the one evicted. On a
    manual node, the oldest unvouched pending request gives way; a vouched-for one stays. Rate limits are off:
    they bound how fast a flood arrives (§13.1), not whether it can lock anyone out."""
    from darkmatter.testing.harness import Harness

    async with Harness(tmp_path, "memory") as dm:
        genesis = await dm.node(DARKMATTER_RATE_LIMITS="off")
        friend = await dm.node()
        await dm.connect(friend, genesis)
        await actions.send_message(friend, "hello, I am real", genesis.agent_id)
        assert genesis.connections[friend.agent_id]["messages_received"] == 1
        flood = [RawPeer(dm.raw_url(f"fake{i}")) for i in range(100)]
        for fake in flood:
            reply = await dm.post(genesis, "/__darkmatter__/connection_request", fake.connection_request())
            assert reply.status == 200, reply.body
        real = await dm.node()
        result = await dm.connect(real, genesis)
        assert result["status"] == "connected", result
        assert real.agent_id in genesis.connections and friend.agent_id in genesis.connections
        assert len(genesis.connections) == 50
        assert any(n["type"] == "evicted" for n in genesis.state["notices"])

        manual = await dm.node(DARKMATTER_GENESIS="false", DARKMATTER_RATE_LIMITS="off")
        trusted = RawPeer(dm.raw_url("trusted"))
        await dm.post(manual, "/__darkmatter__/connection_request", trusted.connection_request())
        manual.state["impressions"][trusted.agent_id] = "a colleague; accept when back"
        for fake in flood[:60]:
            reply = await dm.post(manual, "/__darkmatter__/connection_request", fake.connection_request())
            assert reply.status == 200, reply.body
        late = RawPeer(dm.raw_url("late"))
        queued = await dm.post(manual, "/__darkmatter__/connection_request", late.connection_request())
        assert queued.status == 200 and queued.body["auto_accepted"] is False, queued.body
        waiting = {e["from_agent_id"] for e in manual.state["pending_requests"].values()}
        assert {late.agent_id, trusted.agent_id} <= waiting and len(waiting) == 50


# --- 4. spawned agents scoped to their message (§12.6) ----------------------------------------------------


async def test_a_spawned_agent_can_only_handle_its_own_message(tmp_path, monkeypatch):
    """§12.6: autospawn starts a (stand-in) agent for A's message. Prompt-injected, it tries to authenticate,
    disconnect its sender, go inactive, broadcast, list the owner's sent messages and read another inbox
    message: the node refuses each as a tool error, whatever the agent's allowlist says, and its inbox view
    holds only its own message. Its answer still reaches A."""
    import shlex
    import sys
    from pathlib import Path

    standin = Path(__file__).resolve().parents[2] / "plugins" / "autospawn" / "tests" / "standin_agent.py"
    records = tmp_path / "records"
    records.mkdir()
    other_id = "msg-the-owners-private-matter"
    monkeypatch.setenv("STANDIN_OTHER_MESSAGE", other_id)
    command = shlex.join([sys.executable, str(standin), "--mode", "overreach", "--record-dir", str(records)])
    env = {"DARKMATTER_AGENT_ENABLED": "true", "DARKMATTER_AGENT_COMMAND": command,
           "DARKMATTER_AGENT_ARGS": "--dangerously-skip-permissions"}  # the node's scope holds even so
    async with node_context(tmp_path / "b", plugins="http_transport,autospawn", **env) as b, \
            node_context(tmp_path / "a") as a:
        legacy = RawPeer(agent_id=str(uuid.uuid4()), keyed=False)  # unverified: starts no agent
        await legacy.connect(b, sign=False)
        private = legacy.message(b, "the owner's private matter", message_id=other_id)
        assert (await legacy.post(b, MSG, private)).status_code == 200
        await connect(a, b)
        sent = await actions.send_message(a, "please answer", b.agent_id)
        mid = sent["message_id"]
        record = a.state["sent_messages"][mid]
        assert await wait_for(lambda: record["status"] == "responded", 60), "the spawned agent never answered"
        seen = json.loads(next(records.glob("*.json")).read_text())
        outcomes = seen["overreach"]
        assert set(outcomes) == {"authenticate", "disconnect", "set_status", "send_message", "list_messages",
                                 "get_other_message"}
        for name, outcome in outcomes.items():
            assert outcome["is_error"] is True, (name, outcome)
        assert [m["message_id"] for m in seen["inbox_seen"]["messages"]] == [mid]
        assert "private matter" not in json.dumps(seen)
        assert a.agent_id in b.connections and b.state["status"] == "active"
        assert b.state["private_key_hex"] not in json.dumps(seen)
        assert len(b.state["sent_messages"]) == 0


# --- 9. small hardening -----------------------------------------------------------------------------------


async def test_state_and_token_files_are_never_opened_through_a_symlink(tmp_path):
    """A link planted at the state file's (or the token's) path is refused with a one-line error instead of
    being followed to a file of the planter's choosing."""
    from darkmatter.errors import StartupError
    from darkmatter.state import StateError

    async with node_context(tmp_path / "victim") as victim:
        target = victim.config.state_file
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / "state.json").symlink_to(target)
    node = make_node(planted, DARKMATTER_STATE_FILE=str(planted / "state.json"))
    with pytest.raises((StateError, StartupError), match="symbolic link|symlink"):
        await node.start()
    token_dir = tmp_path / "token"
    token_dir.mkdir(mode=0o700)
    (token_dir / "state.token").symlink_to(tmp_path / "elsewhere.txt")
    node = make_node(token_dir, DARKMATTER_STATE_FILE=str(token_dir / "state.json"))
    with pytest.raises(StartupError, match="symlink"):
        await node.start()
    assert not (tmp_path / "elsewhere.txt").exists()


async def test_a_shared_state_directory_is_warned_about(tmp_path, caplog):
    """A state directory other users can write to (like /tmp) gets a warning naming it."""
    import logging

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with caplog.at_level(logging.WARNING):
        async with node_context(tmp_path / "n", DARKMATTER_STATE_FILE=str(shared / "state.json")):
            pass
    assert any("shared with other users" in r.getMessage() and str(shared) in r.getMessage() for r in caplog.records)


async def test_webrtc_offers_from_keyless_connections_and_replayed_offers_are_refused(tmp_path):
    """§9.1: an unsigned offer claiming a keyless (0.2) connection cannot be verified, so it is refused before
    any WebRTC work; a signed offer seen before (a replay within its 300 s) is refused the second time."""
    from darkmatter.testing import client

    sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    async with node_context(tmp_path / "b", plugins="http_transport,webrtc_transport") as b:
        keyless = RawPeer(agent_id=str(uuid.uuid4()), keyed=False)
        await keyless.connect(b, sign=False)
        keyed = RawPeer()
        await keyed.connect(b)
        async with client(b) as http:
            reply = await http.post("/__darkmatter__/webrtc_offer",
                                    json={"from_agent_id": keyless.agent_id, "sdp_offer": sdp})
            assert reply.status_code == 403 and reply.json()["code"] == "signature_required", reply.text
            ts = now_iso()
            from darkmatter.wire import h

            offer = {"from_agent_id": keyed.agent_id, "to_agent_id": b.agent_id, "sdp_offer": sdp, "timestamp": ts,
                     "signature_v2_hex": keyed.identity.sign(v2_string("webrtc_offer", keyed.agent_id, b.agent_id,
                                                                       ts, h(sdp)))}
            first = await http.post("/__darkmatter__/webrtc_offer", json=offer)
            assert first.status_code != 403, first.text
            again = await http.post("/__darkmatter__/webrtc_offer", json=offer)
            assert again.status_code == 403 and "Replayed" in again.json()["error"], again.text


async def test_a_nul_byte_in_content_does_not_break_a_spawn(tmp_path):
    """A message whose content holds a NUL (valid JSON, valid UTF-8) still starts its agent, which answers; the
    agent's log file is private (0600)."""
    import shlex
    import sys
    from pathlib import Path

    standin = Path(__file__).resolve().parents[2] / "plugins" / "autospawn" / "tests" / "standin_agent.py"
    records = tmp_path / "records"
    records.mkdir()
    command = shlex.join([sys.executable, str(standin), "--mode", "respond", "--record-dir", str(records)])
    async with node_context(tmp_path / "b", plugins="http_transport,autospawn", DARKMATTER_AGENT_ENABLED="true",
                            DARKMATTER_AGENT_COMMAND=command) as b, node_context(tmp_path / "a") as a:
        await connect(a, b)
        mid = (await actions.send_message(a, "before\x00after", b.agent_id))["message_id"]
        record = a.state["sent_messages"][mid]
        assert await wait_for(lambda: record["status"] == "responded", 60), "no agent answered"
        logs = list((Path(b.config.state_file).parent / "logs").glob("*-agent-*.log"))
        assert logs and all(p.stat().st_mode & 0o777 == 0o600 for p in logs)
