"""Inbound A2A: the official a2a-sdk client (JSON-RPC and REST) talks to a real node on loopback, and the
agent answers through a real MCP client session to the same node."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from a2a.client import A2ACardResolver
from a2a.types import CancelTaskRequest, GetTaskRequest, Part, SubscribeToTaskRequest, TaskState
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError, UnsupportedOperationError
from a2a.utils.signing import InvalidSignaturesError, create_signature_verifier
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from darkmatter import hookimpl
from darkmatter.api import ConfigError, StartupError
from darkmatter.testing import make_node

from bridge_harness import BINDINGS, a2a_client, bridge_node, call, mcp_client, send_request, wait_for

pytestmark = pytest.mark.anyio

S = TaskState


async def until_state(client, task_id: str, state: int, timeout: float = 10.0):
    """Poll GetTask (bounded) until the task is in ``state``; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        task = await client.get_task(GetTaskRequest(id=task_id))
        if task.status.state == state or loop.time() > deadline:
            assert task.status.state == state, TaskState.Name(task.status.state)
            return task
        await asyncio.sleep(0.02)


def verifier_for(public_key_hex: str):
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    return create_signature_verifier(lambda kid, jku: key, ["EdDSA"])


async def stored_state(node, task_id: str) -> int:
    from darkmatter_a2a_bridge import bridge_for

    stored = await bridge_for(node).store.get(task_id, None)
    return stored.task.status.state if stored else None


def test_entry_point_is_wired(tmp_path):
    node = make_node(tmp_path, plugins="http_transport,a2a_bridge")
    assert "a2a_bridge" in {p["name"] for p in node.plugin_list()}
    assert {"darkmatter_a2a_send", "darkmatter_a2a_get_task"} <= set(node.tools)
    assert {("GET", "/.well-known/agent-card.json"), ("GET", "/.well-known/agent.json"), ("*", "/a2a")} <= \
        set(node.route_owners)


async def test_agent_card_is_signed_with_the_node_key_and_describes_the_agent(tmp_path):
    async with bridge_node(tmp_path, DARKMATTER_DISPLAY_NAME="Ada", DARKMATTER_BIO="Knows about engines.") as node:
        async with httpx.AsyncClient(trust_env=False) as http:
            resolver = A2ACardResolver(http, node.base_url)
            card = await resolver.get_agent_card(signature_verifier=verifier_for(node.public_key_hex))
            legacy = await resolver.get_agent_card(relative_card_path="/.well-known/agent.json",
                                                   signature_verifier=verifier_for(node.public_key_hex))
            raw = (await http.get(node.base_url + "/.well-known/agent.json")).json()
            with pytest.raises(InvalidSignaturesError):  # another key does not verify it
                verifier_for("ab" * 32)(card)
        assert card.name == "Ada" and card.description == "Knows about engines."
        assert [s.description for s in card.skills] == ["Knows about engines."]
        assert {(i.protocol_binding, i.url) for i in card.supported_interfaces} == {
            ("JSONRPC", node.base_url + "/a2a/jsonrpc"), ("HTTP+JSON", node.base_url + "/a2a/rest")}
        assert card.capabilities.streaming is True
        header = json.loads(base64.urlsafe_b64decode(card.signatures[0].protected + "=="))
        assert header["alg"] == "EdDSA" and header["kid"] == node.public_key_hex
        assert legacy == card  # the same signed card; the 0.3 fields are extra
        assert raw["url"] == node.base_url + "/a2a/jsonrpc" and raw["protocolVersion"] == "0.3.0"
        tampered = type(card)()
        tampered.CopyFrom(card)
        tampered.description = "Knows nothing."
        with pytest.raises(InvalidSignaturesError):
            verifier_for(node.public_key_hex)(tampered)
        # a new bio is on the card at once, signed again
        async with mcp_client(node) as session:
            await call(session, "darkmatter_update_bio", bio="Now knows about boats.")
        async with httpx.AsyncClient(trust_env=False) as http:
            fresh = await A2ACardResolver(http, node.base_url).get_agent_card(
                signature_verifier=verifier_for(node.public_key_hex))
        assert fresh.description == "Now knows about boats."


