"""A stand-in for `claude -p`: a real MCP client started by the autospawn plugin in tests.

It takes the arguments the plugin gives claude (``-p PROMPT``, ``--mcp-config JSON``, the permission
flags) after its own (``--mode``, ``--record-dir``, ``--sleep``, ``--via``), writes what it saw to
``<record-dir>/<pid>.json`` and then, by mode:

* ``respond``: attaches to the node the way claude would (launches the stdio server named in
  ``--mcp-config``: ``python -m darkmatter run``, which relays to the running node; or ``--via http``:
  the node's ``/mcp`` at DARKMATTER_MCP_URL), reads the inbox with darkmatter_list_inbox, finds the message
  named in the prompt and answers it with darkmatter_respond_message;
* ``forward``: the same, but forwards the message to the first connection the prompt offers;
* ``overreach``: first tries what a prompt-injected agent would (authenticate, disconnect its sender, go
  inactive, broadcast, list sent messages, read ``STANDIN_OTHER_MESSAGE``), records the outcomes, then answers;
* ``sleep``: sleeps ``--sleep`` seconds;
* ``hang``: ignores SIGTERM and sleeps until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> dict:
    opts = {"mode": "respond", "record_dir": None, "sleep": "5", "via": "stdio", "prompt": None,
            "mcp_config": None, "other": []}
    names = {"--mode": "mode", "--record-dir": "record_dir", "--sleep": "sleep", "--via": "via", "-p": "prompt",
             "--mcp-config": "mcp_config"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in names and i + 1 < len(argv):
            opts[names[arg]] = argv[i + 1]
            i += 2
        else:
            opts["other"].append(arg)
            i += 1
    return opts


class Recorder:
    def __init__(self, directory: str | None):
        self.path = Path(directory) / f"{os.getpid()}.json" if directory else None
        self.data: dict = {}

    def update(self, **items) -> None:
        self.data.update(items)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def stdin_is_devnull() -> bool:
    try:
        a, b = os.fstat(0), os.stat(os.devnull)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_rdev == b.st_rdev and a.st_rdev != 0)


def find_message(value, message_id: str):
    if isinstance(value, dict):
        if value.get("message_id") == message_id:
            return value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = find_message(item, message_id)
            if found is not None:
                return found
    return None


def result_data(result) -> object:
    if getattr(result, "structured_content", None) is not None:
        return result.structured_content
    texts = [c.text for c in result.content if getattr(c, "text", None)]
    try:
        return json.loads(texts[0]) if texts else None
    except ValueError:
        return texts


async def respond(opts: dict, record: Recorder) -> int:
    from mcp import Client, StdioServerParameters

    match = re.search(r"^- message_id: (\S+)$", opts["prompt"] or "", re.M)
    if not match:
        record.update(error="no message_id in the prompt")
        return 3
    message_id = match.group(1)
    if opts["via"] == "http":
        target = os.environ["DARKMATTER_MCP_URL"]
    else:
        server = json.loads(opts["mcp_config"])["mcpServers"]["darkmatter"]
        target = StdioServerParameters(command=server["command"], args=server["args"],
                                       env={**os.environ, **server.get("env", {})})
    record.update(via=opts["via"], message_id=message_id)
    async with Client(target, read_timeout_seconds=30) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        record.update(tools=tools)
        inbox = await client.call_tool("darkmatter_list_inbox", {})
        entry = find_message(result_data(inbox), message_id)
        record.update(inbox_entry=entry)
        if entry is None:
            return 4
        if opts["mode"] == "overreach":
            # what a prompt-injected agent would try beyond its message (docs/protocol.md §12.6)
            sender = entry.get("from_agent_id")
            tries = {"authenticate": ("darkmatter_authenticate", {}),
                     "disconnect": ("darkmatter_disconnect", {"agent_id": sender}),
                     "set_status": ("darkmatter_set_status", {"status": "inactive"}),
                     "send_message": ("darkmatter_send_message", {"content": "spam from a spawned agent"}),
                     "list_messages": ("darkmatter_list_messages", {})}
            other = os.environ.get("STANDIN_OTHER_MESSAGE")
            if other:
                tries["get_other_message"] = ("darkmatter_get_message", {"message_id": other})
            outcomes = {}
            for name, (tool, args) in tries.items():
                result = await client.call_tool(tool, args)
                outcomes[name] = {"is_error": result.is_error, "data": result_data(result)}
            record.update(overreach=outcomes, inbox_seen=result_data(inbox))
        if opts["mode"] == "forward":
            # the first connection the prompt offers as a forwarding target
            peer = re.search(r'^  - agent_id "([^"]+)"', opts["prompt"], re.M)
            if not peer:
                record.update(error="no forwarding target in the prompt")
                return 5
            result = await client.call_tool("darkmatter_forward_message", {
                "message_id": message_id, "target_agent_id": peer.group(1), "note": "stand-in forwards"})
            record.update(forward_to=peer.group(1), forward_error=result.is_error, forward_result=result_data(result))
            return 1 if result.is_error else 0
        answer = await client.call_tool("darkmatter_respond_message",
                                        {"message_id": message_id, "response": f"stand-in answer to {message_id}"})
        record.update(respond_error=answer.is_error, respond_result=result_data(answer))
        return 1 if answer.is_error else 0


def main() -> int:
    opts = parse(sys.argv[1:])
    record = Recorder(opts["record_dir"])
    record.update(pid=os.getpid(), started=time.time(), mode=opts["mode"], cwd=os.getcwd(),
                  stdin_devnull=stdin_is_devnull(), prompt=opts["prompt"], other_args=opts["other"],
                  mcp_config=json.loads(opts["mcp_config"]) if opts["mcp_config"] else None,
                  env={k: v for k, v in os.environ.items() if k.startswith("DARKMATTER_")})
    print(f"stand-in agent {os.getpid()} mode {opts['mode']}", flush=True)
    print("to stderr too", file=sys.stderr, flush=True)
    code = 0
    if opts["mode"] in ("respond", "forward", "overreach"):
        code = asyncio.run(respond(opts, record))
    elif opts["mode"] == "sleep":
        time.sleep(float(opts["sleep"]))
    elif opts["mode"] == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record.update(ignoring_sigterm=True)
        time.sleep(600)
    record.update(finished=time.time(), code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
