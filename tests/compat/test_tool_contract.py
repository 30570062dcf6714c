"""The original implementation's MCP tools (protocol 0.2): their argument names and result keys, held against
this node so that agent instructions and scripts written for the original keep working (issue 15).

``ORIGINAL`` is the contract, written down from the original's documented behaviour: its tool list, the
arguments of each tool and the JSON each returned (docs/protocol.md §1.3 lists what 0.3 refuses on purpose;
none of it concerns a tool's arguments or result keys). The original was a FastMCP server whose tools took
one pydantic model, so its ``tools/list`` showed the arguments inside ``{"params": {...}}``; its agent
instructions spelled them flat (``darkmatter_ask_impression(ask_agent_id=..., about_agent_id=...)``). This
node accepts both spellings.

The checks, through a real MCP client session on the node's ``/mcp``:
* ``tools/list``: every original tool is listed, every original argument name is a property, nothing is
  required that the original did not require, and the original's calls (minimal and full) validate against
  the advertised input schema;
* real calls with the original's argument names (flat and enveloped) return at least the original's
  top-level keys, and list entries at least the original's entry keys, with the original's meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

import httpx2
import jsonschema
import pytest
from legacy02 import Legacy02Node
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from darkmatter.mesh import outbound as actions
from darkmatter.testing import make_node, node_context
from darkmatter.tools import Session, Tool

pytestmark = pytest.mark.anyio


@dataclass
class Original:
    """One tool of the original: argument names, and result keys per outcome (top level and list entries)."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    results: dict[str, tuple[str, ...]] = field(default_factory=dict)
    entries: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def envelope(self) -> bool:
        """The original took a pydantic model: FastMCP advertised its arguments as ``{"params": {...}}``."""
        return bool(self.required or self.optional)


MESSAGE_ENTRY = ("message_id", "content", "webhook", "hops_remaining", "can_forward", "from_agent_id", "verified",
                 "metadata", "received_at")

