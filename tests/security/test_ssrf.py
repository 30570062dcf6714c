"""Outbound request safety (docs/protocol.md §7, §2.6, §6.1, §13.3): webhook shape, address classes, redirects,
resolver failures, rebinding, slow and huge answers.

Address classes are checked at unit level on ``darkmatter.wire.classify`` and end to end: a message whose
webhook points at a blocked literal is never answered or forwarded ("Webhook blocked"), and a capture
server on another loopback port shows what actually left the node.

Every async test here runs on a :class:`dm_acceptance.ResolverLoop`: names under ``.test`` get the addresses
the test scripts (one list per lookup, so a name can be "rebound" between two lookups) and each lookup is
counted; every other name goes to the system resolver unchanged. How many bytes the node read from an
answer is counted by the HTTP client itself (:func:`dm_acceptance.count_reads`).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from dm_acceptance import (Answer, CaptureServer, ResolverLoop, capture_pair, count_reads, resolver,
                           sign_peer_update, wait_for, well_known_doc)

from darkmatter.api import Blocked
from darkmatter.mesh import outbound as actions
from darkmatter.mesh.dispatch import call
from darkmatter.wire import classify, literal_class
from darkmatter_http_transport.client import Net
from darkmatter.testing import RawPeer, node_context
from darkmatter.tools import ToolError
from darkmatter.wire import new_message_id, now_iso

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio", {"loop_factory": ResolverLoop}

NEVER = [
    "169.254.169.254", "169.254.0.1", "100.100.100.200", "fd00:ec2::254", "fe80::1", "fe80::1%eth0", "febf::1",
    "::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "::ffff:0.0.0.0", "::ffff:224.0.0.1",
    "64:ff9b::a9fe:a9fe", "64:ff9b::ffff:ffff", "2002:a9fe:a9fe::1", "::a9fe:a9fe",
    "0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "239.77.68.77", "ff02::1", "255.255.255.255", "240.0.0.1",
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1", "2001:db8::1", "not-an-address",
]
LOCAL = ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "10.0.0.1",
         "172.16.0.1", "192.168.1.1", "100.64.0.1", "::ffff:10.0.0.1", "fc00::1", "fd12::1"]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", NEVER)
def test_never_class_addresses_are_never(address):
    assert classify(address) == "never"


@pytest.mark.parametrize("address", LOCAL)
def test_loopback_and_private_addresses_are_local(address):
    assert classify(address) == "local"


@pytest.mark.parametrize("address", GLOBAL)
def test_global_unicast_is_global(address):
    assert classify(address) == "global"


def test_literal_class_of_url_hosts():
    assert literal_class("[::1]") == "local"
    assert literal_class("[::ffff:169.254.169.254]") == "never"
    assert literal_class("example.org") is None


async def test_check_resolves_once_and_checks_every_numeric_form():
    dns = resolver()
    net = Net(lambda: True, lambda url: False)
    try:
        # numeric spellings a resolver turns into the metadata address are blocked after resolution
        for host in ("2852039166", "0251.0376.0251.0376", "0xa9.0xfe.0xa9.0xfe", "0", "[::ffff:a9fe:a9fe]"):
            with pytest.raises(Blocked, match="never-allowed"):
                await net.check(f"http://{host}/__darkmatter__/webhook/msg-1", strict=True)
        # one lookup per check, and the address returned is the one that lookup gave and the check passed,
        # although a second lookup would say otherwise (a rebinding resolver)
        dns.answer("rebind.test", ["127.0.0.1"], ["169.254.169.254"])
        assert await net.check("http://rebind.test:9/x", strict=True) == "127.0.0.1"
        assert dns.lookups["rebind.test"] == 1
        # every address of the answer is checked, not only the first
        dns.answer("mixed.test", ["127.0.0.1", "169.254.169.254"])
        with pytest.raises(Blocked, match="169.254.169.254.*never-allowed"):
            await net.check("http://mixed.test:9/x", strict=True)
        assert dns.lookups["mixed.test"] == 1
        # a name that cannot resolve is blocked (fail closed); this one fails locally, without DNS
        with pytest.raises(Blocked, match="cannot resolve"):
            await net.check("http://" + "a" * 64 + ".example/x", strict=True)
        dns.answer("nothing.test", [])
        with pytest.raises(Blocked, match="cannot resolve"):
            await net.check("http://nothing.test/x", strict=True)
        assert await net.check("http://[::1]:9/x", strict=True) == "::1"
        assert await net.check("http://127.0.0.1:9/x", strict=True) == "127.0.0.1"
    finally:
        await net.aclose()


async def test_non_local_node_refuses_private_targets_it_does_not_know():
    net = Net(lambda: False, lambda url: url.startswith("http://127.0.0.1:7"))
    try:
        with pytest.raises(Exception, match="not local"):
            await net.check("http://10.1.2.3/x", strict=True)
        assert await net.check("http://127.0.0.1:7/x", strict=True) == "127.0.0.1"  # a known origin
        reply = await net.request("POST", "http://192.168.7.7:9/__darkmatter__/webhook/m", json_body={},
                                  strict=True)
        assert reply.status is None and reply.error_kind == "blocked"
    finally:
        await net.aclose()


# --- webhook shape on receipt (§7.1, §4.7 step 5) -----------------------------------------------------

BAD_WEBHOOKS = {
    "not a webhook path": "http://127.0.0.1:9/admin",
    "dot-dot segment": "http://127.0.0.1:9/__darkmatter__/webhook/../webhook/{id}",
    "dot segment": "http://127.0.0.1:9/x/./__darkmatter__/webhook/{id}",
    "encoded dot-dot": "http://127.0.0.1:9/%2e%2e/__darkmatter__/webhook/{id}",
    "encoded id": "http://127.0.0.1:9/__darkmatter__/webhook/%6d{id}",
    "backslash": "http://127.0.0.1:9/a\\b/__darkmatter__/webhook/{id}",
    "query": "http://127.0.0.1:9/__darkmatter__/webhook/{id}?next=http://169.254.169.254/",
    "fragment": "http://127.0.0.1:9/__darkmatter__/webhook/{id}#x",
    "userinfo": "http://user:pw@127.0.0.1:9/__darkmatter__/webhook/{id}",
    "other message id": "http://127.0.0.1:9/__darkmatter__/webhook/msg-other",
    "scheme": "file:///__darkmatter__/webhook/{id}",
    "whitespace": "http://127.0.0.1:9/__darkmatter__/webhook/ {id}",
    "too long": "http://127.0.0.1:9/" + "a/" * 1100 + "__darkmatter__/webhook/{id}",
    "bad port": "http://127.0.0.1:99999/__darkmatter__/webhook/{id}",
}


async def test_webhooks_with_other_shapes_are_refused_on_receipt(tmp_path):
    async with node_context(tmp_path) as node:
        peer = RawPeer()
        await peer.connect(node)
        for name, template in BAD_WEBHOOKS.items():
            mid = new_message_id()
            body = peer.message(node, "x", message_id=mid, webhook=template.replace("{id}", mid))
            reply = await peer.post(node, "/__darkmatter__/message", body)
            assert reply.status_code == 400, name
            assert reply.json()["error"].startswith("Invalid webhook") or reply.json()["code"] == "invalid_field", name
        assert node.state["inbox"] == []


# --- blocked webhook targets end to end (§7.3, §7.4) ---------------------------------------------------

BLOCKED_HOSTS = ["169.254.169.254", "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]", "[fe80::1]",
                 "0.0.0.0", "100.100.100.200", "[fd00:ec2::254]", "224.0.0.1", "2852039166",
                 "a" * 64 + ".example"]


async def test_respond_and_forward_to_a_blocked_webhook_say_webhook_blocked(tmp_path):
    async with CaptureServer() as target_srv, node_context(tmp_path) as node:
        peer = RawPeer()
        await peer.connect(node)
        target = RawPeer(target_srv.url)
        await target.connect(node)
        mids = []
        for host in BLOCKED_HOSTS:
            mid = new_message_id()
            body = peer.message(node, f"to {host}", message_id=mid,
                                webhook=f"http://{host}/__darkmatter__/webhook/{mid}")
            reply = await peer.post(node, "/__darkmatter__/message", body)
            if reply.status_code == 400:  # refusing it on receipt is fine too
                continue
            assert reply.status_code == 200, (host, reply.text)
            mids.append(mid)
        assert mids, "every blocked webhook was refused on receipt"
        for mid in mids:
            with pytest.raises(ToolError, match="Webhook blocked"):
                await actions.respond_message(node, mid, "an answer")
            with pytest.raises(ToolError, match="Webhook blocked"):
                await actions.forward_message(node, mid, target.agent_id)
        # the messages stay in the inbox (§7.4) and nothing was forwarded or queued
        assert {m["message_id"] for m in node.state["inbox"]} == set(mids)
        assert node.state["outbox"] == []
        assert target_srv.requests == []


# --- redirects are never followed (§7.2) ----------------------------------------------------------------


async def test_redirects_from_webhooks_and_well_known_are_not_followed(tmp_path):
    async with CaptureServer() as sink, node_context(tmp_path) as node:
        async with CaptureServer(lambda req: Answer(302, {}, {"Location": sink.url + req.path})) as redirector, \
                CaptureServer() as next_hop:
            peer = RawPeer()
            await peer.connect(node)
            target = RawPeer(next_hop.url)
            await target.connect(node)
            mid = new_message_id()
            body = peer.message(node, "q", message_id=mid,
                                webhook=f"{redirector.url}/__darkmatter__/webhook/{mid}")
            assert (await peer.post(node, "/__darkmatter__/message", body)).status_code == 200
            # forward: the webhook GET answers 302 -> not followed, the forward goes on with a warning
            result = await actions.forward_message(node, mid, target.agent_id)
            assert result["delivery"] == "delivered" and "webhook" in result["warning"].lower()
            assert next_hop.paths("POST") == ["/__darkmatter__/message"]
            # respond: the POST answers 302 -> a failed delivery, never retried at the Location
            answer = await actions.respond_message(node, mid, "done")
            assert answer["delivery"] == "failed" and "302" in (answer["last_error"] or "")
            # connecting to a node whose well-known and connection_request redirect fails cleanly
            connected = await actions.request_connection(node, redirector.url)
            assert connected["status"] == "failed"
            assert await wait_for(lambda: len([r for r in redirector.requests if r.method == "POST"]) >= 3, 5)
            assert sink.requests == [], "a redirect was followed"
            assert redirector.url not in {c["agent_url"] for c in node.connections.values()}


# --- rebinding: one resolution, the checked address, the original Host ----------------------------------


async def test_a_name_is_resolved_once_and_the_request_keeps_its_host_header(tmp_path):
    """A name whose second lookup points elsewhere (DNS rebinding): the node looks it up once, connects to
    the address it checked, and still sends the name in Host."""
    dns = resolver()
    async with capture_pair("127.0.0.1", "127.0.0.2") as (checked, rebound), node_context(tmp_path) as node:
        dns.answer("rebind.test", ["127.0.0.1"], ["127.0.0.2"])
        reply = await call(node, "GET", f"http://rebind.test:{checked.port}/__darkmatter__/status", strict=True)
        assert reply.status == 200, reply.error
        assert dns.lookups["rebind.test"] == 1
        assert len(checked.requests) == 1 and rebound.requests == []
        assert checked.requests[0].headers["host"] == f"rebind.test:{checked.port}"
        # the same for the name the node's own host has (the real resolver, no script)
        reply = await call(node, "GET", f"http://localhost:{checked.port}/__darkmatter__/status", strict=True)
        assert reply.status == 200 and checked.requests[1].headers["host"] == f"localhost:{checked.port}"


# --- slow and huge answers (§7.2, §13.3) -------------------------------------------------------------------


async def test_huge_answers_are_cut_at_the_read_cap(tmp_path):
    """Answers of 10 MiB: the node reads at most the cap (64 KiB for a well-known, 1 MiB for the answer to a
    POST) plus the one network chunk that crossed it -- nothing when the Content-Length already says too much."""
    ten_mib = 10 * 1024 * 1024
    chunk = 64 * 1024  # the capture server writes 64 KiB pieces; one may cross the cap
    async with node_context(tmp_path) as node, \
            CaptureServer(lambda req: Answer(huge=ten_mib)) as sized, \
            CaptureServer(lambda req: Answer(huge=ten_mib, chunked=True)) as chunked:
        reads = await count_reads(node)
        for srv in (sized, chunked):
            key = f"127.0.0.1:{srv.port}"
            reply = await call(node, "GET", srv.url + "/.well-known/darkmatter.json", max_bytes=64 * 1024)
            assert reply.status is None and "larger than 65536 bytes" in reply.error
            if srv is sized:
                assert reads.read[key] == 0, "a declared length over the cap is refused before reading"
            else:
                assert 64 * 1024 < reads.read[key] <= 64 * 1024 + chunk, reads.read[key]
            before = reads.read[key]
            result = await actions.request_connection(node, srv.url)  # GET well-known, POST connection_request
            assert result["status"] == "failed"
            assert reads.read[key] - before <= (64 * 1024 + chunk) + (1024 * 1024 + chunk), reads.read[key] - before
        assert node.connections == {}
        # a /message recipient answering a huge body: the delivery fails, it is not retried forever
        peer = RawPeer(chunked.url)
        await peer.connect(node)
        before = reads.read[f"127.0.0.1:{chunked.port}"]
        sent = await actions.send_message(node, "hi", peer.agent_id)
        assert sent["deliveries"][peer.agent_id]["state"] == "failed"
        read = reads.read[f"127.0.0.1:{chunked.port}"] - before
        assert 1024 * 1024 < read <= 1024 * 1024 + chunk, read


async def test_slow_or_dripping_peers_cannot_hold_a_url_check_open(tmp_path):
    """A peer_update pointing at a server that never answers, or drips one byte at a time, ends in 422
    within the 5 s well-known timeout (§6.1, §13.3), and the URL is not changed."""
    async with node_context(tmp_path) as node, \
            CaptureServer(lambda req: Answer(delay=60)) as silent, \
            CaptureServer(lambda req: Answer(body=b"x" * 200, drip=0.2)) as dripping:
        peer = RawPeer()
        await peer.connect(node)
        before = node.connections[peer.agent_id]["agent_url"]

        async def update(url: str):
            ts = now_iso()
            body = {"agent_id": peer.agent_id, "new_url": url, "public_key_hex": peer.identity.public_key_hex,
                    "timestamp": ts, "signature": sign_peer_update(peer.identity, peer.agent_id, url, ts)}
            started = time.monotonic()
            reply = await peer.post(node, "/__darkmatter__/peer_update", body, timeout=30)
            return reply, time.monotonic() - started

        (r1, t1), (r2, t2) = await asyncio.gather(update(silent.url), update(dripping.url))
        assert r1.status_code == 422 and r2.status_code == 422
        # bounded by the 5 s well-known timeout, not by the peers (60 s silent, 40 s of dripping); the
        # generous bound only tells the two apart on a busy machine
        assert t1 < 30 and t2 < 30, (t1, t2)
        assert node.connections[peer.agent_id]["agent_url"] == before


async def test_peer_url_with_a_never_class_literal_is_refused(tmp_path):
    async with node_context(tmp_path, DARKMATTER_GENESIS="true") as node:
        for url in ("http://169.254.169.254:8100", "http://[::ffff:169.254.169.254]:8100", "http://0.0.0.0:8100",
                    "http://[fe80::1]:8100"):
            peer = RawPeer(url)
            reply = await peer.post(node, "/__darkmatter__/connection_request", peer.connection_request())
            assert reply.status_code == 400, url
        # the IPv6 loopback spelling of a local peer is fine (§2.6: localhost = 127.0.0.1 = ::1)
        peer = RawPeer("http://[::1]:8100")
        reply = await peer.post(node, "/__darkmatter__/connection_request", peer.connection_request())
        assert reply.status_code == 200 and reply.json()["auto_accepted"] is True
        assert node.connections[peer.agent_id]["agent_url"] == "http://[::1]:8100"


async def test_well_known_of_an_impostor_never_passes_url_verification(tmp_path):
    """§6.1: a learned URL is stored only when the node there proves the peer's key (the challenge); a
    well-known document with another key or id, answered to the challenge, proves nothing."""
    async with node_context(tmp_path) as node:
        peer = RawPeer()
        await peer.connect(node)
        other = RawPeer()
        docs = {"other key": well_known_doc(peer.agent_id, other.identity.public_key_hex, "http://x"),
                "other id": well_known_doc(other.agent_id, other.identity.public_key_hex, "http://x")}
        for name, doc in docs.items():
            async with CaptureServer(lambda req, doc=doc: Answer(body=doc)) as impostor:
                ts = now_iso()
                body = {"agent_id": peer.agent_id, "new_url": impostor.url, "timestamp": ts,
                        "public_key_hex": peer.identity.public_key_hex,
                        "signature": sign_peer_update(peer.identity, peer.agent_id, impostor.url, ts)}
                reply = await peer.post(node, "/__darkmatter__/peer_update", body)
                assert reply.status_code == 403 and reply.json()["code"] == "key_mismatch", name
                assert node.connections[peer.agent_id]["agent_url"] == peer.url
                assert impostor.paths() == ["/__darkmatter__/challenge"]