async def test_skills_come_from_DARKMATTER_A2A_SKILLS_and_a_bad_value_stops_the_node(tmp_path):
    skills = json.dumps([{"name": "Translate", "description": "French to English", "tags": ["language"],
                          "examples": ["Bonjour?"]}, "Summarize"])
    async with bridge_node(tmp_path / "ok", DARKMATTER_A2A_SKILLS=skills) as node:
        async with httpx.AsyncClient(trust_env=False) as http:
            card = await A2ACardResolver(http, node.base_url).get_agent_card(
                signature_verifier=verifier_for(node.public_key_hex))
    assert [(s.id, s.name, s.description, list(s.tags)) for s in card.skills] == [
        ("translate", "Translate", "French to English", ["language"]),
        ("summarize", "Summarize", "Summarize", ["darkmatter"])]
    assert list(card.skills[0].examples) == ["Bonjour?"]
    node = make_node(tmp_path / "bad", plugins="http_transport,a2a_bridge", DARKMATTER_A2A_SKILLS="{not json")
    with pytest.raises((ConfigError, StartupError), match="DARKMATTER_A2A_SKILLS"):
        await node.start()


@pytest.mark.parametrize("binding", sorted(BINDINGS))
async def test_a_message_answered_through_mcp_completes_the_task(tmp_path, binding):
    """The agent's reading (dm_on_message_seen) makes the task WORKING; its answer goes back through the
    bridge's dm_claim_message claim, never through a mesh webhook."""
    async with bridge_node(tmp_path) as node, a2a_client(node, binding) as client, mcp_client(node) as agent:
        reply = [r async for r in client.send_message(send_request("What is 6 x 7?"))][0]
        task = reply.task
        assert task.status.state == S.TASK_STATE_SUBMITTED and task.history[0].parts[0].text == "What is 6 x 7?"

        inbox = await call(agent, "darkmatter_list_inbox")
        [listed] = inbox["messages"]
        assert listed["from_agent_id"] == "a2a:127.0.0.1" and listed["verified"] is False
        assert listed["outside_mesh"] is True and listed["metadata"]["a2a"]["task_id"] == task.id
        await until_state(client, task.id, S.TASK_STATE_WORKING)  # seeing it (a background event) starts the work

        message = await call(agent, "darkmatter_get_message", message_id=listed["message_id"])
        assert message["content"] == "What is 6 x 7?"
        answered = await call(agent, "darkmatter_respond_message", message_id=listed["message_id"], response="42")
        assert answered["success"] is True and answered["delivery"] == "delivered"

        done = await client.get_task(GetTaskRequest(id=task.id))
        assert done.status.state == S.TASK_STATE_COMPLETED
        assert [p.text for a in done.artifacts for p in a.parts] == ["42"]
        assert (await call(agent, "darkmatter_list_inbox"))["total"] == 0
        assert node.state["outbox"] == []


@pytest.mark.parametrize("binding", sorted(BINDINGS))
async def test_streaming_shows_every_state_change(tmp_path, binding):
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent:
        events: list = []

        async def stream():
            async with a2a_client(node, binding, streaming=True) as client:
                async for event in client.send_message(send_request("Stream me", immediately=False)):
                    events.append(event)

        streaming = asyncio.create_task(stream())
        await wait_for(lambda: events)
        task_id = events[0].task.id
        resubscribed: list = []

        async def subscribe():
            async with a2a_client(node, binding, streaming=True) as client:
                async for event in client.subscribe(SubscribeToTaskRequest(id=task_id)):
                    resubscribed.append(event)

        following = asyncio.create_task(subscribe())
        await wait_for(lambda: resubscribed)
        [listed] = (await call(agent, "darkmatter_list_inbox"))["messages"]
        await wait_for(lambda: len(events) >= 2)
        await call(agent, "darkmatter_respond_message", message_id=listed["message_id"], response="streamed answer")
        await asyncio.wait_for(streaming, 10)
        await asyncio.wait_for(following, 10)

    def trail(stream_events):
        out = []
        for e in stream_events:
            kind = e.WhichOneof("payload")
            if kind == "task":
                out.append(("task", e.task.status.state))
            elif kind == "status_update":
                out.append(("status", e.status_update.status.state))
            else:
                out.append(("artifact", e.artifact_update.artifact.parts[0].text))
        return out

    expected_tail = [("status", S.TASK_STATE_WORKING), ("artifact", "streamed answer"),
                     ("status", S.TASK_STATE_COMPLETED)]
    assert trail(events) == [("task", S.TASK_STATE_SUBMITTED), *expected_tail]
    assert trail(resubscribed) == [("task", S.TASK_STATE_SUBMITTED), *expected_tail]


class ExpiryProbe:
    name = "expiry_probe"

    def __init__(self):
        self.expired: list[tuple[str, str]] = []

    @hookimpl
    def dm_on_message_expired(self, node, message_id, reason):
        self.expired.append((message_id, reason))


