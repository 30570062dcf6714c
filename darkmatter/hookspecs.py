"""The DarkMatter hook specifications. These docstrings are the plugin contract.

Four kinds of hook, never mixed:

* **Registration** hooks are synchronous and receive a ``register`` callable; they hand the kernel
  objects (tools, routes, transports, discovery sources, storages) whose methods carry the async work.
* **Lifecycle**: ``dm_lifespan`` returns an async context manager (or None); the kernel enters them all
  in one ``AsyncExitStack`` for the node's lifetime.
* **Events** (``dm_on_*``) are called after the kernel has done its own work and persisted it; an
  implementation may return an awaitable, which the kernel awaits. A failing event implementation is
  logged and isolated: it never fails the request or crashes the node.
* **Decisions** are ``firstresult`` and synchronous. The kernel's defaults are ``trylast``. Never write
  an ``async def`` decision hook: a coroutine is never None, so it would always "win".

Every hook receives the ``node`` (a :class:`darkmatter.node.Node`); plugins reach the node's state and
services through it and never through globals.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("darkmatter")


# --- registration --------------------------------------------------------------------------


@hookspec
def dm_register_transports(register, node):
    """Register mesh transports: ``register(transport)``.

    Every mesh interaction crosses a transport (see :class:`darkmatter.api.Transport`): a unique ``name``,
    an integer ``priority`` (higher first); ``handles(url)``, ``async check(url, strict)`` and ``async
    request(method, url, ...) -> Reply`` for requests to a URL (the kernel's ``call`` picks the first
    transport that handles it); ``can_send(connection, size)`` and ``async send(connection, path, payload)
    -> Reply`` for envelopes to a connection (the kernel tries them in priority order and falls back on
    :class:`darkmatter.api.TransportUnavailable`). Inbound, a transport hands what it received to
    ``darkmatter.api.handle(node, op, caller, body, arg)`` and carries back the answer or the
    ``ProtocolError``. A transport only carries: the kernel signs, classifies replies and retries.
    Two transports with the same name fail start-up.
    """


@hookspec
def dm_register_discovery(register, node):
    """Register discovery sources: ``register(source)``.

    A source (see :class:`darkmatter.discovery.DiscoverySource`) has a unique ``name``,
    ``async run(found)`` which runs until cancelled and calls ``found(entry)`` for each peer it sees
    (the entry fields of docs/protocol.md §8.1, with ``source`` set), and ``async scan()`` which probes
    once, now (used by tools such as ``darkmatter_discover_local``). The kernel owns the discovered-peer
    table (keyed by agent_id, at most 256 entries, a fresh ``local`` entry beats ``lan``, entries unseen
    for 90 s pruned), starts ``run`` for every source when discovery is enabled, and cancels it at
    shutdown. Discovery never connects by itself.
    """


@hookspec
def dm_register_storage(register, node):
    """Register state storages: ``register(storage)``.

    A storage (see :class:`darkmatter.storage.Storage`) has a unique ``name`` and offers ``load()``,
    ``async commit(snapshot)`` (durable when it returns; docs/protocol.md §11.2) and ``close()``. The node
    uses the one named by ``DARKMATTER_STORAGE`` (default ``json``, the built-in JSON state file).
    Two storages with the same name fail start-up; an unknown name fails with the list of known ones.
    """


@hookspec
def dm_register_tools(register, node):
    """Register MCP tools: ``register(tool)``.

    A tool is a :class:`darkmatter.tools.Tool`: a ``darkmatter_*`` name, a description, a JSON input
    schema, MCP annotations and ``async handler(node, arguments, session) -> dict``. A handler raises
    :class:`darkmatter.tools.ToolError` for errors the model should read (returned with ``isError``).
    A tool name registered twice fails start-up with an error naming both plugins.
    """


@hookspec
def dm_register_routes(register, node):
    """Register HTTP routes on the node's port: ``register(route)``.

    ``route`` is a Starlette ``Route`` (or other ``BaseRoute``). Paths are exact; nothing redirects.
    The kernel itself serves ``/mcp``. The same method and path registered twice fails start-up with an
    error naming both plugins.
    """


# --- lifecycle -----------------------------------------------------------------------------


@hookspec
def dm_lifespan(node):
    """Return an async context manager that runs for the node's lifetime, or None.

    The kernel enters every returned manager after the state is loaded and before the HTTP port
    accepts requests, and exits them in reverse order at shutdown (before the final state flush).
    Background loops (health checks, beacons) live here, inside ``node.task_group`` or their own tasks.
    """


# --- events --------------------------------------------------------------------------------


@hookspec
def dm_on_message_received(node, message):
    """A message was accepted into the inbox (over any transport) and persisted.

    ``message`` is the inbox entry of docs/protocol.md §4.7 (a dict; treat it as read-only). May return an
    awaitable. Duplicates and refused messages never reach this hook.
    """


@hookspec
def dm_on_message_forwarded(node, message, target_agent_id):
    """This node delivered ``message`` (an inbox entry) onward to ``target_agent_id`` (§5.3)."""


@hookspec
def dm_on_message_responded(node, message_id, response, delivery):
    """This node answered an inbox message (§5.4); ``delivery`` is the outbox state of the response."""


@hookspec
def dm_on_response_received(node, sent_message, response):
    """A webhook ``response`` update for one of this node's sent messages was recorded (§5.6)."""


