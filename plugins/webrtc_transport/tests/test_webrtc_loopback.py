"""The WebRTC plugin's wiring and its signalling checks, on plain loopback (no ICE traffic happens here:
every offer below is refused before a peer connection gathers candidates; the channel itself is tested in
test_webrtc_netns.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
import pytest

from darkmatter.api import ConfigError
from darkmatter.api import Identity, v2_string
from darkmatter.testing import client, connect, make_node, node_context
from darkmatter.api import Session, ToolError
from darkmatter.api import h, now_iso

from darkmatter_webrtc_transport import transport_of
from darkmatter_webrtc_transport.transport import DEFAULT_STUN, parse_stun_servers

PLUGINS = "http_transport,webrtc_transport"
OFFER = "/__darkmatter__/webrtc_offer"
# A syntactically plausible offer without a data channel section: refused (400) after the rate limit,
# before any peer connection exists.
NO_CHANNEL_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
CHANNEL_SDP = NO_CHANNEL_SDP + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"


def signed_offer(signer, from_id: str, to_id: str, sdp: str, ts: str | None = None) -> dict:
    ts = ts or now_iso()
    text = v2_string("webrtc_offer", from_id, to_id, ts, h(sdp))
    signature = signer.sign(text)
    return {"from_agent_id": from_id, "to_agent_id": to_id, "sdp_offer": sdp, "timestamp": ts,
            "signature_v2_hex": signature}


def test_entry_point_registers_transport_route_and_tool(tmp_path):
    node = make_node(tmp_path, plugins=PLUGINS)
    names = [t.name for t in node.transports]
    assert names == ["webrtc", "http"]  # higher priority first
    assert transport_of(node).priority > 0
    assert ("POST", OFFER) in node.route_owners and node.route_owners[("POST", OFFER)] == "webrtc_transport"
    tool = node.tools["darkmatter_upgrade_webrtc"]
    assert tool.plugin == "webrtc_transport" and tool.required == ("agent_id",)


def test_stun_servers_setting():
    assert parse_stun_servers(None) == [DEFAULT_STUN] == ["stun:stun.l.google.com:19302"]
    assert parse_stun_servers("") == []
    assert parse_stun_servers(" stun:a.example:3478 , stun:b.example:19302,") == [
        "stun:a.example:3478", "stun:b.example:19302"]
    with pytest.raises(ConfigError, match="DARKMATTER_STUN_SERVERS"):
        parse_stun_servers("http://a.example")


def test_bad_stun_setting_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="not a STUN URL"):
        make_node(tmp_path, plugins=PLUGINS, DARKMATTER_STUN_SERVERS="turn:x.example")


@pytest.mark.anyio
async def test_offer_checks_in_protocol_order(tmp_path):
    async with node_context(tmp_path / "a", plugins=PLUGINS) as a, \
            node_context(tmp_path / "b", plugins=PLUGINS) as b:
        await connect(a, b)
        stranger = Identity.generate()
        async with client(b, timeout=30) as http:
            async def post(body) -> httpx.Response:
                return await http.post(OFFER, content=body if isinstance(body, bytes) else json.dumps(body),
                                       headers={"content-type": "application/json"})

            bad_json = await post(b"{not json")
            assert bad_json.status_code == 400 and bad_json.json()["code"] == "invalid_json"
            assert bad_json.json()["error"].startswith("Missing from_agent_id or sdp_offer")
            assert (await post(b"[1, 2]")).status_code == 400
            assert (await post(b"{" + b" " * (1024 * 1024 + 10) + b"}")).status_code == 413
            huge = await post({"from_agent_id": a.agent_id, "sdp_offer": "v=0\r\n" + "a=x\r\n" * 20000})
            assert (huge.status_code, huge.json()["code"]) == (400, "invalid_field")
            for body in ({}, {"from_agent_id": a.agent_id}, {"sdp_offer": CHANNEL_SDP},
                         {"from_agent_id": a.agent_id, "sdp_offer": 5}, {"from_agent_id": 7, "sdp_offer": "x"}):
                reply = await post(body)
                assert reply.status_code == 400, body
                assert reply.json()["error"] == "Missing from_agent_id or sdp_offer"

            # 3: not a connection (even when perfectly signed by its own key)
            reply = await post(signed_offer(stranger, stranger.public_key_hex, b.agent_id, CHANNEL_SDP))
            assert (reply.status_code, reply.json()["code"]) == (403, "not_connected")
            assert reply.json()["error"].startswith("Not connected")

            # 4: the connection's key exists, so the signature must be present, fresh and valid
            unsigned = {"from_agent_id": a.agent_id, "to_agent_id": b.agent_id, "sdp_offer": CHANNEL_SDP,
                        "timestamp": now_iso()}
            reply = await post(unsigned)
            assert (reply.status_code, reply.json()["code"]) == (403, "signature_required")
            reply = await post(signed_offer(stranger, a.agent_id, b.agent_id, CHANNEL_SDP))
            assert (reply.status_code, reply.json()["code"]) == (403, "invalid_signature")
            reply = await post(signed_offer(a, a.agent_id, b.agent_id, CHANNEL_SDP,
                                            ts="2020-01-01T00:00:00.000000+00:00"))
            assert (reply.status_code, reply.json()["code"]) == (403, "stale_timestamp")
            reply = await post(signed_offer(a, a.agent_id, stranger.public_key_hex, CHANNEL_SDP))
            assert (reply.status_code, reply.json()["code"]) == (403, "invalid_signature")  # to ≠ this node
            tampered = signed_offer(a, a.agent_id, b.agent_id, CHANNEL_SDP)
            tampered["sdp_offer"] = CHANNEL_SDP + "a=extra\r\n"
            reply = await post(tampered)
            assert (reply.status_code, reply.json()["code"]) == (403, "invalid_signature")
            reply = await post({**unsigned, "signature_v2_hex": "zz"})
            assert (reply.status_code, reply.json()["code"]) == (403, "invalid_signature")

            # 5: refusals above cost nothing; valid offers spend the 5-per-minute bucket, then 429
            statuses = []
            for _ in range(6):
                reply = await post(signed_offer(a, a.agent_id, b.agent_id, NO_CHANNEL_SDP))
                statuses.append(reply.status_code)
            assert statuses == [400] * 5 + [429]
            assert reply.json()["code"] == "rate_limited" and int(reply.headers["retry-after"]) >= 1

        manager = transport_of(b)
        assert manager.links == {} and manager.negotiating == {}
        assert b.connections[a.agent_id].get("transport", "http") == "http"


@pytest.mark.anyio
async def test_tool_errors_and_defaults_without_a_channel(tmp_path):
    async with node_context(tmp_path / "a", plugins=PLUGINS) as a, \
            node_context(tmp_path / "b", plugins=PLUGINS) as b:
        await connect(a, b)
        upgrade = a.tools["darkmatter_upgrade_webrtc"].handler
        with pytest.raises(ToolError, match="Not connected"):
            await upgrade(a, {"agent_id": "nobody"}, Session())
        with pytest.raises(ToolError, match="agent_id"):
            await upgrade(a, {"agent_id": ""}, Session())
        manager = transport_of(a)
        conn = a.connections[b.agent_id]
        assert manager.can_send(conn, 10) is False
        assert not any("[webrtc]" in line for line in a.status_lines())
        listed = await a.tools["darkmatter_list_connections"].handler(a, {}, Session())
        assert [c["transport"] for c in listed["connections"]] == ["http"]
        async with client(b) as http:
            doc = (await http.get("/.well-known/darkmatter.json")).json()
        assert doc["webrtc_enabled"] is True


@pytest.mark.anyio
async def test_restart_starts_every_connection_on_http(tmp_path):
    async with node_context(tmp_path / "b", plugins=PLUGINS) as b:
        a = make_node(tmp_path / "a", plugins=PLUGINS)
        async with a:
            await connect(a, b)
            a.connections[b.agent_id]["transport"] = "webrtc"  # as a crash with an open channel leaves it
            await a.save()
        a = make_node(tmp_path / "a", plugins=PLUGINS)
        async with a:
            assert a.connections[b.agent_id]["transport"] == "http"


WITHOUT_AIORTC = textwrap.dedent("""
    import asyncio, json, sys
    sys.modules["aiortc"] = None  # this interpreter cannot import aiortc
    from pathlib import Path
    import httpx
    from darkmatter.testing import connect, node_context
    from darkmatter.api import Session, ToolError

    async def main(root):
        plugins = "http_transport,webrtc_transport"
        async with node_context(root / "a", plugins=plugins) as a, node_context(root / "b", plugins=plugins) as b:
            await connect(a, b)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.port}", trust_env=False) as http:
                reply = await http.post("/__darkmatter__/webrtc_offer", content=b"not even json")
            try:
                await a.tools["darkmatter_upgrade_webrtc"].handler(a, {"agent_id": b.agent_id}, Session())
                tool = "no error"
            except ToolError as exc:
                tool = str(exc)
            return {"status": reply.status_code, "body": reply.json(), "tool": tool,
                    "transports": [t.name for t in a.transports]}

    print(json.dumps(asyncio.run(asyncio.wait_for(main(Path(sys.argv[1])), 60))))
""")


def test_without_aiortc_route_answers_501_and_tool_says_unavailable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_AIORTC, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == 501  # before parsing: the body was not even JSON
    assert result["body"] == {"error": "WebRTC not available", "code": "webrtc_unavailable"}
    assert "WebRTC is unavailable" in result["tool"]
    assert result["transports"] == ["webrtc", "http"]
