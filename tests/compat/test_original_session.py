"""A whole session by an MCP client that only knows the original implementation's tools (protocol 0.2), in a
network that mixes this node with 0.2 nodes in both roles (issue 15).

D is this node, driven only through MCP with the original's argument names (flat, and in the FastMCP
``{"params": ...}`` envelope the original advertised), reading results as the original's JSON text. N is a
second node of this implementation (genesis). L1 (genesis), L2 and L3 are 0.2 nodes: ``Legacy02Node``, real
HTTP servers on loopback speaking the 0.2 wire.

    connect:  D → L1 (0.2 genesis accepts)   D → L2 (pending; the 0.2 agent accepts)
              L3 → D (pending; D accepts via list_pending_requests)   L1 → N (0.3 genesis accepts a 0.2 node)
    message:  D sends to L1; L1 (0.2) forwards to N; N answers D's webhook; D reads it
              L2 (0.2) sends to D; D forwards to L3 (0.2) and answers L2's webhook
    then:     D asks L1 (0.2) for its impression of N; D disconnects from L3 (a 0.2 node answers 404)
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from legacy02 import Legacy02Node
from test_tool_contract import OriginalScript, mcp_client, wait_for

from darkmatter.mesh import outbound as actions
from darkmatter.testing import node_context

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def mixed_network(tmp_path):
    async with Legacy02Node("l1", genesis=True, bio="L1 routes questions.") as l1, Legacy02Node("l2") as l2, \
            Legacy02Node("l3") as l3, \
            node_context(tmp_path / "d", DARKMATTER_GENESIS="false", DARKMATTER_DISPLAY_NAME="d") as d, \
            node_context(tmp_path / "n", DARKMATTER_GENESIS="true", DARKMATTER_DISPLAY_NAME="n") as n:
        yield d, n, l1, l2, l3


async def connection_ids(call) -> set[str]:
    return {c["agent_id"] for c in (await call("darkmatter_list_connections"))["connections"]}


@pytest.mark.parametrize("style", ["flat", "envelope"])
async def test_a_client_of_the_original_runs_a_whole_session_in_a_mixed_network(tmp_path, style):
    async with mixed_network(tmp_path) as (d, n, l1, l2, l3), mcp_client(d) as client:
        call = OriginalScript(client, style)

        # --- connect -----------------------------------------------------------------------------------
        assert (await l1.request_connection(n.base_url))["auto_accepted"] is True  # 0.2 requester, 0.3 genesis
        assert n.connections[l1.agent_id]["agent_public_key_hex"] == l1.public_key_hex

        genesis = await call("darkmatter_request_connection", "connected", target_url=f"{l1.base_url}/mcp")
        assert genesis["status"] == "connected" and genesis["agent_id"] == l1.agent_id
        assert genesis["agent_bio"] == "L1 routes questions." and d.agent_id in l1.connections

        pending = await call("darkmatter_request_connection", "pending", target_url=l2.base_url)
        assert pending["status"] == "pending" and pending["request_id"] in l2.pending_requests
        assert await l2.accept(pending["request_id"]) == 200
        for _ in range(100):  # as a script would: look again until the acceptance arrived
            if l2.agent_id in await connection_ids(call):
                break
            await asyncio.sleep(0.05)
        assert l2.agent_id in await connection_ids(call)

        asked = await l3.request_connection(f"{d.base_url}/mcp")
        assert asked["auto_accepted"] is False
        waiting = await call("darkmatter_list_pending_requests")
        assert waiting["total"] == 1 and waiting["requests"][0]["from_agent_id"] == l3.agent_id
        assert waiting["requests"][0]["request_id"] == asked["request_id"]
        decided = await call("darkmatter_respond_connection", request_id=waiting["requests"][0]["request_id"],
                             accept=True)
        assert decided["success"] is True and decided["accepted"] is True and decided["agent_id"] == l3.agent_id
        await wait_for(lambda: d.agent_id in l3.connections)
        assert l3.connections[d.agent_id]["agent_public_key_hex"] == d.public_key_hex
        assert (await call("darkmatter_get_identity"))["num_connections"] == 3

        # --- D's question travels D → L1 (0.2 forwarder) → N, whose answer D reads from its webhook ---------
        sent = await call("darkmatter_send_message", content="Who can explain WAL mode?", target_agent_id=l1.agent_id,
                          metadata={"topic": "sqlite"}, hops_remaining=5)
        assert sent["success"] is True and sent["routed_to"] == [l1.agent_id] and sent["hops_remaining"] == 5
        mid = sent["message_id"]
        await wait_for(lambda: any(m["message_id"] == mid for m in l1.queue))
        assert l1.queued(mid)["verified"] is True and l1.queued(mid)["webhook"] == sent["webhook"]
        relayed = await l1.forward(mid, n.agent_id, note="N knows SQLite")
        assert relayed["success"] is True, relayed
        await wait_for(lambda: any(m["message_id"] == mid for m in n.state["inbox"]))
        arrived = next(m for m in n.state["inbox"] if m["message_id"] == mid)
        assert arrived["from_agent_id"] == l1.agent_id and arrived["verified"] is True
        assert arrived["hops_remaining"] == 4
        assert (await actions.respond_message(n, mid, "WAL keeps readers off the writer's lock."))["delivery"] \
            == "delivered"

        tracked = await call("darkmatter_get_sent_message", message_id=mid)
        assert tracked["status"] == "responded" and tracked["forwarding_count"] == 1
        assert tracked["response"]["agent_id"] == n.agent_id
        assert tracked["response"]["response"] == "WAL keeps readers off the writer's lock."
        hop = tracked["updates"][0]
        assert (hop["type"], hop["agent_id"], hop["target_agent_id"], hop["note"]) == \
            ("forwarded", l1.agent_id, n.agent_id, "N knows SQLite")
        listed = next(m for m in (await call("darkmatter_list_messages"))["messages"] if m["message_id"] == mid)
        assert listed["status"] == "responded" and listed["forwarding_count"] == 1 and listed["updates_count"] == 1

        # --- L2's question: D reads the webhook in its inbox, forwards to L3 (0.2), answers L2 -------------
        question = await l2.send(d.agent_id, "Is there a cron expert around?", hops=3)
        assert question["status_code"] == 200
        qid = question["message_id"]
        await wait_for(lambda: d.state["inbox"])
        inbox = await call("darkmatter_list_inbox")
        entry = next(m for m in inbox["messages"] if m["message_id"] == qid)
        assert entry["webhook"] == f"{l2.base_url}/__darkmatter__/webhook/{qid}"
        assert entry["from_agent_id"] == l2.agent_id and entry["verified"] is True and entry["can_forward"] is True
        assert (await call("darkmatter_get_message", message_id=qid))["content"] == "Is there a cron expert around?"
        onward = await call("darkmatter_forward_message", message_id=qid, target_agent_id=l3.agent_id,
                            note="L3 schedules jobs")
        assert onward["success"] is True and onward["forwarded_to"] == l3.agent_id
        assert onward["hops_remaining_for_target"] == 2
        await wait_for(lambda: any(m["message_id"] == qid for m in l3.queue))
        assert l3.queued(qid)["verified"] is True and l3.queued(qid)["hops_remaining"] == 2
        assert l3.queued(qid)["from_agent_id"] == d.agent_id
        await wait_for(lambda: l2.sent[qid]["updates"])
        assert l2.sent[qid]["updates"][0]["agent_id"] == d.agent_id
        assert l2.sent[qid]["updates"][0]["target_agent_id"] == l3.agent_id
        answered = await call("darkmatter_respond_message", message_id=qid, response="Yes: ask L3.")
        assert answered["success"] is True and answered["webhook_called"] == entry["webhook"]
        assert answered["error"] is None
        assert l2.sent[qid]["status"] == "responded" and l2.sent[qid]["response"]["agent_id"] == d.agent_id
        assert l2.sent[qid]["response"]["response"] == "Yes: ask L3." and l2.sent[qid]["response"]["verified"]
        assert (await call("darkmatter_list_inbox"))["total"] == 0

        # --- impressions: asking a 0.2 node works; a 0.2 node's unsigned ask is refused on purpose ---------
        l1.impressions[n.agent_id] = "Answered a SQLite question well."
        opinion = await call("darkmatter_ask_impression", ask_agent_id=l1.agent_id, about_agent_id=n.agent_id)
        assert opinion["success"] is True and opinion["asked"] == l1.agent_id and opinion["about"] == n.agent_id
        assert opinion["has_impression"] is True and opinion["impression"] == "Answered a SQLite question well."
        async with httpx.AsyncClient(trust_env=False) as http:
            unsigned = await http.get(f"{d.base_url}/__darkmatter__/impression/{n.agent_id}")
        assert unsigned.status_code == 403  # docs/protocol.md §1.3, §10

        # --- disconnect: the 0.2 peer has no /disconnect (404), which changes nothing here -------------------
        gone = await call("darkmatter_disconnect", agent_id=l3.agent_id)
        assert gone["success"] is True and gone["disconnected_from"] == l3.agent_id
        assert l3.saw("POST", "/__darkmatter__/disconnect") == [404]
        assert await connection_ids(call) == {l1.agent_id, l2.agent_id}
        info = await call("darkmatter_network_info")
        assert {p["agent_id"] for p in info["peers"]} == {l1.agent_id, l2.agent_id}