ORIGINAL: dict[str, Original] = {
    "darkmatter_authenticate": Original(
        optional=("private_key_hex",), results={"ok": ("success", "status", "agent_id", "public_key_hex")}),
    "darkmatter_request_connection": Original(
        required=("target_url",),
        results={"connected": ("success", "status", "agent_id", "agent_bio"),
                 "pending": ("success", "status", "message", "request_id")}),
    "darkmatter_respond_connection": Original(
        required=("request_id", "accept"), results={"ok": ("success", "accepted", "agent_id")}),
    "darkmatter_disconnect": Original(required=("agent_id",), results={"ok": ("success", "disconnected_from")}),
    "darkmatter_send_message": Original(
        required=("content",), optional=("target_agent_id", "metadata", "hops_remaining"),
        results={"ok": ("success", "message_id", "routed_to", "hops_remaining", "webhook")}),
    "darkmatter_update_bio": Original(required=("bio",), results={"ok": ("success", "bio")}),
    "darkmatter_set_status": Original(required=("status",), results={"ok": ("success", "status")}),
    "darkmatter_get_identity": Original(results={"ok": (
        "agent_id", "display_name", "public_key_hex", "bio", "status", "port", "num_connections",
        "num_pending_requests", "messages_handled", "message_queue_size", "sent_messages_count", "created_at")}),
    "darkmatter_list_connections": Original(
        results={"ok": ("total", "max_connections", "connections")},
        entries={"connections": ("agent_id", "display_name", "agent_url", "agent_bio", "bio_summary", "crypto",
                                 "transport", "direction", "connected_at", "messages_sent", "messages_received",
                                 "messages_declined", "avg_response_time_ms", "last_activity")}),
    "darkmatter_list_pending_requests": Original(
        results={"ok": ("total", "requests")},
        entries={"requests": ("request_id", "from_agent_id", "from_agent_display_name", "from_agent_url",
                              "from_agent_bio", "crypto", "requested_at")}),
    "darkmatter_list_inbox": Original(results={"ok": ("total", "messages")}, entries={"messages": MESSAGE_ENTRY}),
    "darkmatter_get_message": Original(required=("message_id",), results={"ok": MESSAGE_ENTRY}),
    "darkmatter_respond_message": Original(
        required=("message_id", "response"),
        results={"ok": ("success", "message_id", "webhook_called", "response_time_ms", "error")}),
    "darkmatter_forward_message": Original(
        required=("message_id", "target_agent_id"), optional=("note", "force"),
        results={"ok": ("success", "message_id", "forwarded_to", "hops_remaining_for_target",
                        "message_still_in_queue", "hint", "note")}),
    "darkmatter_list_messages": Original(
        results={"ok": ("total", "messages")},
        entries={"messages": ("message_id", "content", "status", "initial_hops", "forwarding_count",
                              "updates_count", "created_at")}),
    "darkmatter_get_sent_message": Original(
        required=("message_id",),
        results={"ok": ("message_id", "content", "status", "initial_hops", "forwarding_count", "routed_to",
                        "created_at", "updates", "response")}),
    "darkmatter_expire_message": Original(required=("message_id",),
                                          results={"ok": ("success", "message_id", "status")}),
    "darkmatter_get_server_template": Original(results={"ok": (
        "template_from", "server_source", "bootstrap_instructions", "core_primitives", "compatibility_note")}),
    "darkmatter_network_info": Original(
        results={"ok": ("agent_id", "display_name", "public_key_hex", "agent_url", "bio", "accepting_connections",
                        "peers")},
        entries={"peers": ("agent_id", "agent_url", "agent_bio")}),
    "darkmatter_discover_domain": Original(
        required=("domain",),
        # {"found": true, **the well-known document}
        results={"found": ("found", "darkmatter", "protocol_version", "agent_id", "public_key_hex", "bio",
                           "accepting_connections", "mesh_url"),
                 "not_found": ("found", "error")}),
    "darkmatter_discover_local": Original(
        results={"ok": ("discovery_enabled", "total", "peers")},
        entries={"peers": ("agent_id", "url", "bio", "status", "accepting", "last_seen")}),
    "darkmatter_set_impression": Original(
        required=("agent_id", "impression"), results={"ok": ("success", "agent_id", "action", "impression")}),
    "darkmatter_get_impression": Original(
        required=("agent_id",), results={"ok": ("agent_id", "has_impression", "impression")}),
    "darkmatter_delete_impression": Original(required=("agent_id",),
                                             results={"ok": ("success", "agent_id", "action")}),
    "darkmatter_ask_impression": Original(
        required=("ask_agent_id", "about_agent_id"),
        results={"ok": ("success", "asked", "about", "has_impression", "impression")}),
    "darkmatter_upgrade_webrtc": Original(required=("agent_id",),
                                          results={"ok": ("success", "transport", "agent_id", "display_name")}),
    # the original answered with its status line as plain text: no keys to keep
    "darkmatter_status": Original(results={"ok": ()}),
}
# NOTE: later 0.2 builds also had darkmatter_set_rate_limit (per-connection limits set by the agent); this node
# applies the fixed limits of docs/protocol.md §13.1 instead and has no such tool.

SAMPLE = {"accept": True, "force": False, "hops_remaining": 5, "metadata": {"topic": "sqlite"}, "status": "active",
          "private_key_hex": "ab" * 32, "target_url": "http://127.0.0.1:8101/mcp", "domain": "localhost:8101"}


def sample_call(contract: Original, *, full: bool) -> dict:
    names = contract.required + (contract.optional if full else ())
    return {name: SAMPLE.get(name, "msg-0123456789ab") for name in names}


def mcp_client(node) -> Client:
    http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=120.0))
    return Client(streamable_http_client(f"http://127.0.0.1:{node.port}/mcp", http_client=http))


