"""Two real nodes upgrading to WebRTC, run inside a network namespace (see test_webrtc_netns.py).

Usage: ip netns exec <ns> python netns_driver.py <directory>

aiortc never offers 127.0.0.1 as an ICE candidate, so the namespace's ``lo`` carries 127.0.0.2 as well;
the nodes' HTTP ports stay on 127.0.0.1 and the data channel runs over 127.0.0.2. Prints one JSON line
with what every step observed; logs go to stderr. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import httpx

from darkmatter import api as actions, hookimpl
from darkmatter.api import Identity, v2_string
from darkmatter.testing import connect, make_node
from darkmatter.api import Session, ToolError
from darkmatter.api import h, now_iso

from darkmatter_webrtc_transport import transport_of

PLUGINS = "http_transport,webrtc_transport"
ENV = {"DARKMATTER_STUN_SERVERS": "", "DARKMATTER_HEALTH_INTERVAL": "3600"}


class Observer:
    """Observes what each node accepted into its inbox, and can hold the ack of one message: for
    ``hold_seconds``, or until the driver sets ``gate`` (bounded by ``GATE_CAP`` seconds)."""

    GATE_CAP = 30.0

    def __init__(self):
        self.received: list[dict] = []
        self.hold_seconds = 0.0
        self.held = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.released = asyncio.Event()

    @hookimpl
    def dm_on_message_received(self, node, message):
        self.received.append({"message_id": message["message_id"], "transport": message.get("transport")})
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.held.set()
            return self._wait(gate)  # awaited inside mesh.message: the frame's ack waits too
        if self.hold_seconds:
            seconds, self.hold_seconds = self.hold_seconds, 0.0
            self.held.set()
            return asyncio.sleep(seconds)  # awaited inside mesh.message: the frame's ack waits too
        return None

    async def _wait(self, gate: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(gate.wait(), self.GATE_CAP)
        except asyncio.TimeoutError:
            pass
        self.released.set()


class Warnings(logging.Handler):
    """Collects the webrtc plugin's warnings (e.g. "no ack from ... within 2 s")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def inbox_transport(node, message_id: str) -> list[str]:
    return [m.get("transport") for m in node.state["inbox"] if m["message_id"] == message_id]


async def tool(node, name: str, **args) -> dict:
    try:
        return await node.tools[name].handler(node, args, Session())
    except ToolError as exc:
        return {"tool_error": str(exc)}


async def transports_listed(node) -> dict:
    listed = await tool(node, "darkmatter_list_connections")
    return {c["agent_id"]: c.get("transport") for c in listed.get("connections", [])}


async def send(src, dst, content: str) -> dict:
    result = await actions.send_message(src, content, dst.agent_id)
    delivery = result["deliveries"][dst.agent_id]
    return {"message_id": result["message_id"], "state": delivery["state"], "transport": delivery["transport"],
            "inbox_transport": inbox_transport(dst, result["message_id"])}


async def real_offer_sdp() -> str:
    """A genuine offer (host candidates only), as an attacker could produce one."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("darkmatter")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def bad_offers(a, b) -> dict:
    """Offers to B claiming to come from A: unsigned, wrongly signed, stale; and from a stranger."""
    sdp = await real_offer_sdp()
    intruder = Identity.generate()
    ts = now_iso()
    base = {"from_agent_id": a.agent_id, "to_agent_id": b.agent_id, "sdp_offer": sdp, "timestamp": ts}
    wrong = intruder.sign(v2_string("webrtc_offer", a.agent_id, b.agent_id, ts, h(sdp)))
    stale_ts = "2020-01-01T00:00:00.000000+00:00"
    stale = a.sign_v2("webrtc_offer", a.agent_id, b.agent_id, stale_ts, h(sdp))
    cases = {
        "unsigned": base,
        "wrong_key": {**base, "signature_v2_hex": wrong},
        "stale": {**base, "timestamp": stale_ts, "signature_v2_hex": stale},
        "stranger": {**base, "from_agent_id": intruder.public_key_hex,
                     "signature_v2_hex": intruder.sign(v2_string("webrtc_offer", intruder.public_key_hex,
                                                                 b.agent_id, ts, h(sdp)))},
    }
    out = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.port}", trust_env=False, timeout=30) as http:
        for name, body in cases.items():
            reply = await http.post("/__darkmatter__/webrtc_offer", json=body)
            out[name] = {"status": reply.status_code, "code": reply.json().get("code")}
    return out


async def gather_timeouts(root: Path) -> dict:
    """A STUN server that never answers (a silent UDP socket in the namespace) and a 1 s gathering limit:
    the offerer's tool returns an error, and the answerer answers 503, instead of hanging."""
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.2", 0))
    stun = f"stun:127.0.0.2:{silent.getsockname()[1]}"
    slow = {**ENV, "DARKMATTER_STUN_SERVERS": stun, "DARKMATTER_WEBRTC_GATHER_TIMEOUT": "1"}
    out: dict = {}
    try:
        c = make_node(root / "c", plugins=PLUGINS, **slow)
        d = make_node(root / "d", plugins=PLUGINS, **ENV)
        async with c, d:
            await connect(c, d)
            started = time.monotonic()
            out["offerer"] = await tool(c, "darkmatter_upgrade_webrtc", agent_id=d.agent_id)
            out["offerer_seconds"] = round(time.monotonic() - started, 3)
            out["offerer_transport"] = c.connections[d.agent_id].get("transport")
            started = time.monotonic()
            out["answerer"] = await tool(d, "darkmatter_upgrade_webrtc", agent_id=c.agent_id)
            out["answerer_seconds"] = round(time.monotonic() - started, 3)
            out["links"] = [len(transport_of(c).links), len(transport_of(d).links),
                            len(transport_of(c).negotiating)]
            # The abandoned gatherings end on their own (aioice's 5 s STUN limit), then their peer
            # connections are closed in the background.
            out["background_closed"] = await until(
                lambda: not any(t.get_name() == "webrtc-close" for t in c.tasks), 15)
            out["offerer_transport_after"] = c.connections[d.agent_id].get("transport")
    finally:
        silent.close()
    return out