@pytest.mark.parametrize("binding", sorted(BINDINGS))
async def test_cancel_takes_the_message_out_of_the_inbox(tmp_path, binding):
    probe = ExpiryProbe()
    async with bridge_node(tmp_path, extra=[probe]) as node, a2a_client(node, binding) as client, \
            mcp_client(node) as agent:
        task = [r async for r in client.send_message(send_request("Never mind"))][0].task
        [listed] = (await call(agent, "darkmatter_list_inbox"))["messages"]
        canceled = await client.cancel_task(CancelTaskRequest(id=task.id))
        assert canceled.status.state == S.TASK_STATE_CANCELED
        await wait_for(lambda: probe.expired)
        assert probe.expired == [(listed["message_id"], "the A2A caller's task was canceled")]
        assert (await client.get_task(GetTaskRequest(id=task.id))).status.state == S.TASK_STATE_CANCELED
        assert (await call(agent, "darkmatter_list_inbox"))["total"] == 0
        late = await agent.call_tool("darkmatter_respond_message", {"message_id": listed["message_id"],
                                                                    "response": "too late"})
        assert late.is_error and "No message" in late.content[0].text
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(CancelTaskRequest(id=task.id))
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id="no-such-task"))


async def test_expiring_the_message_cancels_the_task(tmp_path):
    probe = ExpiryProbe()
    async with bridge_node(tmp_path, extra=[probe]) as node, a2a_client(node) as client, mcp_client(node) as agent:
        task = [r async for r in client.send_message(send_request("Please ignore"))][0].task
        [listed] = (await call(agent, "darkmatter_list_inbox"))["messages"]
        expired = await call(agent, "darkmatter_expire_message", message_id=listed["message_id"])
        assert expired["status"] == "expired"
        await asyncio.sleep(0.1)
        assert probe.expired == [(listed["message_id"], "expired by the agent")]  # once, from the kernel
        final = await client.get_task(GetTaskRequest(id=task.id))
        assert final.status.state == S.TASK_STATE_CANCELED
        assert final.status.message.parts[0].text == "The agent declined this message."
        assert (await call(agent, "darkmatter_list_inbox"))["total"] == 0


async def test_a_blocking_send_waits_a_bounded_time_then_answers_with_the_open_task(tmp_path):
    async with bridge_node(tmp_path, DARKMATTER_A2A_BLOCK_SECONDS="3") as node, a2a_client(node) as client, \
            mcp_client(node) as agent:
        loop = asyncio.get_running_loop()

        async def read_without_answering():
            await wait_for(lambda: node.state["inbox"])
            await call(agent, "darkmatter_list_inbox")

        reading = asyncio.create_task(read_without_answering())
        started = loop.time()
        task = [r async for r in client.send_message(send_request("Slow question", immediately=False))][0].task
        await reading
        assert loop.time() - started >= 2.9  # it did wait for the answer
        assert task.status.state == S.TASK_STATE_WORKING  # and then answered with the task still open


async def test_a_blocking_send_answered_in_time_returns_the_completed_task(tmp_path):
    async with bridge_node(tmp_path) as node, a2a_client(node) as client, mcp_client(node) as agent:
        async def answer_soon():
            listed = await wait_for(lambda: node.state["inbox"])
            await call(agent, "darkmatter_get_message", message_id=listed[0]["message_id"])
            await call(agent, "darkmatter_respond_message", message_id=listed[0]["message_id"], response="quick")

        answering = asyncio.create_task(answer_soon())
        quick = [r async for r in client.send_message(send_request("Quick question", immediately=False))][0].task
        await answering
        assert quick.status.state == S.TASK_STATE_COMPLETED and quick.artifacts[0].parts[0].text == "quick"