class OriginalScript:
    """Calls tools as a script written against the original does: its argument names, flat or in the FastMCP
    envelope, the result read as JSON from the text content. Checks each result against ``ORIGINAL``."""

    def __init__(self, client: Client, style: str):
        self.client = client
        self.style = style
        self.covered: set[tuple[str, str]] = set()
        self.entries_checked: set[tuple[str, str]] = set()

    async def __call__(self, name: str, outcome: str = "ok", **args) -> dict:
        contract = ORIGINAL[name]
        assert set(args) <= set(contract.required + contract.optional), f"{name}: not an original argument"
        arguments = {"params": args} if self.style == "envelope" and contract.envelope else args
        result = await self.client.call_tool(name, arguments)
        assert not result.is_error, f"{name}({arguments}): {result.content[0].text}"
        data = json.loads(result.content[0].text)
        assert data == result.structured_content
        missing = set(contract.results[outcome]) - set(data)
        assert not missing, f"{name} ({outcome}) lacks the original's keys {sorted(missing)}"
        for key, keys in contract.entries.items():
            for entry in data[key]:
                lacking = set(keys) - set(entry)
                assert not lacking, f"{name}: an entry of {key} lacks the original's keys {sorted(lacking)}"
                self.entries_checked.add((name, key))
        self.covered.add((name, outcome))
        return data


