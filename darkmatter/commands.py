"""CLI commands that steer the node running on this machine: connect, peers, pending, accept, reject, send,
inbox, respond, forward, sent and ui.

Each one calls the node's own ``darkmatter_*`` MCP tools (see :mod:`darkmatter.control`). People get tables and
short sentences on stdout; ``--json`` prints the tool's JSON for scripts. While a command waits on a terminal,
a spinner turns on stderr. IDs may be given in full or as any unique prefix (the tables show 12 characters);
a peer may also be named by its display name.

Exit codes: 0 done; 1 the node could not be reached, or the operation failed (a delivery failed, the peer
refused or was unreachable); 2 bad input (a usage error, or an argument the node refused: an unknown id, an
invalid URL, not a connection). Every error is one line on stderr starting with ``darkmatter: error:``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable

import click

from darkmatter.config import Config, ConfigError
from darkmatter.control import no_node_answers

EXIT_FAILURE = 1
EXIT_USAGE = 2
CONSOLE_PATH = "/ui"
SHORT = 12


class Failed(Exception):
    """End the command with this one-line message and exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int) -> None:
    click.echo(f"darkmatter: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def node_port(port: int | None) -> int:
    try:
        return Config.from_env(os.environ, port=port).port
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
        raise  # unreachable


# --- output helpers -----------------------------------------------------------------------------------


def short(value: Any) -> str:
    return str(value or "")[:SHORT] or "-"


def one_line(text: Any, width: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def ago(value: Any) -> str:
    """An ISO timestamp or epoch seconds as "3 min ago"."""
    if value in (None, ""):
        return "-"
    if isinstance(value, (int, float)):
        then = float(value)
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        then = parsed.timestamp()
    seconds = max(0, int(time.time() - then))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    click.echo(line.rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


class Spinner:
    """A spinner on stderr while the command waits, only when stderr is a terminal."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, label: str):
        self.label = label
        self.task: asyncio.Task | None = None
        self.active = sys.stderr.isatty()

    async def _spin(self) -> None:
        await asyncio.sleep(0.15)  # quick answers never flicker
        for frame in itertools.cycle(self.FRAMES):
            sys.stderr.write(f"\r{frame} {self.label}")
            sys.stderr.flush()
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> Spinner:
        if self.active:
            self.task = asyncio.get_running_loop().create_task(self._spin())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def run(port: int | None, work: Callable[[Any], Awaitable[int | None]], *, interrupted: int = 130) -> None:
    """Connect to the node on ``port``, run ``work(node)``, map failures to exit codes and one-line errors."""
    from darkmatter.control import LocalNode, Refused, Unreachable

    port = node_port(port)

    async def main() -> int | None:
        async with contextlib.AsyncExitStack() as stack:
            async with Spinner("connecting to the node"):
                node = await stack.enter_async_context(LocalNode(port))
            return await work(node)

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(interrupted)
    except Unreachable as exc:
        fail(str(exc), EXIT_FAILURE)
    except Refused as exc:
        fail(str(exc), EXIT_USAGE)
    except Failed as exc:
        fail(str(exc), exc.code)
    sys.exit(code or 0)


async def call(node: Any, label: str, tool: str, arguments: dict | None = None) -> dict:
    async with Spinner(label):
        return await node.call(tool, arguments)


# --- resolving what the person typed ------------------------------------------------------------------


def match(given: str, candidates: Iterable[tuple[str, Iterable[str], Iterable[str]]], what: str, hint: str) -> str:
    """The one id that ``given`` names. Each candidate is ``(id, keys, names)``: ``given`` may be the id or one of
    the keys (e.g. the requester's agent id), in full or as a unique prefix, or one of the names
    (case-insensitive, in full)."""
    given = given.strip()
    if not given:
        raise Failed(f"an empty {what} was given", EXIT_USAGE)
    pool = [(cid, [cid, *[k for k in keys if k]], [n.lower() for n in names if n]) for cid, keys, names in candidates]
    found: list[str] = []
    for test in (lambda keys, names: given in keys,
                 lambda keys, names: any(k.startswith(given) for k in keys),
                 lambda keys, names: given.lower() in names):
        found = list(dict.fromkeys(cid for cid, keys, names in pool if test(keys, names)))
        if found:
            break
    if len(found) == 1:
        return found[0]
    if not found:
        raise Failed(f"no {what} matches {given!r} ({hint})", EXIT_USAGE)
    raise Failed(f"{given!r} matches {len(found)} {what}s ({', '.join(short(f) for f in found[:5])}); give more "
                 f"characters", EXIT_USAGE)


async def connections(node: Any) -> list[dict]:
    return (await node.call("darkmatter_list_connections"))["connections"]


def names(conns: list[dict]) -> dict[str, str]:
    return {c["agent_id"]: c.get("display_name") or short(c["agent_id"]) for c in conns}


async def resolve_peer(node: Any, given: str) -> tuple[str, dict[str, str]]:
    conns = await connections(node)
    agent_id = match(given, ((c["agent_id"], [], [c.get("display_name") or ""]) for c in conns), "connection",
                     "see `darkmatter peers`")
    return agent_id, names(conns)


async def resolve_inbox(node: Any, given: str) -> dict:
    inbox = (await node.call("darkmatter_list_inbox", {"limit": 500}))["messages"]
    message_id = match(given, ((m["message_id"], [m["message_id"].removeprefix("msg-")], []) for m in inbox),
                       "inbox message", "see `darkmatter inbox`")
    return next(m for m in inbox if m["message_id"] == message_id)


# --- the commands -------------------------------------------------------------------------------------

PORT = click.option("--port", type=int, help="Port of the running node (DARKMATTER_PORT, default 8100).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.command(short_help="Ask the node at URL to connect.")
@click.argument("url")
@PORT
@JSON
def connect(url: str, port: int | None, as_json: bool) -> None:
    """Ask the node at URL to connect (it accepts at once, or decides later)."""

    async def work(node) -> int:
        result = await call(node, f"asking {url}", "darkmatter_request_connection", {"target_url": url})
        if as_json:
            emit_json(result)
        status = result.get("status")
        if status == "connected":
            if not as_json:
                click.echo(f"Connected to {result.get('display_name') or short(result.get('agent_id'))} "
                           f"({short(result.get('agent_id'))}) at {result.get('agent_url')}.")
            return 0
        if status == "pending":
            if not as_json:
                click.echo(f"Request sent to {result.get('target')}; it decides later (request "
                           f"{result.get('request_id')}). `darkmatter peers` shows it once accepted.")
            return 0
        raise Failed(f"could not connect to {result.get('target') or url}: {result.get('error') or status}")

    run(port, work)


@click.command(short_help="Connections and discovered peers.")
@PORT
@JSON
def peers(port: int | None, as_json: bool) -> None:
    """Connections (transport, health, last activity) and discovered peers."""

    async def work(node) -> int:
        async with Spinner("asking the node"):
            conns = await connections(node)
            info = await node.call("darkmatter_network_info")
        connected = {c["agent_id"] for c in conns}
        discovered = [d for d in info.get("discovered_peers") or [] if d.get("agent_id") not in connected]
        if as_json:
            emit_json({"connections": conns, "discovered": discovered})
            return 0
        if conns:
            table([[short(c["agent_id"]), one_line(c.get("display_name") or "-", 24), c.get("agent_url") or "-",
                    c.get("transport") or "http", c.get("health") or "-", ago(c.get("last_activity")),
                    f"{c.get('messages_sent', 0)}/{c.get('messages_received', 0)}"] for c in conns],
                  ["ID", "NAME", "URL", "TRANSPORT", "HEALTH", "LAST ACTIVITY", "SENT/RECEIVED"])
        else:
            click.echo("No connections. `darkmatter connect URL` asks a node to connect.")
        if discovered:
            click.echo("\nDiscovered, not connected:")
            table([[short(d.get("agent_id")), one_line(d.get("display_name") or "-", 24), d.get("url") or "-",
                    d.get("source") or "-"] for d in discovered], ["ID", "NAME", "URL", "SOURCE"])
        return 0

    run(port, work)


@click.command(short_help="Connection requests waiting for a decision.")
@PORT
@JSON
def pending(port: int | None, as_json: bool) -> None:
    """Connection requests waiting for your decision, and your own waiting ones."""

    async def work(node) -> int:
        result = await call(node, "asking the node", "darkmatter_list_pending_requests")
        if as_json:
            emit_json(result)
            return 0
        incoming = result.get("incoming") or []
        if incoming:
            table([[r["request_id"], one_line(r.get("from_agent_display_name") or "-", 24), short(r.get("from_agent_id")),
                    r.get("from_agent_url") or "-", ago(r.get("requested_at"))] for r in incoming],
                  ["REQUEST", "NAME", "AGENT", "URL", "ASKED"])
            click.echo("\n`darkmatter accept REQUEST` or `darkmatter reject REQUEST` decides.")
        else:
            click.echo("No connection requests waiting.")
        outgoing = result.get("outgoing") or []
        if outgoing:
            click.echo("\nWaiting for others to accept:")
            table([[o.get("target"), ago(o.get("created_at"))] for o in outgoing], ["TARGET", "SINCE"])
        return 0

    run(port, work)


def _decide(accept: bool):
    verb = "accept" if accept else "reject"

    @click.command(name=verb, short_help=f"{verb.capitalize()} a pending connection request.")
    @click.argument("request_id", metavar="ID")
    @PORT
    @JSON
    def command(request_id: str, port: int | None, as_json: bool) -> None:
        async def work(node) -> int:
            listed = (await node.call("darkmatter_list_pending_requests")).get("incoming") or []
            chosen = match(request_id, ((r["request_id"], [r.get("from_agent_id") or ""],
                                         [r.get("from_agent_display_name") or ""]) for r in listed),
                           "pending request", "see `darkmatter pending`")
            request = next(r for r in listed if r["request_id"] == chosen)
            name = request.get("from_agent_display_name") or short(request.get("from_agent_id"))
            result = await call(node, f"{verb}ing {name}", "darkmatter_respond_connection",
                                {"request_id": chosen, "accept": accept})
            if as_json:
                emit_json(result)
            elif accept:
                click.echo(f"Accepted {name} ({short(result.get('agent_id'))}): connected.")
            else:
                note = "" if result.get("notified") else " (it could not be told)"
                click.echo(f"Rejected {name}{note}.")
            if accept and result.get("acceptance_delivery") == "failed":
                raise Failed(f"connected, but {name} could not be told: {result.get('last_error')}")
            return 0

        run(port, work)

    command.__doc__ = f"{verb.capitalize()} a pending connection request (ID from `darkmatter pending`)."
    command.help = command.__doc__
    return command


accept = _decide(True)
reject = _decide(False)


def _read_text(text: str) -> str:
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise Failed("the text is empty", EXIT_USAGE)
    return text


@click.command(short_help="Send a message to one connection or to all.")
@click.argument("text")
@click.option("--to", "to", metavar="ID", help="One connection (id, unique id prefix or display name); "
                                             "default: every connection.")
@PORT
@JSON
def send(text: str, to: str | None, port: int | None, as_json: bool) -> None:
    """Send TEXT to one connection or to all of them ("-" reads the text from stdin)."""

    async def work(node) -> int:
        content = _read_text(text)
        if to is not None:
            target, known = await resolve_peer(node, to)
        else:
            target, known = None, names(await connections(node))
        arguments = {"content": content, **({"target_agent_id": target} if target else {})}
        result = await call(node, "sending", "darkmatter_send_message", arguments)
        if as_json:
            emit_json(result)
        else:
            deliveries = result.get("deliveries") or {}
            click.echo(f"Sent {result.get('message_id')} to "
                       + ", ".join(f"{known.get(a, short(a))}: {d.get('state')}"
                                   + (f" ({one_line(d.get('last_error'), 80)})" if d.get("last_error") else "")
                                   for a, d in deliveries.items()) + ".")
        if not result.get("success"):
            raise Failed(f"{result.get('message_id')} could not be delivered to anyone")
        return 0

    run(port, work)


def _sorted_inbox(messages: list[dict]) -> list[dict]:
    """Unread first (an entry without a ``read`` flag is unread), newest first within each group."""
    ordered = sorted(messages, key=lambda m: m.get("received_at") or "", reverse=True)
    return sorted(ordered, key=lambda m: bool(m.get("read")))


@click.command(short_help="Messages in your inbox, unread first.")
@click.option("--follow", "-f", is_flag=True, help="Keep running and print messages as they arrive (Ctrl-C stops).")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many.")
@PORT
@JSON
def inbox(follow: bool, limit: int, port: int | None, as_json: bool) -> None:
    """Messages in your inbox, unread first. With --follow, new ones as they arrive (--json: one per line)."""

    async def work(node) -> int:
        result = await call(node, "asking the node", "darkmatter_list_inbox", {"limit": limit})
        messages = _sorted_inbox(result.get("messages") or [])
        known = names(await connections(node))
        if not follow:
            if as_json:
                emit_json({"total": result.get("total", len(messages)), "messages": messages})
            elif messages:
                table([["new" if not m.get("read") else "", short(m["message_id"]),
                        known.get(m["from_agent_id"], short(m["from_agent_id"])), ago(m.get("received_at")),
                        m.get("hops_remaining"), one_line(m.get("content"), 60)] for m in messages],
                      ["", "ID", "FROM", "RECEIVED", "HOPS", "MESSAGE"])
            else:
                click.echo("Inbox empty.")
            return 0
        seen: set[str] = set()

        def show(m: dict) -> None:
            seen.add(m["message_id"])
            if as_json:
                click.echo(json.dumps(m, ensure_ascii=False))
            else:
                click.echo(f"{short(m['message_id'])}  {known.get(m['from_agent_id'], short(m['from_agent_id']))}"
                           f"  {ago(m.get('received_at'))}  {one_line(m.get('content'), 100)}")
            sys.stdout.flush()

        for m in reversed(messages):
            show(m)

        async def refresh() -> None:
            listed = (await node.call("darkmatter_list_inbox", {"limit": 500})).get("messages") or []
            fresh = [m for m in listed if m["message_id"] not in seen]
            if fresh and any(m["from_agent_id"] not in known for m in fresh):
                known.update(names(await connections(node)))
            for m in sorted(fresh, key=lambda m: m.get("received_at") or ""):
                show(m)

        if not as_json:
            click.echo("Waiting for messages (Ctrl-C stops)…", err=True)
        try:
            await node.watch(refresh)
        except asyncio.CancelledError:
            return 0
        return 0

    run(port, work, interrupted=0 if follow else 130)  # Ctrl-C is the usual way to stop --follow


@click.command(short_help="Answer an inbox message.")
@click.argument("message_id", metavar="ID")
@click.argument("text")
@PORT
@JSON
def respond(message_id: str, text: str, port: int | None, as_json: bool) -> None:
    """Answer inbox message ID with TEXT ("-" reads it from stdin); the answer goes to its sender."""

    async def work(node) -> int:
        content = _read_text(text)
        message = await resolve_inbox(node, message_id)
        result = await call(node, "responding", "darkmatter_respond_message",
                            {"message_id": message["message_id"], "response": content})
        if as_json:
            emit_json(result)
        else:
            click.echo(f"Response to {message['message_id']}: {result.get('delivery')}.")
        if not result.get("success"):
            raise Failed(f"the response to {message['message_id']} could not be delivered: {result.get('last_error')}")
        return 0

    run(port, work)


@click.command(short_help="Forward an inbox message to a connection.")
@click.argument("message_id", metavar="ID")
@click.option("--to", "to", metavar="ID", required=True, help="The connection to forward to (id, prefix or name).")
@click.option("--note", help="A note for the sender's trail.")
@PORT
@JSON
def forward(message_id: str, to: str, note: str | None, port: int | None, as_json: bool) -> None:
    """Forward inbox message ID to another connection (one hop less); it stays in your inbox."""

    async def work(node) -> int:
        message = await resolve_inbox(node, message_id)
        target, known = await resolve_peer(node, to)
        arguments = {"message_id": message["message_id"], "target_agent_id": target}
        if note:
            arguments["note"] = note
        result = await call(node, "forwarding", "darkmatter_forward_message", arguments)
        if as_json:
            emit_json(result)
        else:
            click.echo(f"Forwarded {message['message_id']} to {known.get(target, short(target))}: "
                       f"{result.get('delivery')} ({result.get('hops_remaining')} hops left).")
        if not result.get("success"):
            raise Failed(f"forwarding {message['message_id']} failed: {result.get('last_error')}")
        return 0

    run(port, work)


def route_lines(sent: dict, known: dict[str, str]) -> list[str]:
    """The route hop by hop: whom this node sent to, who forwarded to whom, who answered."""
    label = lambda agent: known.get(agent, short(agent))  # noqa: E731
    children: dict[str, list[tuple[str, str]]] = {"": []}
    placed = {""}

    def add(parent: str, child: str, how: str) -> None:
        if child in placed:
            return
        if parent not in placed:
            add("", parent, "?")
        children.setdefault(parent, []).append((child, how))
        children.setdefault(child, [])
        placed.add(child)

    for agent, delivery in (sent.get("deliveries") or {}).items():
        add("", agent, delivery.get("state") or "queued")
    for agent in sent.get("routed_to") or []:
        add("", agent, "delivered")
    for update in sent.get("updates") or []:
        if update.get("type") == "forwarded" and update.get("target_agent_id"):
            add(update.get("agent_id") or "?", update["target_agent_id"], "forwarded")
    marks: dict[str, list[str]] = {}
    for receipt in sent.get("receipts") or []:
        if isinstance(receipt, dict) and receipt.get("agent_id"):
            marks.setdefault(receipt["agent_id"], []).append(str(receipt.get("state")))
    for update in sent.get("updates") or []:
        if update.get("type") == "expired":
            marks.setdefault(update.get("agent_id"), []).append("expired")
    for response in sent.get("responses") or []:
        marks.setdefault(response.get("agent_id"), []).append("responded")
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for child, how in children.get(parent, []):
            extra = f" [{', '.join(marks[child])}]" if marks.get(child) else ""
            lines.append(f"{'  ' * depth}{label(parent) if parent else 'you'} → {label(child)}  {how}{extra}")
            walk(child, depth + 1)

    walk("", 1)
    return lines


@click.command(short_help="Messages you sent, with their routes.")
@click.argument("message_id", metavar="ID", required=False)
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="At most this many.")
@PORT
@JSON
def sent(message_id: str | None, limit: int, port: int | None, as_json: bool) -> None:
    """Messages you sent, newest first; with ID, one of them with its route hop by hop and its responses."""

    async def work(node) -> int:
        listed = await call(node, "asking the node", "darkmatter_list_messages",
                            {"limit": 100 if message_id else limit})
        known = names(await connections(node))
        messages = listed.get("messages") or []
        if message_id is None:
            if as_json:
                emit_json(listed)
            elif messages:
                table([[short(m["message_id"]), m.get("status"), ago(m.get("created_at")),
                        ", ".join(known.get(a, short(a)) for a in m.get("routed_to") or []) or "-",
                        m.get("response_count", 0), one_line(m.get("content"), 50)] for m in messages],
                      ["ID", "STATUS", "SENT", "TO", "RESPONSES", "MESSAGE"])
            else:
                click.echo("Nothing sent yet. `darkmatter send TEXT` sends to every connection.")
            return 0
        chosen = match(message_id, ((m["message_id"], [m["message_id"].removeprefix("msg-")], []) for m in messages),
                       "sent message", "see `darkmatter sent`")
        full = await node.call("darkmatter_get_sent_message", {"message_id": chosen})
        if as_json:
            emit_json(full)
            return 0
        click.echo(f"{full['message_id']}  {full.get('status')}  sent {ago(full.get('created_at'))}  "
                   f"{full.get('hops_remaining')}/{full.get('initial_hops')} hops left")
        for line in str(full.get("content") or "").splitlines() or [""]:
            click.echo(f"  {line}")
        click.echo("route:")
        for line in route_lines(full, known) or ["  (no recipient yet)"]:
            click.echo(line)
        responses = full.get("responses") or []
        click.echo("responses:" if responses else "responses: none yet")
        for r in responses:
            flag = "" if r.get("verified") else ", unverified"
            click.echo(f"  {known.get(r.get('agent_id'), short(r.get('agent_id')))} ({ago(r.get('timestamp'))}{flag}): "
                       f"{one_line(r.get('response'), 500)}")
        return 0

    run(port, work)


@click.command(short_help="Open the web console in a browser.")
@click.option("--no-browser", is_flag=True, help="Only print the URL.")
@PORT
def ui(no_browser: bool, port: int | None) -> None:
    """Open the node's web console in a browser (the URL is printed either way)."""
    import httpx

    port = node_port(port)
    url = f"http://127.0.0.1:{port}{CONSOLE_PATH}"
    try:
        with httpx.Client(trust_env=False, timeout=10.0, follow_redirects=False) as http:
            reply = http.get(url)
    except httpx.TransportError as exc:
        fail(no_node_answers(port, exc), EXIT_FAILURE)
    if reply.status_code == 404:
        fail(f"the node on 127.0.0.1:{port} serves no console: the console plugin is not loaded "
             f"(`darkmatter plugins` lists what is installed)", EXIT_FAILURE)
    if reply.status_code != 200 or "text/html" not in reply.headers.get("content-type", ""):
        fail(f"GET {url} answered HTTP {reply.status_code}", EXIT_FAILURE)
    click.echo(url)
    if no_browser:
        return
    import webbrowser

    try:
        opened = webbrowser.open(url, new=2)
    except webbrowser.Error:
        opened = False
    if not opened:
        click.echo("No browser found here: open the URL above yourself.", err=True)


COMMANDS = (connect, peers, pending, accept, reject, send, inbox, respond, forward, sent, ui)


def add_commands(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
