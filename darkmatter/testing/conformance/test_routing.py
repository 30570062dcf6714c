"""Forwarding with hops and loop detection, expiry, responses and webhook updates (docs/protocol.md §5)."""

import pytest

from darkmatter.mesh import outbound
from darkmatter.tools import ToolError
from darkmatter.wire import endpoint

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]


async def chain_with_message(dm, hops: int = 10):
    """A-B-C; A sent one message to B. Returns the nodes and the message id."""
    a, b, c = await dm.mesh(3)
    sent = await outbound.send_message(a, "route me", b.agent_id, hops_remaining=hops)
    assert sent["deliveries"][b.agent_id]["state"] == "delivered"
    return a, b, c, sent["message_id"]


async def test_a_forward_reaches_the_next_hop_with_one_hop_less(dm):
    a, b, c, mid = await chain_with_message(dm, hops=5)
    result = await outbound.forward_message(b, mid, c.agent_id, note="for you")
    assert result["delivery"] == "delivered" and result["hops_remaining"] == 4
    [entry] = c.state["inbox"]
    assert entry["message_id"] == mid and entry["from_agent_id"] == b.agent_id
    assert entry["hops_remaining"] == 4 and entry["verified"] is True
    assert entry["webhook"] == b.state["inbox"][0]["webhook"]


async def test_the_originator_records_each_forwarding_hop(dm, wait_for):
    a, b, c, mid = await chain_with_message(dm)
    await outbound.forward_message(b, mid, c.agent_id)
    sent = a.state["sent_messages"][mid]
    update = await wait_for(lambda: next((u for u in sent["updates"] if u["type"] == "forwarded"), None),
                            what="the forwarded update")
    assert update["agent_id"] == b.agent_id and update["target_agent_id"] == c.agent_id
    assert update["verified"] is True


async def test_forwarding_back_along_the_route_is_refused_as_a_loop(dm, wait_for):
    a, b, c, mid = await chain_with_message(dm)
    await outbound.forward_message(b, mid, c.agent_id)
    await dm.connect(c, a)
    await wait_for(lambda: a.state["sent_messages"][mid]["updates"], what="the forwarded update")
    with pytest.raises(ToolError, match="already received"):
        await outbound.forward_message(c, mid, a.agent_id)
    with pytest.raises(ToolError, match="already received"):
        await outbound.forward_message(c, mid, b.agent_id)
    assert [m["message_id"] for m in a.state["inbox"]] == []


async def test_a_message_out_of_hops_expires_and_the_originator_hears_of_it(dm, wait_for):
    a, b, c, mid = await chain_with_message(dm, hops=1)
    await outbound.forward_message(b, mid, c.agent_id)
    assert c.state["inbox"][0]["hops_remaining"] == 0
    d = await dm.node()
    await dm.connect(c, d)
    with pytest.raises(ToolError, match="expired"):
        await outbound.forward_message(c, mid, d.agent_id)
    sent = a.state["sent_messages"][mid]
    await wait_for(lambda: any(u["type"] == "expired" and u["agent_id"] == c.agent_id for u in sent["updates"]),
                   what="the expired update")
    assert d.state["inbox"] == []


async def test_a_response_reaches_the_originator_verified(dm, wait_for):
    a, b, c, mid = await chain_with_message(dm)
    await outbound.forward_message(b, mid, c.agent_id)
    result = await outbound.respond_message(c, mid, "the answer")
    assert result["delivery"] == "delivered"
    sent = a.state["sent_messages"][mid]
    assert sent["status"] == "responded"
    assert sent["response"]["agent_id"] == c.agent_id and sent["response"]["response"] == "the answer"
    assert sent["response"]["verified"] is True
    assert c.state["inbox"] == []


async def test_the_webhook_status_shows_the_route(dm, wait_for):
    a, b, c, mid = await chain_with_message(dm)
    await outbound.forward_message(b, mid, c.agent_id)
    await wait_for(lambda: a.state["sent_messages"][mid]["updates"], what="the forwarded update")
    reply = await dm.get(a, f"/__darkmatter__/webhook/{mid}")
    assert reply.status == 200
    assert reply.body["status"] == "active" and reply.body["routed_to"] == [b.agent_id]
    assert reply.body["origin_agent_id"] == a.agent_id
    assert [(u["type"], u["agent_id"], u["target_agent_id"]) for u in reply.body["updates"]] == [
        ("forwarded", b.agent_id, c.agent_id)]
    assert reply.body["hops_remaining"] == 9  # C got it with one hop less than the initial 10


async def test_a_webhook_of_an_unknown_message_is_404(dm):
    a = await dm.node()
    reply = await dm.get(a, "/__darkmatter__/webhook/msg-unknown")
    assert reply.status == 404 and reply.body["code"] == "unknown_message"
    posted = await dm.post(a, "/__darkmatter__/webhook/msg-unknown",
                           {"type": "forwarded", "agent_id": "x" * 8, "target_agent_id": "y" * 8})
    assert posted.status == 404


async def test_an_owner_expired_message_is_not_forwarded(dm):
    a, b, c, mid = await chain_with_message(dm)
    await outbound.expire_message(a, mid)
    with pytest.raises(ToolError, match="expired"):
        await outbound.forward_message(b, mid, c.agent_id)
    assert c.state["inbox"] == []
    assert b.state["inbox"] == []  # the stale message leaves the queue


async def test_a_webhook_update_with_a_bad_type_is_refused(dm):
    a, b, c, mid = await chain_with_message(dm)
    url = endpoint(a.base_url, "webhook", mid)
    reply = await dm.request("POST", url, {"type": "teleported", "agent_id": b.agent_id})
    assert reply.status == 400
    assert a.state["sent_messages"][mid]["updates"] == []
