"""The console's HTTP side against real nodes on loopback: who may call, CSRF, the snapshot, server-sent events
and every action (the browser tests drive the page itself)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from darkmatter.api import send_message
from darkmatter.testing import client, connect, mesh, node_context

pytestmark = pytest.mark.anyio

PLUGINS = "http_transport,console"


async def session(node, http: httpx.AsyncClient) -> str:
    """Open the page like a browser: the session cookie lands in ``http``; returns the page's CSRF token."""
    page = await http.get("/ui")
    assert page.status_code == 200, page.text
    return re.search(r'<meta name="dm-csrf" content="([^"]+)">', page.text).group(1)


def origin(node) -> dict:
    return {"Origin": f"http://127.0.0.1:{node.port}"}


async def act(node, http, csrf: str, name: str, body: dict, **headers) -> httpx.Response:
    return await http.post(f"/ui/api/action/{name}", json=body,
                           headers={**origin(node), "X-DM-CSRF": csrf, **headers})


def test_entry_point_is_wired():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="darkmatter") if e.name == "console"]
    assert entry.value == "darkmatter_console" and entry.dist.name == "darkmatter-console"


async def test_the_console_works_with_the_kernel_alone(tmp_path):
    """No other plugin needed (the mesh routes come from http_transport, the console only from itself)."""
    async with node_context(tmp_path, plugins="console") as node, client(node) as http:
        assert (await http.get("/ui")).status_code == 200
        snap = (await http.get("/ui/api/state")).json()
        assert snap["node"]["agent_id"] == node.agent_id and [p["name"] for p in snap["plugins"]] == ["console"]


async def test_page_and_files_are_served_with_a_strict_content_security_policy(tmp_path):
    async with node_context(tmp_path, plugins=PLUGINS) as node, client(node) as http:
        page = await http.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and page.headers["x-frame-options"] == "DENY"
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/ui" in cookie
        # No inline script anywhere: every script is a file of this package, loaded from /ui/static.
        assert re.findall(r"<script[^>]*>", page.text) == ['<script type="module" src="/ui/static/console.js">']
        loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)  # nothing from another origin (no CDN)
        assert loaded and all(url.startswith("/ui/static/") for url in loaded), loaded
        for name, kind in (("console.js", "text/javascript"), ("graph.js", "text/javascript"),
                           ("dom.js", "text/javascript"), ("console.css", "text/css"), ("favicon.svg", "image/svg+xml")):
            reply = await http.get(f"/ui/static/{name}")
            assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind), name
            assert reply.headers["content-security-policy"] == csp
        assert (await http.get("/ui/static/nope.js")).status_code == 404
        assert (await http.get("/ui/static/..%2f__init__.py")).status_code == 404
        assert (await http.get("/ui/")).status_code == 404  # exact paths, as every route of the node


async def test_a_foreign_host_is_misdirected_and_a_non_loopback_caller_needs_the_token(tmp_path):
    async with node_context(tmp_path, plugins=PLUGINS) as node, client(node) as http:
        # DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own Host.
        for path in ("/ui", "/ui/api/state", "/ui/api/events"):
            assert (await http.get(path, headers={"Host": f"evil.example:{node.port}"})).status_code == 421
        # A caller through a proxy is not a loopback caller (docs/protocol.md §12.3).
        proxied = {"X-Forwarded-For": "203.0.113.9"}
        refused = await http.get("/ui/api/state", headers=proxied)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/ui", headers=proxied)).status_code == 401
        assert (await http.get("/ui?token=" + "0" * 64, headers=proxied)).status_code == 401
        bearer = await http.get("/ui/api/state", headers={**proxied, "Authorization": f"Bearer {node.token}"})
        assert bearer.status_code == 200 and bearer.json()["node"]["agent_id"] == node.agent_id
        # A browser elsewhere opens /ui?token=... once; its session cookie carries the authentication after.
        opened = await http.get(f"/ui?token={node.token}", headers=proxied)
        assert opened.status_code == 303 and opened.headers["location"] == "/ui"
        assert node.token not in opened.headers["location"]
        page = await http.get("/ui", headers=proxied)
        assert page.status_code == 200
        assert (await http.get("/ui/api/state", headers=proxied)).status_code == 200


