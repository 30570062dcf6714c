"""The relay of a second stdio session (docs/protocol.md §12.4).

``StdioPipes`` (:mod:`darkmatter.stdio`) gives async line I/O on the process's stdin and
stdout.

``Relay`` is what a stdio process does when another process already runs this agent: it forwards MCP
JSON-RPC between its stdio and ``http://127.0.0.1:<port>/mcp`` as a loopback client. Handshake-era (2025)
sessions keep the ``Mcp-Session-Id`` and send ``MCP-Protocol-Version`` once negotiated, and a standalone GET
stream carries server notifications; 2026-era requests carry their own envelope, so each is posted on its own
with the routing headers that envelope implies.

When the node's process goes away (MCP clients stop their server soon after closing its stdin), the relay
hands its client's session over (:class:`Handover`): the runner takes the node over itself and replays the
client's handshake silently (:class:`ReplayPipes`), or relays to the process that took it over first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

from darkmatter import __version__
from darkmatter.stdio import StdioPipes

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
# JSON-RPC request methods whose name/uri the 2026-era HTTP transport mirrors into `Mcp-Name`.
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


# --- the relay ---------------------------------------------------------------------------------------


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event of a streamed response."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _modern_version(message: dict) -> str | None:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def _header_value(value: str) -> str:
    from mcp.shared.inbound import encode_header_value

    return encode_header_value(value)


@dataclass
class Handover:
    """What a relay passes on when the node it relayed to went away (its owner process ended)."""

    initialize: dict | None = None  # the client's completed handshake, replayed silently to the next node
    initialized: dict | None = None
    undelivered: list = field(default_factory=list)  # client messages no node has received yet

    def lines(self) -> list[str]:
        out = []
        if self.initialize is not None:
            out.append(json.dumps({**self.initialize, "id": HANDOVER_ID}))
            if self.initialized is not None:
                out.append(json.dumps(self.initialized))
        out += [json.dumps(message) for message in self.undelivered]
        return out


HANDOVER_ID = "darkmatter-handover-initialize"


class ReplayPipes:
    """Stdio for a node that took over from a relay: first the handover's messages, then the client's.

    The answer to the silently replayed ``initialize`` is not passed on (the client got one already)."""

    def __init__(self, pipes: StdioPipes, handover: Handover):
        self.pipes = pipes
        self.handover = handover

    async def __aiter__(self) -> AsyncIterator[str]:
        for line in self.handover.lines():
            yield line
        async for line in self.pipes:
            yield line

    async def write(self, text: str) -> None:
        if HANDOVER_ID in text:
            with contextlib.suppress(ValueError):
                message = json.loads(text)
                if isinstance(message, dict) and message.get("id") == HANDOVER_ID and "method" not in message:
                    return
        await self.pipes.write(text)

    async def flush(self) -> None:
        return None


class Relay:
    """Forward MCP between this process's stdio and the running node's ``/mcp`` (a loopback client).

    ``run()`` returns None when the client closes stdin, or a :class:`Handover` when the node stopped
    answering (its process ended): the caller then takes the node over, or relays to whoever did."""

    def __init__(self, pipes: StdioPipes, port: int, handover: Handover | None = None,
                 session_token: str | None = None):
        self.pipes = pipes
        self.url = f"http://127.0.0.1:{port}/mcp"
        headers = {"User-Agent": f"darkmatter-relay/{__version__}"}
        if session_token:  # a spawned agent's session, scoped by the node to its message (§12.6)
            headers["X-DarkMatter-Session"] = session_token
        self.http = httpx.AsyncClient(trust_env=False, headers=headers, timeout=httpx.Timeout(30.0, read=None))
        self.session_id: str | None = None
        self.version: str | None = None
        self.node_gone = asyncio.Event()
        self._resume = handover
        self._initialize: dict | None = None
        self._initialized: dict | None = None
        self._handshake_done = False
        self._undelivered: list = []
        self._standalone: asyncio.Task | None = None
        self._tasks: dict[asyncio.Task, Any] = {}  # request task -> its JSON-RPC id
        self._modern: dict[Any, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._probes: set[asyncio.Task] = set()

    async def run(self) -> Handover | None:
        try:
            if self._resume is not None:
                await self._take_over_session(self._resume)
            while not self.node_gone.is_set():
                read = asyncio.ensure_future(self.pipes.readline())
                gone = asyncio.ensure_future(self.node_gone.wait())
                await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                if not read.done():
                    read.cancel()
                    await asyncio.gather(read, return_exceptions=True)
                    break
                raw = read.result()
                if not raw:
                    return None
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    await self._from_client(line)
            return await self._handover()
        finally:
            await self._shutdown()

    async def _take_over_session(self, handover: Handover) -> None:
        """Continue a client session that began on a node which has gone away."""
        self._initialize, self._initialized = handover.initialize, handover.initialized
        if handover.initialize is not None:
            self._handshake_done = True  # the client's handshake is done, whichever node it reaches
            await self._reinitialize()
        for message in handover.undelivered:
            await self._dispatch(message)

    async def _handover(self) -> Handover:
        pending = list(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=5.0)
            for task in still:
                task.cancel()
                await self._node_went_away(self._tasks.get(task))
        done_handshake = self._handshake_done and self._initialize is not None
        return Handover(initialize=self._initialize if done_handshake else None,
                        initialized=self._initialized if done_handshake else None,
                        undelivered=list(self._undelivered))

    async def _node_went_away(self, request_id: Any) -> None:
        if request_id is not None:
            await self.emit({"jsonrpc": "2.0", "id": request_id, "error": {
                "code": -32603, "message": "The DarkMatter node serving this agent went away during this request; "
                                           "retry it."}})

    async def _shutdown(self) -> None:
        tasks = [*self._tasks, *self._probes, *([self._standalone] if self._standalone else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session_id and not self.node_gone.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(self.url, headers=self._headers(), timeout=2.0)
        await self.http.aclose()

    async def emit(self, message: Any) -> None:
        await self.pipes.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")

    async def _from_client(self, line: str) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            await self.emit({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}})
            return
        await self._dispatch(message)

    async def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            await self._post(message)  # a response to a server request (or a batch): pass it through
            return
        if "id" not in message:
            if message["method"] == "notifications/cancelled":
                task = self._modern.get(_key(_params(message).get("requestId")))
                if task is not None:  # 2026-era: cancelling is closing that request's response stream
                    task.cancel()
                    return
            if message["method"] == "notifications/initialized":
                self._initialized = message
            await self._post(message)
            if message["method"] == "notifications/initialized":
                self._start_standalone()
            return
        if message["method"] == "initialize":
            self._initialize = message
            self._handshake_done = False
            self.session_id = None
            await self._post(message)  # inline: nothing else may overtake the handshake
            return
        modern = _modern_version(message)
        await self._slots.acquire()

        async def run() -> None:
            try:
                await self._post(message, modern=modern)
            except (OSError, RuntimeError) as exc:  # stdout gone: the client left; stdin EOF follows
                log.debug("could not deliver a reply to the client: %s", exc)
            finally:
                self._slots.release()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks[task] = message["id"]
        task.add_done_callback(lambda t: self._tasks.pop(t, None))
        if modern:
            key = _key(message["id"])
            self._modern[key] = task
            task.add_done_callback(lambda _t: self._modern.pop(key, None))

    def _headers(self, modern: str | None = None, message: dict | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if modern:
            headers["MCP-Protocol-Version"] = modern
            method = message.get("method") if message else None
            if isinstance(method, str):
                headers["Mcp-Method"] = method
                key = NAME_PARAM.get(method)
                value = _params(message).get(key) if key else None
                if isinstance(value, str):
                    headers["Mcp-Name"] = _header_value(value)
            return headers
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        if self.version:
            headers["MCP-Protocol-Version"] = self.version
        return headers

    async def _post(self, message: Any, *, modern: str | None = None, retried: bool = False) -> None:
        is_dict = isinstance(message, dict)
        request_id = message.get("id") if is_dict and "method" in message else None
        had_session = self.session_id is not None and not modern
        try:
            async with self.http.stream("POST", self.url, json=message,
                                        headers=self._headers(modern, message)) as response:
                if response.status_code == 404 and had_session and not retried and self._initialize:
                    await response.aread()
                    if await self._reinitialize():
                        await self._post(message, modern=modern, retried=True)
                        return
                if is_dict and message.get("method") == "initialize" and response.status_code < 400:
                    self.session_id = response.headers.get("mcp-session-id") or None
                await self._relay_reply(response, request_id)
                if is_dict and message.get("method") == "initialize" and response.status_code < 400:
                    self._handshake_done = True
        except (httpx.ConnectError, httpx.ConnectTimeout):
            # Nothing listens on the port any more: the node went away before it got this message.
            if not (is_dict and message.get("method") == "notifications/initialized"):
                self._undelivered.append(message)
            self.node_gone.set()
        except httpx.HTTPError as exc:
            log.warning("relay to %s failed: %s", self.url, exc)
            await self._node_went_away(request_id)
            probe = asyncio.get_running_loop().create_task(self._check_node())
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)

    async def _check_node(self) -> None:
        try:
            await self.http.get(self.url, timeout=2.0)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.node_gone.set()
        except httpx.HTTPError:
            pass

    async def _relay_reply(self, response: httpx.Response, request_id: Any, *, quiet: bool = False) -> None:
        if response.status_code == 202:
            return
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream" and response.status_code < 400:
            async for data in sse_data(response):
                await self._to_client(data, quiet=quiet)
            return
        body = (await response.aread()).decode("utf-8", errors="replace")
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get("jsonrpc") == "2.0" and ("result" in reply or "error" in reply):
            if reply.get("id") is None and request_id is not None:
                reply["id"] = request_id
            self._learn(reply)
            if not quiet:
                await self.emit(reply)
            return
        if request_id is not None and not quiet:
            text = reply.get("error") if isinstance(reply, dict) else body[:200]
            await self.emit({"jsonrpc": "2.0", "id": request_id, "error": {
                "code": -32603, "message": f"The DarkMatter node answered HTTP {response.status_code}: {text}"}})

    async def _to_client(self, data: str, *, quiet: bool = False) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("dropped a server event that is not JSON")
            return
        if isinstance(message, dict):
            self._learn(message)
        if not quiet:
            await self.emit(message)

    def _learn(self, message: dict) -> None:
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str) and "serverInfo" in result:
            self.version = result["protocolVersion"]

    def _start_standalone(self) -> None:
        if self.session_id and (self._standalone is None or self._standalone.done()):
            self._standalone = asyncio.get_running_loop().create_task(self._standalone_stream())

    async def _standalone_stream(self) -> None:
        """The session's GET stream: server notifications (list_changed) and requests (ping)."""
        delay = 0.5
        while self.session_id and not self.node_gone.is_set():
            session = self.session_id
            try:
                headers = self._headers()
                headers["Accept"] = "text/event-stream"
                async with self.http.stream("GET", self.url, headers=headers) as response:
                    if response.status_code in (404, 405):
                        return
                    if response.status_code == 200:
                        delay = 0.5
                        async for data in sse_data(response):
                            await self._to_client(data)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self.node_gone.set()
                return
            except httpx.HTTPError as exc:
                log.debug("standalone stream dropped: %s", exc)
            if self.session_id != session:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _reinitialize(self) -> bool:
        """Open a new session with the client's own handshake, silently (the node lost ours, or this is a
        new node)."""
        log.info("opening a new MCP session at %s for the client's existing one", self.url)
        self.session_id = None
        init = {**(self._initialize or {}), "id": HANDOVER_ID}
        try:
            async with self.http.stream("POST", self.url, json=init, headers=self._headers()) as response:
                if response.status_code >= 400:
                    return False
                self.session_id = response.headers.get("mcp-session-id") or None
                await self._relay_reply(response, init["id"], quiet=True)
            if self._initialized is not None:
                response = await self.http.post(self.url, json=self._initialized, headers=self._headers())
                if response.status_code >= 400:
                    return False
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.node_gone.set()
            return False
        except httpx.HTTPError:
            return False
        if self._standalone is not None:
            self._standalone.cancel()
        self._start_standalone()
        return self.session_id is not None


def _params(message: dict) -> dict:
    params = message.get("params")
    return params if isinstance(params, dict) else {}


def _key(request_id: Any) -> Any:
    return json.dumps(request_id)
