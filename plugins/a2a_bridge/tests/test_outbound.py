"""Outbound A2A: the agent calls A2A agents through ``darkmatter_a2a_send`` / ``darkmatter_a2a_get_task`` over
a real MCP session; the agents are a2a-sdk servers on loopback (hypercorn), or another node's bridge."""

from __future__ import annotations

import asyncio

import pytest
from a2a.utils.signing import create_agent_card_signer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from darkmatter.testing import node_context

from bridge_harness import bridge_node, call, echo_agent, echo_card, mcp_client, serve_app, wait_for

pytestmark = pytest.mark.anyio


def ed25519_signer(key: Ed25519PrivateKey | None = None, kid: str | None = None):
    key = key or Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return create_agent_card_signer(key, {"alg": "EdDSA", "kid": kid or public, "typ": "JOSE"}), public


async def tool_error(session, tool: str, **arguments) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return result.content[0].text


async def test_send_returns_the_answer_of_an_a2a_agent(tmp_path):
    sign, public = ed25519_signer()
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, echo_agent() as plain, \
            echo_agent(sign=sign) as signed:
        answer = await call(agent, "darkmatter_a2a_send", url=plain, text="hello there")
        assert answer["state"] == "completed" and answer["answer"] == "echo: hello there"
        assert answer["agent"]["name"] == "Echo" and answer["agent"]["signed"] is False
        verified = await call(agent, "darkmatter_a2a_send", url=signed + "/.well-known/agent-card.json", text="hi")
        assert verified["answer"] == "echo: hi"
        assert verified["agent"]["signed"] is True and verified["agent"]["signature_key"] == public


async def test_a_slow_agent_gives_a_task_id_that_get_task_follows(tmp_path):
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, echo_agent(delay=1.5) as slow:
        started = await call(agent, "darkmatter_a2a_send", url=slow, text="take your time", wait_seconds=0)
        assert started["state"] == "working" and started["answer"] is None and "darkmatter_a2a_get_task" in \
            started["note"]
        done = await call(agent, "darkmatter_a2a_get_task", task_id=started["task_id"], wait_seconds=20)
        assert done["state"] == "completed" and done["answer"] == "echo: take your time"
        unknown = await tool_error(agent, "darkmatter_a2a_get_task", task_id="no-such-task")
        assert "No A2A task" in unknown
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, echo_agent() as other:
        # the task ids sent are kept in the state, so a poll works after a restart (here: a new agent server
        # at another port does not know the task, which is reported as the agent's error)
        node.state["a2a"]["outbound"][started["task_id"]]["url"] = other
        gone = await tool_error(agent, "darkmatter_a2a_get_task", task_id=started["task_id"])
        assert "TaskNotFoundError" in gone


async def test_a_node_calls_another_nodes_agent_over_a2a(tmp_path):
    async with bridge_node(tmp_path / "a") as caller, bridge_node(tmp_path / "b") as callee, \
            mcp_client(caller) as asking, mcp_client(callee) as answering:
        async def answer():
            listed = await wait_for(lambda: callee.state["inbox"])
            await call(answering, "darkmatter_respond_message", message_id=listed[0]["message_id"],
                       response="from the other node")

        responder = asyncio.create_task(answer())
        result = await call(asking, "darkmatter_a2a_send", url=callee.base_url, text="are you there?",
                            wait_seconds=20)
        await responder
        assert result["state"] == "completed" and result["answer"] == "from the other node"
        assert result["agent"]["signed"] is True and result["agent"]["signature_key"] == callee.public_key_hex