async def test_actions_need_the_page_origin_and_the_session_csrf_token(tmp_path):
    async with mesh(tmp_path, 2, connect_as="none", plugins=PLUGINS, DARKMATTER_GENESIS="false") as (a, b):
        await b_requests(b, a)
        request_id = next(iter(a.state["pending_requests"]))
        async with client(a) as http:
            csrf = await session(a, http)
            body = {"request_id": request_id}
            foreign = await act(a, http, csrf, "accept", body, Origin=f"http://127.0.0.1:{b.port}")
            assert foreign.status_code == 403
            assert (await http.post("/ui/api/action/accept", json=body,
                                    headers={"X-DM-CSRF": csrf})).status_code == 403  # no Origin at all
            assert (await act(a, http, "wrong", "accept", body)).status_code == 403
            assert (await http.post("/ui/api/action/accept", json=body, headers=origin(a))).status_code == 403
            cross_site = await act(a, http, csrf, "accept", body, **{"Sec-Fetch-Site": "same-site"})
            assert cross_site.status_code == 403
            form = await http.post("/ui/api/action/accept", content=f"request_id={request_id}",
                                   headers={**origin(a), "X-DM-CSRF": csrf,
                                            "Content-Type": "application/x-www-form-urlencoded"})
            assert form.status_code == 415
            assert request_id in a.state["pending_requests"] and not a.connections  # nothing happened
            async with client(a) as other:  # another browser's session: its cookie, not this token
                await session(a, other)
                assert (await act(a, other, csrf, "accept", body)).status_code == 403
            accepted = await act(a, http, csrf, "accept", body)
            assert accepted.status_code == 200 and accepted.json()["status"] == "connected"
            assert b.agent_id in a.connections


async def b_requests(b, a) -> None:
    from darkmatter.api import request_connection

    result = await request_connection(b, a.base_url)
    assert result["status"] == "pending", result


async def test_snapshot_shows_the_mesh_and_never_a_secret(tmp_path):
    async with mesh(tmp_path, 3, connect_as="none", plugins=PLUGINS) as (a, b, c):
        await connect(b, a)
        await send_message(b, "hello from b", a.agent_id)
        a.state["impressions"][b.agent_id] = "reliable"
        a.record_discovered({"agent_id": c.agent_id, "url": c.base_url, "display_name": "c", "source": "local"})
        await a.discovery_settled()  # C proves its key at that URL first (§6.1)
        async with client(a) as http:
            reply = await http.get("/ui/api/state")
        snap = reply.json()
        assert reply.headers["cache-control"] == "no-store"
        assert snap["node"]["agent_id"] == a.agent_id and snap["node"]["is_genesis"] is True
        (conn,) = snap["connections"]
        assert conn["agent_id"] == b.agent_id and conn["health"] == "ok" and conn["transport"] == "http"
        assert conn["impression"] == "reliable" and conn["last_contact"] is not None
        assert [d["agent_id"] for d in snap["discovered"]] == [c.agent_id]
        (message,) = snap["inbox"]
        assert message["content"] == "hello from b" and message["read"] is False
        assert {p["name"] for p in snap["plugins"]} == {"http_transport", "console"}
        assert any(line.startswith("LIVE STATUS") for line in snap["status"])
        assert {"name": "DARKMATTER_PORT", "value": str(a.port)} in snap["settings"]
        text = reply.text
        assert a.state["private_key_hex"] not in text and a.token not in text


async def test_unread_messages_come_first(tmp_path):
    async with mesh(tmp_path, 2, plugins=PLUGINS) as (a, b):
        for text in ("one", "two", "three"):
            await send_message(a, text, b.agent_id)
        # A kernel with read state marks an entry read; entries without the flag are unread.
        next(m for m in b.state["inbox"] if m["content"] == "three")["read"] = True
        async with client(b) as http:
            inbox = (await http.get("/ui/api/state")).json()["inbox"]
        assert [m["content"] for m in inbox] == ["two", "one", "three"]
        assert [m["read"] for m in inbox] == [False, False, True]