async def test_tasks_survive_a_restart_and_are_answered_and_streamed_after_it(tmp_path):
    async with bridge_node(tmp_path) as node, a2a_client(node) as client:
        task = [r async for r in client.send_message(send_request("Before the restart"))][0].task
        other = [r async for r in client.send_message(send_request("Cancel me later"))][0].task
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent:
        async with a2a_client(node) as client:
            assert (await client.get_task(GetTaskRequest(id=task.id))).status.state == S.TASK_STATE_SUBMITTED
        events: list = []

        async def subscribe():
            async with a2a_client(node, streaming=True) as client:
                async for event in client.subscribe(SubscribeToTaskRequest(id=task.id)):
                    events.append(event)

        following = asyncio.create_task(subscribe())
        await wait_for(lambda: events)
        listed = {m["content"]: m for m in (await call(agent, "darkmatter_list_inbox"))["messages"]}
        await call(agent, "darkmatter_respond_message", message_id=listed["Before the restart"]["message_id"],
                   response="after")
        await asyncio.wait_for(following, 10)
        assert [e.WhichOneof("payload") for e in events] == ["task", "status_update", "artifact_update",
                                                             "status_update"]
        assert events[-1].status_update.status.state == S.TASK_STATE_COMPLETED
        async with a2a_client(node, "rest") as client:
            done = await client.get_task(GetTaskRequest(id=task.id))
            assert done.status.state == S.TASK_STATE_COMPLETED and done.artifacts[0].parts[0].text == "after"
            canceled = await client.cancel_task(CancelTaskRequest(id=other.id))
            assert canceled.status.state == S.TASK_STATE_CANCELED
        assert (await call(agent, "darkmatter_list_inbox"))["total"] == 0
    async with bridge_node(tmp_path) as node, a2a_client(node) as client:
        assert (await client.get_task(GetTaskRequest(id=other.id))).status.state == S.TASK_STATE_CANCELED


async def test_refused_messages_become_rejected_tasks_that_say_why(tmp_path):
    async with bridge_node(tmp_path, DARKMATTER_INBOX_MAX="2") as node, a2a_client(node) as client:
        first = [r async for r in client.send_message(send_request("one"))][0].task
        second = [r async for r in client.send_message(send_request("two"))][0].task
        assert first.status.state == S.TASK_STATE_SUBMITTED
        assert second.status.state == S.TASK_STATE_REJECTED  # one sender holds at most half of the inbox
        assert "inbox is full" in second.status.message.parts[0].text
        assert len(node.state["inbox"]) == 1
    async with bridge_node(tmp_path / "rate", DARKMATTER_RATE_MESSAGE_PEER="1/1/60") as node, \
            a2a_client(node) as client:
        [r async for r in client.send_message(send_request("one"))]
        limited = [r async for r in client.send_message(send_request("two"))][0].task
        assert limited.status.state == S.TASK_STATE_REJECTED
        assert "too many messages" in limited.status.message.parts[0].text
    async with bridge_node(tmp_path / "inactive") as node, a2a_client(node) as client:
        node.state["status"] = "inactive"
        asleep = [r async for r in client.send_message(send_request("hello"))][0].task
        assert asleep.status.state == S.TASK_STATE_REJECTED and "inactive" in asleep.status.message.parts[0].text


async def test_only_one_text_message_per_task_is_taken(tmp_path):
    async with bridge_node(tmp_path) as node, a2a_client(node) as client:
        task = [r async for r in client.send_message(send_request("first"))][0].task
        with pytest.raises(UnsupportedOperationError, match="one message per task"):
            [r async for r in client.send_message(send_request("more", task_id=task.id))]
        request = send_request("ignored")
        del request.message.parts[:]
        request.message.parts.append(Part(url="https://example.com/file.pdf"))
        with pytest.raises(Exception, match="text/plain"):
            [r async for r in client.send_message(request)]
        assert len(node.state["inbox"]) == 1


JSONRPC_BAD = [
    (b"{not json", -32700),
    (b"\xff\xfe{}", -32700),
    (b"[]", -32600),
    (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "NoSuchMethod", "params": {}}).encode(), -32601),
    (json.dumps({"jsonrpc": "2.0", "id": 2, "method": "SendMessage", "params": {"message": 5}}).encode(), -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 3, "method": "SendMessage", "params": {}}).encode(), -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 4, "method": "GetTask", "params": {"id": "nope"}}).encode(), -32001),
    (json.dumps({"jsonrpc": "2.0", "id": 5, "method": "GetTask", "params": {"id": "x", "historyLength": -1}}).encode(),
     -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 6, "method": "CancelTask", "params": {"id": "nope"}}).encode(), -32001),
    (json.dumps({"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"message": {
        "messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x" * 70000}]}}}).encode(), -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 8, "method": "ListTasks", "params": {"pageToken": "%%%"}}).encode(),
     -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 9, "method": "CreateTaskPushNotificationConfig",
                 "params": {"taskId": "t", "url": "http://169.254.169.254/"}}).encode(), -32003),
]

