"""Several nodes in one process: each its own plugin manager, identity, port and state."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter import hookimpl
from darkmatter.identity import Identity
from darkmatter.testing import client, mesh, node_context
from darkmatter.wire import now_iso

pytestmark = pytest.mark.anyio


class WhoAmI:
    """Serves the node's own id; one instance is registered with one node only."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def dm_register_routes(self, register, node):
        async def whoami(request):
            return JSONResponse({"agent_id": node.agent_id, "plugin": self.name})

        register(Route("/__darkmatter__/whoami", whoami, methods=["GET"]))


async def test_three_nodes_in_one_process_are_independent(tmp_path):
    async with mesh(tmp_path, 3, connect_as="none", plugins="") as nodes:
        ids = [n.agent_id for n in nodes]
        ports = [n.port for n in nodes]
        assert len(set(ids)) == 3 and len(set(ports)) == 3
        assert all(p > 0 for p in ports)
        assert len({id(n.pm) for n in nodes}) == 3  # one plugin manager per node
        assert len({n.config.state_file for n in nodes}) == 3

        peer = Identity.generate().public_key_hex
        nodes[0].state["inbox"].append({"message_id": "msg-00000000000a", "content": "only for node 0",
                                        "from_agent_id": peer, "received_at": now_iso()})
        nodes[1].state["impressions"][peer] = "only node 1 knows"
        for node in nodes:
            await node.save()

        files = [json.loads(n.config.state_file.read_text()) for n in nodes]
        assert [f["agent_id"] for f in files] == ids
        assert [len(f["inbox"]) for f in files] == [1, 0, 0]
        assert [bool(f["impressions"]) for f in files] == [False, True, False]
        for node in nodes:
            assert node.public_status()["agent_id"] == node.agent_id

        # Every node serves on its own real socket.
        for node in nodes:
            async with client(node) as http:
                reply = await http.get("/__darkmatter__/no-such-path")
            assert reply.status_code == 404 and reply.json()["code"] == "not_found"


async def test_a_plugin_registered_with_one_node_does_not_leak_into_another(tmp_path):
    async with node_context(tmp_path / "a", plugins="", extra=[WhoAmI("probe-a")]) as a:
        async with node_context(tmp_path / "b", plugins="") as b:
            assert a.pm.has_plugin("probe-a") and not b.pm.has_plugin("probe-a")
            async with client(a) as http:
                assert (await http.get("/__darkmatter__/whoami")).json() == {"agent_id": a.agent_id,
                                                                            "plugin": "probe-a"}
            async with client(b) as http:
                assert (await http.get("/__darkmatter__/whoami")).status_code == 404


async def test_nodes_restart_independently_and_keep_their_own_identity(tmp_path):
    async with mesh(tmp_path, 3, connect_as="none", plugins="") as nodes:
        ids = [n.agent_id for n in nodes]
        await nodes[1].stop()
        assert nodes[0].started and nodes[2].started and not nodes[1].started
        await nodes[1].start()
        assert nodes[1].agent_id == ids[1]
        async with client(nodes[1]) as http:
            assert (await http.get("/__darkmatter__/no-such-path")).status_code == 404
    async with mesh(tmp_path, 3, connect_as="none", plugins="") as again:
        assert [n.agent_id for n in again] == ids


class Recorder:
    """Records every event hook call as (hook, agent_id of the node, detail); one instance for all nodes."""

    name = "event_recorder"

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []

    def _record(self, hook: str, node, detail) -> None:
        self.calls.append((hook, node.agent_id, detail))

    def seen(self, hook: str, node, detail=None) -> bool:
        return any(h == hook and a == node.agent_id and (detail is None or d == detail) for h, a, d in self.calls)

    @hookimpl
    async def dm_on_message_received(self, node, message):
        self._record("dm_on_message_received", node, message["message_id"])

    @hookimpl
    def dm_on_message_forwarded(self, node, message, target_agent_id):
        self._record("dm_on_message_forwarded", node, (message["message_id"], target_agent_id))

    @hookimpl
    def dm_on_message_responded(self, node, message_id, response, delivery):
        self._record("dm_on_message_responded", node, (message_id, response, delivery))

    @hookimpl
    def dm_on_response_received(self, node, sent_message, response):
        self._record("dm_on_response_received", node, (sent_message["message_id"], response["response"]))

    @hookimpl
    def dm_on_message_expired(self, node, message_id, reason):
        self._record("dm_on_message_expired", node, message_id)

    @hookimpl
    def dm_on_connection_changed(self, node, agent_id, event):
        self._record("dm_on_connection_changed", node, (agent_id, event))


async def until(predicate, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer(tmp_path):
    """A -> B -> C over real HTTP between three nodes of one process; every event hook fires on the
    node where it happened, and each node keeps its own state."""
    from darkmatter.mesh import outbound as actions

    recorder = Recorder()
    async with mesh(tmp_path, 3, connect_as="chain", plugins="http_transport", extra=[recorder]) as (a, b, c):
        for node in (a, b, c):
            async with client(node) as http:
                assert (await http.get("/__darkmatter__/status")).json()["agent_id"] == node.agent_id
        assert set(a.connections) == {b.agent_id} and set(c.connections) == {b.agent_id}
        assert set(b.connections) == {a.agent_id, c.agent_id}
        assert recorder.seen("dm_on_connection_changed", a, (b.agent_id, "connected"))
        assert recorder.seen("dm_on_connection_changed", b, (a.agent_id, "connected"))

        sent = await actions.send_message(a, "Who can explain Rust lifetimes?", target_agent_id=b.agent_id)
        message_id = sent["message_id"]
        assert sent["deliveries"][b.agent_id]["state"] == "delivered"
        assert [m["message_id"] for m in b.state["inbox"]] == [message_id]
        assert recorder.seen("dm_on_message_received", b, message_id)

        forwarded = await actions.forward_message(b, message_id, c.agent_id, note="C knows Rust")
        assert forwarded["delivery"] == "delivered"
        await until(lambda: recorder.seen("dm_on_message_forwarded", b, (message_id, c.agent_id)))
        assert recorder.seen("dm_on_message_received", c, message_id)

        answered = await actions.respond_message(c, message_id, "Me: a lifetime bounds a borrow.")
        assert answered["delivery"] == "delivered"
        assert recorder.seen("dm_on_message_responded", c, (message_id, "Me: a lifetime bounds a borrow.", "delivered"))
        await until(lambda: recorder.seen("dm_on_response_received", a,
                                          (message_id, "Me: a lifetime bounds a borrow.")))
        assert a.state["sent_messages"][message_id]["status"] == "responded"

        await actions.expire_message(a, message_id)
        assert recorder.seen("dm_on_message_expired", a, message_id)

        # Independent state: the message sits in B's inbox (forwarded, unanswered) and nowhere else.
        assert [m["message_id"] for m in b.state["inbox"]] == [message_id]
        assert a.state["inbox"] == [] and c.state["inbox"] == []
        assert message_id in a.state["sent_messages"]
        assert message_id not in b.state["sent_messages"] and message_id not in c.state["sent_messages"]
        # Nothing happened on a node where it did not happen.
        assert not recorder.seen("dm_on_message_received", a)
        assert not recorder.seen("dm_on_response_received", b) and not recorder.seen("dm_on_response_received", c)