async def events(http: httpx.AsyncClient, queue: asyncio.Queue) -> None:
    async with http.stream("GET", "/ui/api/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                await queue.put(json.loads(line[6:]))


async def test_events_push_each_change_without_asking(tmp_path, monkeypatch):
    from darkmatter_console import console

    monkeypatch.setattr(console, "REFRESH", 120.0)  # so only the node's change notification can bring it
    async with mesh(tmp_path, 2, plugins=PLUGINS) as (a, b), client(b, timeout=30) as http:
        before = list(b.listeners)
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(events(http, queue))
        try:
            first = await asyncio.wait_for(queue.get(), 10)
            assert first["inbox"] == [] and len(b.listeners) == len(before) + 1
            await send_message(a, "pushed", b.agent_id)
            snap = await asyncio.wait_for(queue.get(), 30)
            assert [m["content"] for m in snap["inbox"]] == ["pushed"]
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for _ in range(100):  # the stream closed: its listener goes
            if b.listeners == before:
                break
            await asyncio.sleep(0.05)
        assert b.listeners == before


async def test_event_streams_end_when_the_node_stops(tmp_path):
    async with node_context(tmp_path / "a", plugins=PLUGINS) as node:
        async with client(node, timeout=30) as http:
            queue: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(events(http, queue))
            await asyncio.wait_for(queue.get(), 10)
            listeners = len(node.listeners)
            assert listeners >= 1
            loop = asyncio.get_running_loop()
            started = loop.time()
            await node.stop()
            await asyncio.wait_for(asyncio.gather(reader, return_exceptions=True), 10)
            assert loop.time() - started < 10  # generous: "not held up by the open stream"


async def test_every_action_calls_the_kernel_and_bad_input_is_one_clear_error(tmp_path):
    async with mesh(tmp_path, 3, connect_as="none", plugins=PLUGINS) as (a, b, c):
        async with client(a) as http:
            csrf = await session(a, http)
            connected = await act(a, http, csrf, "connect", {"url": b.base_url})
            assert connected.json()["status"] == "connected" and b.agent_id in a.connections
            assert (await act(a, http, csrf, "connect", {"url": c.base_url})).json()["status"] == "connected"
            sent = await act(a, http, csrf, "send", {"content": "to b", "to": b.agent_id})
            assert sent.status_code == 200 and sent.json()["success"] is True
            assert [m["content"] for m in b.state["inbox"]] == ["to b"]

            await send_message(b, "question for a", a.agent_id)
            message_id = a.state["inbox"][0]["message_id"]
            opened = await act(a, http, csrf, "open", {"message_id": message_id})
            assert opened.json()["content"] == "question for a"
            forwarded = await act(a, http, csrf, "forward", {"message_id": message_id, "to": c.agent_id, "note": "c knows"})
            assert forwarded.json()["delivery"] == "delivered"
            assert [m["message_id"] for m in c.state["inbox"]] == [message_id]
            responded = await act(a, http, csrf, "respond", {"message_id": message_id, "response": "answer"})
            assert responded.json()["delivery"] == "delivered"
            assert [r["response"] for r in b.state["sent_messages"][message_id]["responses"]] == ["answer"]

            saved = await act(a, http, csrf, "impression", {"agent_id": c.agent_id, "impression": "helpful"})
            assert saved.status_code == 200 and a.state["impressions"][c.agent_id] == "helpful"
            await act(a, http, csrf, "impression", {"agent_id": c.agent_id, "impression": ""})
            assert c.agent_id not in a.state["impressions"]
            gone = await act(a, http, csrf, "disconnect", {"agent_id": c.agent_id})
            assert gone.status_code == 200 and c.agent_id not in a.connections

            for name, body, says in (
                    ("send", {"content": "   "}, "content must not be blank"),
                    ("send", {"content": 5}, "content must be a string"),
                    ("send", {"content": "x", "to": "nobody"}, "Not connected to 'nobody'"),
                    ("respond", {"message_id": "msg-nope", "response": "x"}, "No message 'msg-nope'"),
                    ("forward", {"message_id": message_id}, "to is required"),
                    ("accept", {"request_id": "req-nope"}, "No pending connection request"),
                    ("connect", {"url": "not a url"}, "Invalid URL")):
                reply = await act(a, http, csrf, name, body)
                assert reply.status_code == 400, (name, reply.text)
                assert says in reply.json()["error"] and "\n" not in reply.json()["error"], (name, reply.text)
            assert (await act(a, http, csrf, "explode", {})).status_code == 404
            broken = await http.post("/ui/api/action/send", content=b"{not json",
                                     headers={**origin(a), "X-DM-CSRF": csrf, "Content-Type": "application/json"})
            assert broken.status_code == 400