REST_BAD = [
    ("POST", "/a2a/rest/message:send", b"{not json", 400),
    ("POST", "/a2a/rest/message:send", b"\xff\xfe{}", 400),
    ("POST", "/a2a/rest/message:stream", b"\xff\xfe{}", 400),
    ("POST", "/a2a/rest/message:send", json.dumps({"message": {"messageId": "m", "role": "ROLE_USER", "parts": [
        {"text": "a\ud800b"}]}}).encode(), 400),
    ("POST", "/a2a/rest/message:send", json.dumps({"message": {"parts": "text"}}).encode(), 400),
    ("GET", "/a2a/rest/tasks/nope", b"", 404),
    ("POST", "/a2a/rest/tasks/nope:cancel", b"", 404),
    ("GET", "/a2a/rest/tasks?pageSize=1000", b"", 400),
    ("GET", "/a2a/rest/nothing-here", b"", 404),
    ("DELETE", "/a2a/rest/message:send", b"", 405),
]


async def test_bad_requests_get_a2a_errors_never_a_500(tmp_path):
    async with bridge_node(tmp_path) as node:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False,
                                     headers={"A2A-Version": "1.0"}) as http:
            for body, code in JSONRPC_BAD:
                response = await http.post("/a2a/jsonrpc", content=body,
                                           headers={"Content-Type": "application/json"})
                assert response.status_code == 200, (body[:80], response.text)
                error = response.json()["error"]
                assert error["code"] == code, (body[:80], error)
                assert error["message"]
            for method, path, body, status in REST_BAD:
                response = await http.request(method, path, content=body,
                                              headers={"Content-Type": "application/json"})
                assert response.status_code == status, (method, path, response.text)
                assert "error" in response.json(), response.text
            huge = await http.post("/a2a/jsonrpc", content=b"{" + b" " * (1024 * 1024 + 1) + b"}",
                                   headers={"Content-Type": "application/json"})
            assert huge.status_code == 413 and huge.json()["error"]["code"] == -32600
        assert node.state["inbox"] == []


async def test_who_may_call_follows_DARKMATTER_A2A_INBOUND(tmp_path):
    sent = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
        "messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}, "configuration": {
        "returnImmediately": True}}})
    proxied = {"X-Forwarded-For": "203.0.113.9", "Content-Type": "application/json", "A2A-Version": "1.0"}
    async with bridge_node(tmp_path / "local") as node:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False, headers={"A2A-Version": "1.0"}) as http:
            # through a proxy the caller is not on this machine: it needs the node's token
            refused = await http.post("/a2a/jsonrpc", content=sent, headers=proxied)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "token" in refused.json()["error"]["message"]
            rest = await http.get("/a2a/rest/tasks", headers=proxied)
            assert rest.status_code == 401 and rest.json()["error"]["status"] == "UNAUTHENTICATED"
            allowed = await http.post("/a2a/jsonrpc", content=sent,
                                      headers={**proxied, "Authorization": f"Bearer {node.token}"})
            assert allowed.status_code == 200 and allowed.json()["result"]["task"]["status"]["state"] == \
                "TASK_STATE_SUBMITTED"
            wrong = await http.post("/a2a/jsonrpc", content=sent, headers={**proxied, "Authorization": "Bearer x"})
            assert wrong.status_code == 401
            browser = await http.post("/a2a/jsonrpc", content=sent, headers={
                "Origin": "https://evil.example", "Content-Type": "text/plain"})
            assert browser.status_code == 403
            rebound = await http.post("/a2a/jsonrpc", content=sent, headers={"Host": "evil.example"})
            assert rebound.status_code == 421
            card = await http.get("/.well-known/agent-card.json", headers={"X-Forwarded-For": "203.0.113.9"})
            assert card.status_code == 200  # the card itself is public
        assert [m["from_agent_id"] for m in node.state["inbox"]] == ["a2a:proxied:127.0.0.1"]  # the token holder
    async with bridge_node(tmp_path / "off", DARKMATTER_A2A_INBOUND="off") as node:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False, headers={"A2A-Version": "1.0"}) as http:
            off = await http.post("/a2a/jsonrpc", content=sent, headers={"Content-Type": "application/json"})
            assert off.status_code == 403 and "DARKMATTER_A2A_INBOUND=off" in off.json()["error"]["message"]
        assert node.state["inbox"] == []
    async with bridge_node(tmp_path / "on", DARKMATTER_A2A_INBOUND="on") as node:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False, headers={"A2A-Version": "1.0"}) as http:
            remote = await http.post("/a2a/jsonrpc", content=sent, headers=proxied)
            assert remote.status_code == 200
            remote_id = remote.json()["result"]["task"]["id"]
            local = await http.post("/a2a/jsonrpc", content=sent.replace("m1", "m2"),
                                    headers={"Content-Type": "application/json"})
            local_id = local.json()["result"]["task"]["id"]
            # a caller from elsewhere sees its own tasks only; a local one sees them all
            everything = (await http.get("/a2a/rest/tasks")).json()["tasks"]
            assert sorted(t["id"] for t in everything) == sorted([remote_id, local_id])
            own = (await http.get("/a2a/rest/tasks", headers=proxied)).json()["tasks"]
            assert [t["id"] for t in own] == [remote_id]
            hidden = await http.get(f"/a2a/rest/tasks/{local_id}", headers=proxied)
            assert hidden.status_code == 404
            denied = await http.post(f"/a2a/rest/tasks/{local_id}:cancel", headers=proxied)
            assert denied.status_code == 404
        assert sorted(m["from_agent_id"] for m in node.state["inbox"]) == ["a2a:127.0.0.1",
                                                                           "a2a:proxied:127.0.0.1"]
    node = make_node(tmp_path / "bad", plugins="http_transport,a2a_bridge", DARKMATTER_A2A_INBOUND="maybe")
    with pytest.raises((ConfigError, StartupError), match="DARKMATTER_A2A_INBOUND"):
        await node.start()