@hookspec
def dm_on_message_expired(node, message_id, reason):
    """A message ran out of hops here, the owner expired one of its sent messages (§5.3, §5.5), or an inbox
    message a plugin claims (``dm_claim_message``) was expired by the agent or at its origin."""


@hookspec
def dm_on_message_seen(node, message, state):
    """An agent session was shown an inbox ``message`` for the first time (``state`` ``surfaced``: listed with
    its content, pushed on a channel or returned by ``darkmatter_wait_for_message``) or read it in full
    (``read``: ``darkmatter_get_message``), docs/protocol.md §5.8. Called when the state is new for the message
    (with the furthest one: a message read before it was listed gives one ``read``), after the kernel recorded
    it, from a background task. Treat ``message`` as read-only."""


@hookspec
def dm_on_connection_changed(node, agent_id, event):
    """A connection changed: ``event`` is one of ``connected``, ``disconnected``, ``requested``,
    ``rejected``, ``url_changed``, ``health``. The live status is refreshed after this hook."""


# --- status --------------------------------------------------------------------------------


@hookspec
def dm_status_lines(node):
    """Return a list of short lines (or None) for the live status (``darkmatter_status``).

    Lines that start with ``ACTION:`` ask the agent to do something. Never put peer-controlled text in a
    line unless it is length-capped and quoted.
    """


# --- decisions -----------------------------------------------------------------------------


@hookspec(firstresult=True)
def dm_trust_connection_request(node, request):
    """Decide an incoming connection request: return ``"accept"``, ``"reject"`` or ``"queue"``.

    ``request`` is a dict with ``from_agent_id``, ``from_agent_url``, ``from_agent_bio``,
    ``from_agent_display_name``, ``from_agent_public_key_hex``, ``protocol_version`` and ``signed``
    (the signature has already been verified). Return None to leave the decision to the next plugin.
    The kernel default (trylast): ``accept`` on a genesis node, else ``queue``. Caps (50 connections,
    50 pending) are enforced by the kernel whatever the policy says. Synchronous; never ``async def``.
    """


@hookspec(firstresult=True)
def dm_claim_message(node, message):
    """Claim an inbox ``message`` that is answered outside the mesh (it came in through a bridge, such as the
    A2A bridge, with ``outside_mesh`` set and no webhook). Return None to leave it to the mesh (the kernel
    default), or a claim: an object with

    * ``async respond(message, response, metadata) -> dict``: deliver the agent's answer and return at least
      ``{"delivery": "delivered" | "failed"}`` (plus ``last_error`` when it failed); raise
      :class:`darkmatter.tools.ToolError` to refuse, which keeps the message in the inbox;
    * ``async expire(message) -> None``: the agent declined the message (``darkmatter_expire_message``).

    ``darkmatter_respond_message`` then never posts to a webhook: it awaits ``respond``, removes the message
    from the inbox in one state write with whatever the claim changed, and emits ``dm_on_message_responded``;
    ``darkmatter_expire_message`` awaits ``expire``, removes the message and emits ``dm_on_message_expired``;
    ``darkmatter_forward_message`` refuses a claimed message. Synchronous; never ``async def``.
    """


@hookspec(firstresult=True)
def dm_rank_forwarding_candidates(node, message, candidates):
    """Rank connected peers as forwarding candidates for an inbox ``message``.

    ``candidates`` is a list of connection dicts (never the sender or the node itself). Return a list of
    agent_ids, best first (a subset is fine), or None to defer. The kernel default (trylast) returns
    ``[]``: no suggestion. Shown to the agent by ``darkmatter_get_message``; the kernel never forwards on
    its own. Synchronous; never ``async def``.
    """