async def test_non_a2a_urls_redirects_and_forbidden_addresses_give_clear_errors(tmp_path):
    async def redirect(request):
        return RedirectResponse("http://169.254.169.254/latest/meta-data", status_code=302)

    async def html(request):
        return HTMLResponse("<html>hello</html>")

    async def not_a_card(request):
        return JSONResponse({"name": 5, "skills": "none"})

    app = Starlette(routes=[Route("/redirect/.well-known/agent-card.json", redirect),
                            Route("/html/.well-known/agent-card.json", html),
                            Route("/json/.well-known/agent-card.json", not_a_card)])
    async with bridge_node(tmp_path / "a") as node, node_context(tmp_path / "mesh-only") as mesh_only, \
            mcp_client(node) as agent, serve_app(app) as web:
        error = await tool_error(agent, "darkmatter_a2a_send", url=mesh_only.base_url, text="hi")
        assert "is not an A2A agent" in error and "HTTP 404" in error
        error = await tool_error(agent, "darkmatter_a2a_send", url=web + "/html", text="hi")
        assert "is not an A2A agent" in error and "not a valid agent card" in error
        error = await tool_error(agent, "darkmatter_a2a_send", url=web + "/json", text="hi")
        assert "is not an A2A agent" in error
        error = await tool_error(agent, "darkmatter_a2a_send", url=web + "/redirect", text="hi")
        assert "answered with a redirect (302)" in error and "never followed" in error
        for never in ("http://169.254.169.254", "http://0.0.0.0:8100", "http://[::ffff:169.254.1.1]:80",
                      "http://224.0.0.1"):
            error = await tool_error(agent, "darkmatter_a2a_send", url=never, text="hi")
            assert "blocked" in error and "never-allowed" in error, (never, error)
        error = await tool_error(agent, "darkmatter_a2a_send", url="ftp://example.com", text="hi")
        assert error.startswith("Invalid URL")


async def test_an_interface_url_on_a_forbidden_address_is_refused(tmp_path):
    """The interfaces a card lists are remotely learned URLs: they are checked like every other request."""
    async def card(request):
        body = echo_card("http://169.254.169.254")
        from a2a.server.request_handlers.response_helpers import agent_card_to_dict
        return JSONResponse(agent_card_to_dict(body))

    app = Starlette(routes=[Route("/.well-known/agent-card.json", card)])
    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, serve_app(app) as web:
        error = await tool_error(agent, "darkmatter_a2a_send", url=web, text="hi")
        assert "blocked http://169.254.169.254/rpc" in error


async def test_a_card_whose_signature_does_not_verify_is_refused(tmp_path):
    key = Ed25519PrivateKey.generate()
    signer, _ = ed25519_signer(key, kid="ab" * 32)  # signed with one key, naming another

    def tampered(card):
        signed = create_agent_card_signer(key, {"alg": "EdDSA", "kid": ed25519_signer(key)[1], "typ": "JOSE"})(card)
        signed.description = "Changed after signing."
        return signed

    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, echo_agent(sign=signer) as wrong_key, \
            echo_agent(sign=tampered) as changed:
        for url in (wrong_key, changed):
            error = await tool_error(agent, "darkmatter_a2a_send", url=url, text="hi")
            assert "is signed, but no signature of the card verifies" in error


async def test_a_card_signed_with_a_key_from_its_jku_key_set_verifies(tmp_path):
    import json

    from jwt.algorithms import OKPAlgorithm

    key = Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "key-1"

    async def keys(request):
        return JSONResponse({"keys": [jwk]})

    async with serve_app(Starlette(routes=[Route("/jwks.json", keys)])) as jwks_server:
        signer = create_agent_card_signer(key, {"alg": "EdDSA", "kid": "key-1", "jku": jwks_server + "/jwks.json",
                                                "typ": "JOSE"})
        async with bridge_node(tmp_path) as node, mcp_client(node) as agent, echo_agent(sign=signer) as signed:
            answer = await call(agent, "darkmatter_a2a_send", url=signed, text="keyed")
            assert answer["answer"] == "echo: keyed" and answer["agent"]["signature_key"] == "key-1"


async def test_a_reply_over_one_mebibyte_is_refused(tmp_path):
    async def huge(request):
        return JSONResponse({"name": "x" * (2 * 1024 * 1024)})

    async with bridge_node(tmp_path) as node, mcp_client(node) as agent, \
            serve_app(Starlette(routes=[Route("/.well-known/agent-card.json", huge)])) as web:
        error = await tool_error(agent, "darkmatter_a2a_send", url=web, text="hi")
        assert "larger than 1048576 bytes" in error