async def wait_for(predicate, timeout: float = 10.0):
    for _ in range(int(timeout / 0.02)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_tools_list_accepts_every_original_call(tmp_path):
    async with node_context(tmp_path, plugins="http_transport,bootstrap,discovery_local,webrtc_transport") as node, \
            mcp_client(node) as client:
        listed = {tool.name: tool.input_schema for tool in (await client.list_tools()).tools}
        assert set(ORIGINAL) <= set(listed), f"original tools missing: {sorted(set(ORIGINAL) - set(listed))}"
        for name, contract in ORIGINAL.items():
            schema = listed[name]
            properties = schema.get("properties", {})
            assert set(contract.required + contract.optional) <= set(properties), name
            assert set(schema.get("required", [])) <= set(contract.required), \
                f"{name} requires {sorted(set(schema['required']) - set(contract.required))}, the original did not"
            validator = jsonschema.Draft202012Validator(schema)
            for full in (False, True):
                call = sample_call(contract, full=full)
                problems = [e.message for e in validator.iter_errors(call)]
                assert not problems, f"{name}({call}) is refused by the advertised schema: {problems}"


async def test_ask_impression_schema_names_the_alias_and_requires_neither_spelling(tmp_path):
    async with node_context(tmp_path) as node, mcp_client(node) as client:
        schema = {t.name: t.input_schema for t in (await client.list_tools()).tools}["darkmatter_ask_impression"]
        assert schema["required"] == ["about_agent_id"]
        assert "Required (or give it as agent_id)" in schema["properties"]["ask_agent_id"]["description"]
        assert "Alias of ask_agent_id" in schema["properties"]["agent_id"]["description"]
        assert "anyOf" not in schema and "oneOf" not in schema and "allOf" not in schema


@contextlib.asynccontextmanager
async def contract_network(tmp_path):
    """A (under test, not genesis; local discovery aimed at the 0.2 node's port), B (0.3 genesis), C (0.3) and
    L (0.2, not genesis)."""
    async with Legacy02Node("legacy-peer") as legacy, contextlib.AsyncExitStack() as stack:
        a = make_node(tmp_path / "a", plugins="http_transport,bootstrap,discovery_local", DARKMATTER_GENESIS="false",
                      DARKMATTER_DISCOVERY="true", DARKMATTER_DISCOVERY_PORTS=str(legacy.port),
                      DARKMATTER_DISCOVERY_INTERVAL="3600")
        b = make_node(tmp_path / "b", DARKMATTER_GENESIS="true", DARKMATTER_BIO="B answers SQLite questions.")
        c = make_node(tmp_path / "c", DARKMATTER_DISPLAY_NAME="c")
        for node in (a, b, c):
            await stack.enter_async_context(node)
        yield a, b, c, legacy


@pytest.mark.parametrize("style", ["flat", "envelope"])
async def test_original_calls_return_the_original_result_keys(tmp_path, style):
    async with contract_network(tmp_path) as (a, b, c, legacy), mcp_client(a) as client:
        call = OriginalScript(client, style)

        auth = await call("darkmatter_authenticate")
        assert auth["success"] is True and auth["agent_id"] == a.agent_id and auth["status"] == "claimed"
        assert (await call("darkmatter_update_bio", bio="I review Python code."))["bio"] == "I review Python code."
        assert (await call("darkmatter_set_status", status="active"))["status"] == "active"

        joined = await call("darkmatter_request_connection", "connected", target_url=f"{b.base_url}/mcp")
        assert joined["status"] == "connected" and joined["agent_id"] == b.agent_id
        assert joined["agent_bio"] == "B answers SQLite questions."
        queued = await call("darkmatter_request_connection", "pending", target_url=f"{legacy.base_url}/mcp")
        assert queued["success"] is True and queued["status"] == "pending"
        assert queued["request_id"] in legacy.pending_requests

        assert (await actions.request_connection(c, a.base_url))["status"] == "pending"
        pending = await call("darkmatter_list_pending_requests")
        assert pending["total"] == 1 and pending["requests"][0]["from_agent_id"] == c.agent_id
        assert pending["requests"][0]["crypto"] is True
        accepted = await call("darkmatter_respond_connection", request_id=pending["requests"][0]["request_id"],
                              accept=True)
        assert accepted["success"] is True and accepted["accepted"] is True and accepted["agent_id"] == c.agent_id

        local = await call("darkmatter_discover_local")
        assert local["discovery_enabled"] is True and legacy.agent_id in {p["agent_id"] for p in local["peers"]}
        found = await call("darkmatter_discover_domain", "found", domain=legacy.base_url)
        assert found["found"] is True and found["darkmatter"] is True and found["agent_id"] == legacy.agent_id
        assert found["protocol_version"] == "0.2"
        nothing = await call("darkmatter_discover_domain", "not_found", domain="http://127.0.0.1:9")
        assert nothing["found"] is False and nothing["error"]

        # an incoming message: inbox, read, forward, respond
        sent_by_b = await actions.send_message(b, "Which index makes this query fast?", a.agent_id, hops_remaining=6)
        await wait_for(lambda: a.state["inbox"])
        inbox = await call("darkmatter_list_inbox")
        entry = inbox["messages"][0]
        assert inbox["total"] == 1 and entry["message_id"] == sent_by_b["message_id"]
        assert entry["webhook"].endswith(f"/__darkmatter__/webhook/{sent_by_b['message_id']}")
        assert entry["from_agent_id"] == b.agent_id and entry["verified"] is True and entry["can_forward"] is True
        full = await call("darkmatter_get_message", message_id=entry["message_id"])
        assert full["webhook"] == entry["webhook"] and full["content"] == "Which index makes this query fast?"
        forwarded = await call("darkmatter_forward_message", message_id=entry["message_id"],
                               target_agent_id=c.agent_id, note="C knows indexes")
        assert forwarded["success"] is True and forwarded["forwarded_to"] == c.agent_id
        assert forwarded["hops_remaining_for_target"] == 5 and forwarded["message_still_in_queue"] is True
        assert forwarded["note"] == "C knows indexes"
        answered = await call("darkmatter_respond_message", message_id=entry["message_id"],
                              response="An index on (user_id, created_at).")
        assert answered["success"] is True and answered["webhook_called"] == entry["webhook"]
        assert answered["error"] is None and answered["response_time_ms"] > 0
        assert b.state["sent_messages"][entry["message_id"]]["status"] == "responded"

        # an outgoing message: send, its webhook as the sender reads it, expire
        sent = await call("darkmatter_send_message", content="Who maintains the parser?", target_agent_id=b.agent_id,
                          metadata={"topic": "parser"}, hops_remaining=4)
        assert sent["success"] is True and sent["routed_to"] == [b.agent_id] and sent["hops_remaining"] == 4
        assert sent["webhook"].endswith(f"/__darkmatter__/webhook/{sent['message_id']}")
        await wait_for(lambda: any(m["message_id"] == sent["message_id"] for m in b.state["inbox"]))
        await actions.respond_message(b, sent["message_id"], "Carol does.")
        listed = await call("darkmatter_list_messages")
        mine = next(m for m in listed["messages"] if m["message_id"] == sent["message_id"])
        assert mine["status"] == "responded" and mine["initial_hops"] == 4 and mine["forwarding_count"] == 0
        detail = await call("darkmatter_get_sent_message", message_id=sent["message_id"])
        assert detail["response"]["response"] == "Carol does." and detail["response"]["agent_id"] == b.agent_id
        assert detail["routed_to"] == [b.agent_id] and detail["forwarding_count"] == 0
        expired = await call("darkmatter_expire_message", message_id=sent["message_id"])
        assert expired["success"] is True and expired["status"] == "expired"

        identity = await call("darkmatter_get_identity")
        assert identity["num_connections"] == 2 and identity["num_pending_requests"] == 0
        assert identity["message_queue_size"] == 0 and identity["sent_messages_count"] == 1
        assert identity["messages_handled"] == 1 and identity["public_key_hex"] == a.public_key_hex
        conns = await call("darkmatter_list_connections")
        assert conns["total"] == 2 and conns["max_connections"] == 50
        assert {x["agent_id"] for x in conns["connections"]} == {b.agent_id, c.agent_id}
        assert all(x["crypto"] is True for x in conns["connections"])
        info = await call("darkmatter_network_info")
        assert {p["agent_id"] for p in info["peers"]} == {b.agent_id, c.agent_id}
        assert info["accepting_connections"] is True and info["public_key_hex"] == a.public_key_hex

        created = await call("darkmatter_set_impression", agent_id=c.agent_id, impression="Quick and precise.")
        assert created["action"] == "created" and created["impression"] == "Quick and precise."
        assert (await call("darkmatter_set_impression", agent_id=c.agent_id, impression="Precise."))["action"] \
            == "updated"
        mine = await call("darkmatter_get_impression", agent_id=c.agent_id)
        assert mine["has_impression"] is True and mine["impression"] == "Precise."
        await b.tools["darkmatter_set_impression"].handler(b, {"agent_id": c.agent_id, "impression": "Trusted."},
                                                           Session())
        asked = await call("darkmatter_ask_impression", ask_agent_id=b.agent_id, about_agent_id=c.agent_id)
        assert asked["success"] is True and asked["asked"] == b.agent_id and asked["about"] == c.agent_id
        assert asked["has_impression"] is True and asked["impression"] == "Trusted."
        deleted = await call("darkmatter_delete_impression", agent_id=c.agent_id)
        assert deleted["success"] is True and deleted["action"] == "deleted" and deleted["agent_id"] == c.agent_id

        template = await call("darkmatter_get_server_template")
        assert template["template_from"] == a.agent_id and "darkmatter_send_message" in template["core_primitives"]
        assert template["bootstrap_instructions"]["1"] == template["bootstrap_steps"][0]
        await call("darkmatter_status")

        left = await call("darkmatter_disconnect", agent_id=c.agent_id)
        assert left["success"] is True and left["disconnected_from"] == c.agent_id

        # a failure keeps the original's shape beside the one-line text
        again = await client.call_tool("darkmatter_disconnect", {"agent_id": c.agent_id})
        assert again.is_error and "\n" not in again.content[0].text
        assert again.structured_content == {"success": False, "error": again.content[0].text}

        untested = {(name, outcome) for name, contract in ORIGINAL.items() for outcome in contract.results
                    if name != "darkmatter_upgrade_webrtc"} - call.covered
        assert not untested, f"contract rows not exercised: {sorted(untested)}"
        assert call.entries_checked == {(name, key) for name, contract in ORIGINAL.items()
                                        for key in contract.entries}


async def test_upgrade_webrtc_keeps_the_original_result_keys(tmp_path):
    pytest.importorskip("aiortc")
    plugins = "http_transport,webrtc_transport"
    async with node_context(tmp_path / "a", plugins=plugins) as a, \
            node_context(tmp_path / "b", plugins=plugins, DARKMATTER_GENESIS="true",
                         DARKMATTER_DISPLAY_NAME="bee") as b, mcp_client(a) as client:
        await actions.request_connection(a, b.base_url)
        call = OriginalScript(client, "envelope")
        upgraded = await call("darkmatter_upgrade_webrtc", agent_id=b.agent_id)
        assert upgraded["success"] is True and upgraded["transport"] == "webrtc"
        assert upgraded["agent_id"] == b.agent_id and upgraded["display_name"] == "bee"
        again = await call("darkmatter_upgrade_webrtc", agent_id=b.agent_id)
        assert again["already_upgraded"] is True


async def test_original_spellings_the_node_tolerates_and_the_ones_it_refuses(tmp_path):
    async with node_context(tmp_path / "a") as a, \
            node_context(tmp_path / "b", DARKMATTER_GENESIS="true") as b, mcp_client(a) as client:
        await actions.request_connection(a, b.base_url)

        # this node's own earlier spelling stays an alias
        by_alias = await client.call_tool("darkmatter_ask_impression", {"agent_id": b.agent_id,
                                                                        "about_agent_id": "someone"})
        assert not by_alias.is_error and by_alias.structured_content["asked"] == b.agent_id
        both = await client.call_tool("darkmatter_ask_impression", {"agent_id": b.agent_id,
                                                                    "ask_agent_id": "other", "about_agent_id": "x"})
        assert both.is_error and "ask_agent_id and its alias agent_id differ" in both.content[0].text
        neither = await client.call_tool("darkmatter_ask_impression", {"about_agent_id": "x"})
        assert neither.is_error
        assert neither.content[0].text == ("Invalid arguments for darkmatter_ask_impression: 'ask_agent_id' is a "
                                           "required property (or give it as 'agent_id').")

        # null for an argument the original declared Optional[...] = None: a broadcast without metadata
        broadcast = await client.call_tool("darkmatter_send_message", {"content": "hi all", "target_agent_id": None,
                                                                       "metadata": None, "hops_remaining": 3})
        assert not broadcast.is_error and broadcast.structured_content["routed_to"] == [b.agent_id]

        # the FastMCP envelope, also as a JSON string (as some clients sent nested objects)
        as_text = await client.call_tool("darkmatter_get_impression", {"params": json.dumps({"agent_id": "x"})})
        assert not as_text.is_error and as_text.structured_content["has_impression"] is False
        bad = await client.call_tool("darkmatter_get_impression", {"params": "not json"})
        assert bad.is_error and "params must be an object of arguments" in bad.content[0].text
        # a required argument stays required, whatever the spelling
        missing = await client.call_tool("darkmatter_send_message", {"params": {"content": None}})
        assert missing.is_error and "content must be of type string" in missing.content[0].text


def test_an_alias_must_name_a_new_spelling_of_an_existing_property():
    async def handler(node, args, session):
        return {}

    props = {"agent_id": {"type": "string", "description": "who"}}
    with pytest.raises(ValueError, match="alias 'peer'"):
        Tool("darkmatter_x", "x", handler, props, ("agent_id",), aliases={"peer": "nobody"})
    with pytest.raises(ValueError, match="alias 'agent_id'"):
        Tool("darkmatter_x", "x", handler, props, ("agent_id",), aliases={"agent_id": "agent_id"})
    tool = Tool("darkmatter_x", "x", handler, props, ("agent_id",), aliases={"peer": "agent_id"})
    assert tool.input_schema["required"] == [] and set(tool.input_schema["properties"]) == {"agent_id", "peer"}
    assert tool.prepare({"peer": "p1"}) == {"agent_id": "p1"}