async def test_each_source_has_a_request_budget(tmp_path):
    proxied = {"X-Forwarded-For": "203.0.113.9", "A2A-Version": "1.0"}
    async with bridge_node(tmp_path, DARKMATTER_A2A_INBOUND="on", DARKMATTER_RATE_GET_IP="3/1/60") as node:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False) as http:
            statuses = [(await http.get("/a2a/rest/tasks", headers=proxied)).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            limited = await http.get("/a2a/rest/tasks", headers=proxied)
            assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["status"] == \
                "RESOURCE_EXHAUSTED"
            # a caller on this machine has its own budget (ten times the row, as on the mesh)
            assert (await http.get("/a2a/rest/tasks", headers={"A2A-Version": "1.0"})).status_code == 200


async def test_finished_tasks_are_capped_rejected_ones_first(tmp_path):
    async with bridge_node(tmp_path, DARKMATTER_INBOX_MAX="2", DARKMATTER_A2A_TASKS_KEPT="10") as node, \
            a2a_client(node) as client, mcp_client(node) as agent:
        kept = [r async for r in client.send_message(send_request("the one that is answered"))][0].task
        rejected = [[r async for r in client.send_message(send_request(f"refused {n}"))][0].task for n in range(11)]
        assert {t.status.state for t in rejected} == {S.TASK_STATE_REJECTED}
        from darkmatter_a2a_bridge import bridge_for

        tasks = bridge_for(node).store.records
        assert len(tasks) == 11 and rejected[0].id not in tasks and kept.id in tasks
        [listed] = (await call(agent, "darkmatter_list_inbox"))["messages"]
        await call(agent, "darkmatter_respond_message", message_id=listed["message_id"], response="done")
        assert len(tasks) == 10 and kept.id in tasks and rejected[1].id not in tasks
    async with bridge_node(tmp_path) as node, a2a_client(node) as client:  # and so it stays after a restart
        assert (await client.get_task(GetTaskRequest(id=kept.id))).status.state == S.TASK_STATE_COMPLETED
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id=rejected[1].id))


async def test_a_0_3_client_reaches_the_agent_through_the_legacy_card(tmp_path):
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent:
        async with httpx.AsyncClient(base_url=node.base_url, trust_env=False) as http:
            legacy = (await http.get("/.well-known/agent.json")).json()
            send = {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {
                "message": {"messageId": "m1", "role": "user", "parts": [{"kind": "text", "text": "old client"}]},
                "configuration": {"blocking": False}}}
            task = (await http.post(legacy["url"], json=send)).json()["result"]
            assert task["kind"] == "task" and task["status"]["state"] == "submitted"
            [listed] = (await call(agent, "darkmatter_list_inbox"))["messages"]
            assert listed["content"] == "old client"
            await call(agent, "darkmatter_respond_message", message_id=listed["message_id"], response="new answer")
            got = (await http.post(legacy["url"], json={"jsonrpc": "2.0", "id": 2, "method": "tasks/get",
                                                        "params": {"id": task["id"]}})).json()["result"]
            assert got["status"]["state"] == "completed"
            assert got["artifacts"][0]["parts"][0]["text"] == "new answer"
