"""Mixed networks after the trust fixes of docs/protocol.md revision 2 (§1.2, §1.4): the route rule (§5.6), proof
of possession (§6.1) and admission (§13.2) keep 0.2 nodes working. ``Legacy02Node`` is a real 0.2 stand-in on
its own port; A and C are nodes of this implementation on loopback."""

from __future__ import annotations

import asyncio

import pytest
from legacy02 import Legacy02Node

from darkmatter.mesh import outbound as actions
from darkmatter.testing import connect
from darkmatter.testing import node_context

pytestmark = pytest.mark.anyio


async def wait_for(predicate, timeout: float = 15.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_a_02_node_answers_and_forwards_for_a_03_originator(tmp_path):
    """A → L (0.2) answers directly: its v1-signed answer is verified. A → L forwards (reporting the hop
    unsigned, before delivering) → C (0.3), whose signed answer is on the route and verified."""
    async with Legacy02Node("l", genesis=True) as legacy, node_context(tmp_path / "a") as a, \
            node_context(tmp_path / "c") as c:
        assert (await actions.request_connection(a, legacy.base_url))["status"] == "connected"
        assert (await legacy.request_connection(c.base_url))["auto_accepted"] is True

        direct = await actions.send_message(a, "0.2, what do you think?", legacy.agent_id)
        mid = direct["message_id"]
        assert await wait_for(lambda: any(m["message_id"] == mid for m in legacy.queue))
        answered = await legacy.respond(mid, "a 0.2 answer")
        assert answered["status_code"] == 200, answered
        record = a.state["sent_messages"][mid]
        assert record["status"] == "responded" and record["response"]["verified"] is True
        assert record["response"]["agent_id"] == legacy.agent_id

        relayed = await actions.send_message(a, "who knows?", legacy.agent_id)
        rid = relayed["message_id"]
        assert await wait_for(lambda: any(m["message_id"] == rid for m in legacy.queue))
        onward = await legacy.forward(rid, c.agent_id, note="C knows")
        assert onward["success"] is True, onward
        assert await wait_for(lambda: any(m["message_id"] == rid for m in c.state["inbox"]))
        reply = await actions.respond_message(c, rid, "C's answer, two hops out")
        assert reply["delivery"] == "delivered", reply
        record = a.state["sent_messages"][rid]
        assert record["status"] == "responded"
        assert (record["response"]["agent_id"], record["response"]["verified"]) == (c.agent_id, True)
        forwarded = record["updates"][0]
        assert (forwarded["agent_id"], forwarded["target_agent_id"], forwarded["verified"]) == \
            (legacy.agent_id, c.agent_id, False)


async def test_a_03_node_forwards_and_answers_for_a_02_originator(tmp_path):
    """L (0.2) → A, which forwards to C: A's signed ``forwarded`` update and C's answer reach L's webhook."""
    async with Legacy02Node("l") as legacy, node_context(tmp_path / "a") as a, node_context(tmp_path / "c") as c:
        assert (await legacy.request_connection(a.base_url))["auto_accepted"] is True
        await connect(a, c)
        sent = await legacy.send(a.agent_id, "0.3 nodes, help", hops=4)
        mid = sent["message_id"]
        assert await wait_for(lambda: any(m["message_id"] == mid for m in a.state["inbox"]))
        forwarded = await actions.forward_message(a, mid, c.agent_id, note="C")
        assert forwarded["delivery"] == "delivered", forwarded
        assert await wait_for(lambda: any(m["message_id"] == mid for m in c.state["inbox"]))
        answer = await actions.respond_message(c, mid, "from C")
        assert answer["delivery"] == "delivered", answer
        assert await wait_for(lambda: legacy.sent[mid].get("response") is not None)
        assert legacy.sent[mid]["response"]["response"] == "from C"


async def test_a_02_connection_found_through_peer_lookup_falls_back_to_its_well_known(tmp_path):
    """§6.1: a 0.2 peer has no challenge route (404); its URL, learned from another connection's peer_lookup
    answer, is checked against its well-known document instead, and the message gets through."""
    async with Legacy02Node("l", genesis=True) as legacy, node_context(tmp_path / "a") as a, \
            node_context(tmp_path / "c") as c:
        assert (await actions.request_connection(a, legacy.base_url))["status"] == "connected"
        assert (await legacy.request_connection(c.base_url))["auto_accepted"] is True
        await connect(a, c)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        a.connections[legacy.agent_id]["agent_url"] = dead  # L moved; A missed it
        sent = await actions.send_message(a, "still there?", legacy.agent_id)
        mid = sent["message_id"]
        assert await wait_for(lambda: any(m["message_id"] == mid for m in legacy.queue), 25)
        assert a.connections[legacy.agent_id]["agent_url"] == legacy.base_url
        assert legacy.saw("POST", "/__darkmatter__/challenge") == [404]
