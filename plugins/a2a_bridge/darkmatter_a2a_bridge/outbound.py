"""Outbound A2A: the agent calls any A2A agent with ``darkmatter_a2a_send`` and follows a slow one with
``darkmatter_a2a_get_task``.

Every request (the card, the key sets of its signatures, the calls to its interfaces) goes through
:class:`NodeTransport`, that is through the node's own outbound path with the mesh's rules for outbound
requests (docs/protocol.md §7): the host is resolved once and every address checked against §7.3 (a "never"
address is always refused; a loopback or private one only when this node is itself local), the connection
goes to the checked address with the original Host header and SNI, redirects are refused, and answers are
size-capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from a2a.client import A2ACardResolver, A2AClientError, AgentCardResolutionError, ClientCallContext, ClientConfig
from a2a.client import create_client
from a2a.helpers import get_data_parts
from a2a.types import (AgentCard, GetTaskRequest, Message, Part, Role, SendMessageConfiguration,
                       SendMessageRequest, Task, TaskState)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import A2AError

from darkmatter.api import ProtocolError, ToolError, __version__, call, normalize, now_iso

from darkmatter_a2a_bridge import card as cards
from darkmatter_a2a_bridge.store import state_name

MAX_ANSWER = 64 * 1024  # characters of an answer returned to the agent
MAX_BYTES = 1024 * 1024  # bytes read from any one reply
REQUEST_TIMEOUT = 15.0
OUTBOUND_KEPT = 100
FINAL = {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_FAILED,
         TaskState.TASK_STATE_REJECTED, TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED}


class OutboundRefused(Exception):
    """A request this node will not make or finish; the text says why, for the agent."""


# Request headers the SDK's client sets that the call carries (Host, Accept and Content-Type are the node's).
FORWARDED_HEADERS = ("a2a-version", "a2a-extensions", "authorization", "x-a2a-extensions")


class NodeTransport(httpx.AsyncBaseTransport):
    """httpx transport that sends every request through the node's own outbound path (``darkmatter.api.call``,
    with ``strict``): the §7.3 address check, the checked address with the original Host header and SNI, no
    redirects, a size cap. A2A speaks JSON both ways, which is what that path carries."""

    def __init__(self, node: Any, cap: int = MAX_BYTES):
        self.node = node
        self.cap = cap

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        shown = str(url.copy_with(query=None, fragment=None))[:200]
        if url.scheme not in ("http", "https"):
            raise OutboundRefused(f"refused {shown}: only http and https URLs are called")
        content = await request.aread()
        try:
            body = json.loads(content) if content else None
        except ValueError:
            raise OutboundRefused(f"refused {shown}: only JSON requests are sent") from None
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        timeout = (request.extensions.get("timeout") or {}).get("read") or REQUEST_TIMEOUT
        reply = await call(self.node, request.method, str(url), body=body, headers=headers, timeout=timeout,
                           max_bytes=self.cap, strict=True)
        if reply.status is None:
            error = reply.error or "no answer"
            if reply.error_kind == "blocked":
                raise OutboundRefused(f"blocked {shown}: {error.removeprefix('blocked: ')} (docs/protocol.md §7.3)")
            if reply.error_kind == "timeout":
                raise httpx.ReadTimeout(error, request=request)
            if reply.error_kind == "invalid":
                raise OutboundRefused(f"refused {shown}: {error}")
            raise httpx.ConnectError(error, request=request)
        if 300 <= reply.status < 400:
            raise OutboundRefused(f"refused {shown}: it answered with a redirect ({reply.status}), and redirects "
                                  "are never followed (docs/protocol.md §7.2)")
        if reply.body is None:
            return httpx.Response(reply.status, content=b"", request=request)
        return httpx.Response(reply.status, json=reply.body, request=request)


def http_client(node: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=NodeTransport(node), follow_redirects=False, trust_env=False,
                             timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=5.0),
                             headers={"User-Agent": f"darkmatter-a2a-bridge/{__version__}"})


# --- the card ------------------------------------------------------------------------------------


def _check_url(url: str) -> str:
    url = (url or "").strip()
    try:
        normalize(url)
    except ProtocolError as exc:
        raise ToolError(f"Invalid URL {url[:200]!r}: {exc.error}") from None
    return url


async def resolve(http: httpx.AsyncClient, url: str) -> tuple[AgentCard, dict]:
    """Fetch and check the agent card at ``url`` (an agent's base URL or its card's URL). Returns the card and
    what the agent should know about it. Raises ToolError with the reason."""
    parts = urlsplit(url)
    if parts.path.endswith(".json"):
        base, paths = f"{parts.scheme}://{parts.netloc}", [parts.path]
    else:
        base, paths = url.rstrip("/"), [cards.CARD_PATH, cards.LEGACY_CARD_PATH]
    resolver = A2ACardResolver(http, base)
    card = None
    for n, path in enumerate(paths):
        try:
            card = await resolver.get_agent_card(relative_card_path=path)
            break
        except AgentCardResolutionError as exc:
            if exc.status_code == 404 and n + 1 < len(paths):
                continue
            if exc.status_code is not None:
                also = f" (nor at {path})" if n else ""
                raise ToolError(f"{url} is not an A2A agent: no agent card at {base}{paths[0]}{also} "
                                f"(HTTP {exc.status_code})") from None
            if "validate" in exc.message or "parse JSON" in exc.message:
                raise ToolError(f"{url} is not an A2A agent: {base}{path} is not a valid agent card") from None
            raise ToolError(f"Could not fetch the agent card of {url}: {exc.message[:300]}") from None
    assert card is not None
    if not card.supported_interfaces:
        raise ToolError(f"The agent card of {url} lists no interface to call")
    info: dict[str, Any] = {"name": card.name[:100], "card_url": base + path, "signed": bool(card.signatures)}
    if card.signatures:
        jwks = {}
        for header in cards.signature_keys(card):
            jku = header.get("jku")
            if isinstance(jku, str) and jku and jku not in jwks and len(jwks) < 4:
                jwks[jku] = await _key_set(http, jku)
        try:
            info["signature_key"] = cards.verify_card(card, {k: v for k, v in jwks.items() if v is not None})
        except ValueError as exc:
            raise ToolError(f"The agent card of {url} is signed, but {exc}; not calling it") from None
    return card, info


async def _key_set(http: httpx.AsyncClient, jku: str) -> dict | None:
    try:
        _check_url(jku)
        response = await http.get(jku, headers={"Accept": "application/json"})
        data = response.json() if response.status_code == 200 else None
    except (ToolError, OutboundRefused, httpx.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- answers -------------------------------------------------------------------------------------


def _parts_text(parts) -> list[str]:
    out = []
    for part in parts:
        if part.HasField("text"):
            out.append(part.text)
        elif part.HasField("data"):
            out.append(json.dumps(get_data_parts([part])[0], ensure_ascii=False))
        elif part.HasField("url"):
            out.append(part.url)
    return out


def summary(task: Task, waited: float) -> dict:
    """What the agent gets back about a remote task."""
    answer = "\n\n".join(t for a in task.artifacts for t in ["\n".join(_parts_text(a.parts))] if t)
    status_text = "\n".join(_parts_text(task.status.message.parts)) if task.status.HasField("message") else ""
    if not answer and task.status.state == TaskState.TASK_STATE_COMPLETED:
        answer = status_text or next(("\n".join(_parts_text(m.parts)) for m in reversed(task.history)
                                      if m.role == Role.ROLE_AGENT), "")
    out: dict[str, Any] = {"task_id": task.id, "context_id": task.context_id or None,
                           "state": state_name(task.status.state), "answer": answer[:MAX_ANSWER] or None}
    if status_text and status_text != answer:
        out["status_message"] = status_text[:4000]
    if task.status.state not in FINAL:
        out["note"] = (f"Not finished after {waited:g} s. Call darkmatter_a2a_get_task with this task_id later "
                       "(wait_seconds lets it wait).")
    elif task.status.state in (TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED):
        out["note"] = "The agent asks for more input; send it a new message with darkmatter_a2a_send."
    return out


def _remember(node: Any, task: Task, url: str) -> None:
    outbound = node.state.setdefault("a2a", {}).setdefault("outbound", {})
    outbound[task.id] = {"url": url, "created_at": now_iso()}
    while len(outbound) > OUTBOUND_KEPT:
        del outbound[min(outbound, key=lambda k: outbound[k]["created_at"])]
    node.save_soon()


async def _follow(client: Any, task: Task, wait: float) -> Task:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.25
    while task.status.state not in FINAL and loop.time() < deadline:
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 1.5, 2.0)
        task = await client.get_task(GetTaskRequest(id=task.id),
                                     context=ClientCallContext(timeout=REQUEST_TIMEOUT))
    return task


def _explain(exc: BaseException, url: str) -> ToolError:
    if isinstance(exc, OutboundRefused):
        return ToolError(f"A2A call to {url} {exc}" if str(exc).startswith(("refused", "blocked"))
                         else f"A2A call to {url} failed: {exc}")
    if isinstance(exc, A2AClientError):
        return ToolError(f"A2A call to {url} failed: {exc.message[:300]}")
    if isinstance(exc, A2AError):
        return ToolError(f"The A2A agent at {url} answered with an error: {type(exc).__name__}: "
                         f"{exc.message[:300]}")
    return ToolError(f"A2A call to {url} failed: {type(exc).__name__}: {str(exc)[:300]}")


async def _client(http: httpx.AsyncClient, card: AgentCard, url: str):
    config = ClientConfig(httpx_client=http, streaming=False, polling=True,
                          supported_protocol_bindings=[TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON],
                          accepted_output_modes=["text/plain", "application/json"])
    try:
        return await create_client(card, config)
    except ValueError:
        raise ToolError(f"The A2A agent at {url} offers neither a JSON-RPC nor an HTTP+JSON interface") from None


async def send(node: Any, args: dict, session: Any) -> dict:
    url = _check_url(args["url"])
    text = args["text"]
    wait = float(args.get("wait_seconds", 30))
    async with http_client(node) as http:
        try:
            card, info = await resolve(http, url)
            client = await _client(http, card, url)
            message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)])
            request = SendMessageRequest(message=message,
                                         configuration=SendMessageConfiguration(return_immediately=True))
            reply = None
            replies = client.send_message(request, context=ClientCallContext(timeout=REQUEST_TIMEOUT))
            async with contextlib.aclosing(replies):
                async for reply in replies:
                    break
            if reply is None:
                raise ToolError(f"The A2A agent at {url} sent no answer")
            if reply.HasField("message"):
                return {"state": "completed", "answer": "\n".join(_parts_text(reply.message.parts))[:MAX_ANSWER],
                        "task_id": None, "agent": info}
            task = reply.task
            _remember(node, task, url)
            task = await _follow(client, task, wait)
        except (OutboundRefused, A2AError, httpx.HTTPError) as exc:
            raise _explain(exc, url) from None
    return {**summary(task, wait), "agent": info}


async def get_task(node: Any, args: dict, session: Any) -> dict:
    task_id = args["task_id"]
    record = (node.state.get("a2a") or {}).get("outbound", {}).get(task_id)
    if record is None:
        raise ToolError(f"No A2A task {task_id[:100]!r} sent by this node (darkmatter_a2a_send returns the ids; "
                        f"the last {OUTBOUND_KEPT} are kept).")
    url = record["url"]
    wait = float(args.get("wait_seconds", 0))
    async with http_client(node) as http:
        try:
            card, info = await resolve(http, url)
            client = await _client(http, card, url)
            task = await client.get_task(GetTaskRequest(id=task_id), context=ClientCallContext(timeout=REQUEST_TIMEOUT))
            task = await _follow(client, task, wait)
        except (OutboundRefused, A2AError, httpx.HTTPError) as exc:
            raise _explain(exc, url) from None
    return {**summary(task, wait), "agent": info}
