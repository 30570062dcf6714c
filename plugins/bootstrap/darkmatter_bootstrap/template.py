"""``darkmatter_get_server_template``: what an agent needs to start a new node (docs/protocol.md §4.11):
the kernel and plugin versions, where the packages are, the core primitives, the bootstrap steps and a
compatibility note. A recommendation, which the new node may change."""

from __future__ import annotations

from darkmatter.api import PROTOCOL_VERSION, Tool, __version__

from darkmatter_bootstrap.service import state_of

TOOL_WAIT = 10.0  # how long darkmatter_get_server_template waits for the packages before saying "pending"

PRIMITIVES = [
    {"name": "connect", "tool": "darkmatter_request_connection", "endpoint": "POST /__darkmatter__/connection_request",
     "summary": "Ask a node (by URL) for a connection; a genesis node accepts at once, others queue the request "
                "(docs/protocol.md §4.2, §4.3)."},
    {"name": "accept / reject", "tool": "darkmatter_respond_connection",
     "endpoint": "POST /__darkmatter__/connection_accepted, /__darkmatter__/connection_rejected",
     "summary": "Decide a queued incoming request; the requester is told either way (§4.4, §4.5)."},
    {"name": "disconnect", "tool": "darkmatter_disconnect", "endpoint": "POST /__darkmatter__/disconnect",
     "summary": "Drop a connection locally and tell the peer once (§4.6)."},
    {"name": "message (with webhook)", "tool": "darkmatter_send_message",
     "endpoint": "POST /__darkmatter__/message; POST/GET /__darkmatter__/webhook/{message_id}",
     "summary": "Send to one connection or all; each message carries the originator's webhook, where "
                "forwarders report hops and the recipient posts its response (§4.7, §5). See also "
                "darkmatter_forward_message and darkmatter_respond_message."},
]


def template(node) -> dict:
    state = state_of(node)
    base = node.base_url.rstrip("/")
    files = [{"file": p.file, "sha256": p.sha256, "distribution": p.distribution, "version": p.version,
              "role": p.role, "url": f"{base}/bootstrap/packages/{p.file}"} for p in state.ordered]
    if not node.config.bootstrap:
        availability = "disabled on this node (DARKMATTER_BOOTSTRAP=false): the /bootstrap routes answer 404"
    else:
        availability = {"pending": "being prepared; ask again in a few seconds",
                        "ready": "ready", "failed": "unavailable: this node could not package itself"}[state.status]
    dists = {p.plugin: p.distribution for p in state.ordered if p.plugin}
    return {
        "recommendation": "This template is a recommendation, not a requirement: the new node may change any "
                          "part of it (plugins, settings, even the implementation) as long as it speaks the "
                          "protocol.",
        "implementation": {"kernel": {"distribution": "darkmatter", "version": __version__},
                           "plugins": [dict(p, distribution=dists.get(p["name"])) for p in node.plugin_list()]},
        "packages": {"availability": availability, "bootstrap_script": f"{base}/bootstrap",
                     "server_py": f"{base}/bootstrap/server.py",
                     "server_py_sha256": state.server_py_sha256 or None, "files": files,
                     "third_party": "dependencies come from the package index (PIP_INDEX_URL applies)"},
        "primitives": PRIMITIVES,
        "bootstrap_steps": [
            f"Run `curl -fsSL {base}/bootstrap | sh` (or fetch {base}/bootstrap/server.py and run it with "
            "python3) on the new machine; read it first: it is handed out on trust-on-first-use.",
            "It creates a virtualenv under ~/.darkmatter (DARKMATTER_HOME), downloads the packages above, checks "
            "each against its SHA-256, and installs them (third-party dependencies from the package index).",
            "It picks a free port in 8100-8110 (DARKMATTER_BOOTSTRAP_PORTS), starts the node in the background "
            "(DARKMATTER_TRANSPORT=http, log under ~/.darkmatter/logs) and waits for "
            "/.well-known/darkmatter.json.",
            "It prints the .mcp.json entry (stdio, the virtualenv's python, `-m darkmatter run`) for the new "
            "agent's MCP client.",
            f"The new agent connects back with darkmatter_request_connection url={base}.",
            "Re-running it is safe: it reuses the virtualenv and does not start a second node.",
        ],
        "compatibility": f"Protocol {PROTOCOL_VERSION}; interoperates with protocol 0.2 nodes (docs/protocol.md §1.3): "
                         "0.3 only adds fields and endpoints, refusing 0.2 behaviour only where it would allow "
                         "spoofing, replay or hijack.",
        "protocol_version": PROTOCOL_VERSION,
    }


async def _template_handler(node, args: dict, session) -> dict:
    if node.config.bootstrap:
        await state_of(node).settled(node, TOOL_WAIT)  # the packages are packed at the first ask, if not yet
    result = template(node)
    # the original implementation's keys (protocol 0.2), beside the new ones
    source = state_of(node).server_py
    result.update(template_from=node.agent_id, server_source=source.decode() if source else None,
                  bootstrap_instructions={str(i): step for i, step in enumerate(result["bootstrap_steps"], 1)},
                  core_primitives=[p["tool"] for p in PRIMITIVES], compatibility_note=result["compatibility"])
    return result


def server_template_tool() -> Tool:
    return Tool("darkmatter_get_server_template",
                "The server template for starting a new DarkMatter node: installed kernel and plugin versions, "
                "where to get the packages (/bootstrap...), the core primitives, the bootstrap steps and a "
                "compatibility note. A recommendation the new node may change.",
                _template_handler, read_only=True, idempotent=True, title="Server template")