async def scenario(root: Path) -> dict:
    warnings = Warnings()
    logging.getLogger("darkmatter_webrtc_transport").addHandler(warnings)
    obs_a, obs_b = Observer(), Observer()
    a = make_node(root / "a", plugins=PLUGINS, extra=[obs_a], DARKMATTER_WEBRTC_ACK_TIMEOUT="2", **ENV)
    b = make_node(root / "b", plugins=PLUGINS, extra=[obs_b], **ENV)
    out: dict = {}
    async with a, b:
        ra, rb = transport_of(a), transport_of(b)
        await connect(a, b)
        out["before"] = {"a_lists": await transports_listed(a), "b_lists": await transports_listed(b),
                         "a_can_send": ra.can_send(a.connections[b.agent_id], 100)}

        started = time.monotonic()
        upgrade = await tool(a, "darkmatter_upgrade_webrtc", agent_id=b.agent_id)
        both_open = await until(lambda: rb.open_peers() == [a.agent_id] and ra.open_peers() == [b.agent_id])
        out["upgrade"] = {"result": upgrade, "seconds": round(time.monotonic() - started, 3),
                          "both_open": both_open, "a_lists": await transports_listed(a),
                          "b_lists": await transports_listed(b),
                          "a_status": a.status_lines(), "b_status": b.status_lines(),
                          "again": await tool(a, "darkmatter_upgrade_webrtc", agent_id=b.agent_id)}
        link_b = rb.links.get(a.agent_id)
        link_a = ra.links.get(b.agent_id)

        out["a_to_b"] = await send(a, b, "hello B, over the data channel")
        out["b_to_a"] = await send(b, a, "hello A, right back")
        out["a_to_b_2"] = await send(a, b, "second one")
        out["frames"] = {"a_out": link_a.frames_out if link_a else None, "b_in": link_b.frames_in if link_b else None}

        big = await send(a, b, "x" * 40_000)
        out["big"] = {**big, "channel_still_open": ra.open_peers() == [b.agent_id]}

        out["bad_offers"] = await bad_offers(a, b)
        await asyncio.sleep(0.5)
        out["after_bad_offers"] = {
            "b_same_link": rb.links.get(a.agent_id) is link_b and link_b is not None and link_b.is_open,
            "a_same_link": ra.links.get(b.agent_id) is link_a and link_a is not None and link_a.is_open,
            "b_negotiating": list(rb.negotiating),
            "message": await send(a, b, "still on the channel after the forged offers")}

        # Close the channel while a frame waits for its ack: the frame is resent over HTTP (deduplicated).
        obs_b.hold_seconds = 3.0
        pending = asyncio.ensure_future(actions.send_message(a, "held on the channel", b.agent_id))
        held = await until(obs_b.held.is_set, 10)
        closed_at = time.monotonic()
        warned = len(warnings.messages)
        await rb.close(a.agent_id)
        result = await asyncio.wait_for(pending, 30)
        mid = result["message_id"]
        both_http = await until(lambda: not ra.open_peers() and not rb.open_peers(), 10)
        out["resend"] = {"held": held, "state": result["deliveries"][b.agent_id]["state"],
                         "transport": result["deliveries"][b.agent_id]["transport"],
                         "seconds_after_close": round(time.monotonic() - closed_at, 3),
                         "copies_at_b": len(inbox_transport(b, mid)), "inbox_transport": inbox_transport(b, mid),
                         "both_http": both_http,
                         "ack_timeouts": sum("no ack from" in m for m in warnings.messages[warned:])}
        out["after_close"] = {"a_to_b": await send(a, b, "after the close"), "b_to_a": await send(b, a, "me too"),
                              "a_lists": await transports_listed(a), "b_lists": await transports_listed(b),
                              "a_status": a.status_lines()}

        # Upgrade again, from the other side this time, then disconnect: both channels are closed.
        again = await tool(b, "darkmatter_upgrade_webrtc", agent_id=a.agent_id)
        reopened = await until(lambda: ra.open_peers() == [b.agent_id] and rb.open_peers() == [a.agent_id])
        b_to_a = await send(b, a, "over the second channel")
        await actions.disconnect(a, b.agent_id)
        closed = await until(lambda: not ra.links and not rb.links, 10)
        out["reupgrade"] = {"result": again, "open": reopened, "b_to_a": b_to_a, "closed_on_disconnect": closed}

        # Reconnect and upgrade once more.
        await connect(a, b)
        await tool(a, "darkmatter_upgrade_webrtc", agent_id=b.agent_id)
        out["reconnected_open"] = await until(lambda: ra.open_peers() == [b.agent_id])

        # A peer A does not know to be 0.3 gets fire-and-forget frames (no wait for an ack). B holds the
        # message in its event hook, and so its ack, until A's send has returned: a sender that waited for
        # the ack could only return after the gate opens, or after its 2 s ack timeout over HTTP instead.
        conn = a.connections[b.agent_id]
        saved = conn.get("known_03"), conn.get("protocol_version")
        conn["known_03"], conn["protocol_version"] = False, "0.2"
        gate = asyncio.Event()
        obs_b.held, obs_b.released, obs_b.gate = asyncio.Event(), asyncio.Event(), gate
        started = time.monotonic()
        result = await actions.send_message(a, "fire and forget", b.agent_id)
        delivery = result["deliveries"][b.agent_id]
        fire = {"message_id": result["message_id"], "state": delivery["state"], "transport": delivery["transport"],
                "acknowledged": delivery.get("acknowledged"), "seconds": round(time.monotonic() - started, 3),
                "returned_before_b_released": not obs_b.released.is_set()}
        # B gets the frame (its hook holds it) while A's send has long returned
        fire["held_at_b"] = await until(obs_b.held.is_set, 10)
        gate.set()
        fire["released"] = await until(obs_b.released.is_set, 10)
        fire["arrived"] = await until(
            lambda: any(m["message_id"] == fire["message_id"] for m in obs_b.received), 10)
        fire["inbox_transport"] = inbox_transport(b, fire["message_id"])
        conn["known_03"], conn["protocol_version"] = saved
        out["fire_and_forget"] = fire

        # No ack within A's ack timeout (2 s here): the channel is dropped and the frame resent over HTTP.
        obs_b.held = asyncio.Event()
        obs_b.hold_seconds = 4.0
        started = time.monotonic()
        result = await actions.send_message(a, "B will not ack this in time", b.agent_id)
        mid = result["message_id"]
        out["no_ack"] = {"state": result["deliveries"][b.agent_id]["state"],
                         "transport": result["deliveries"][b.agent_id]["transport"],
                         "seconds": round(time.monotonic() - started, 3), "held": obs_b.held.is_set(),
                         "copies_at_b": len(inbox_transport(b, mid)),
                         "a_reverted": await until(lambda: not ra.open_peers(), 10),
                         "a_lists": await transports_listed(a)}

        # Shutdown closes channels; the saved state says http.
        await tool(a, "darkmatter_upgrade_webrtc", agent_id=b.agent_id)
        out["before_shutdown_open"] = await until(lambda: ra.open_peers() == [b.agent_id])
        out["observed"] = {"a": obs_a.received, "b": obs_b.received}
    out["gather_timeout"] = await gather_timeouts(root)
    state = json.loads((root / "a" / "state.json").read_text())
    out["saved_transport"] = {k: c.get("transport") for k, c in state["connections"].items()}
    out["a_links_after_stop"] = len(ra.links)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    root = Path(sys.argv[1])
    try:
        result = asyncio.run(asyncio.wait_for(scenario(root), 240))
    except Exception as exc:  # the test prints the log; report the failure as data
        logging.exception("driver failed")
        result = {"driver_error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
