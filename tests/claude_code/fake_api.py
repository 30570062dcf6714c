"""``python fake_api.py PORT LOG``: a loopback stand-in for the Anthropic Messages API driving a real ``claude -p``.

When the request offers ``mcp__darkmatter__darkmatter_wait_for_message`` it answers with a ``tool_use`` of that
tool; once the tool result comes back it logs it and ends the turn. Every request is logged (path, offered
tools, tool results). Nothing here reaches beyond 127.0.0.1.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WAIT = "mcp__darkmatter__darkmatter_wait_for_message"


def events(blocks: list, stop: str) -> list:
    out = [{"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}]
    for i, block in enumerate(blocks):
        if block["type"] == "tool_use":
            out += [{"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                    {"type": "content_block_delta", "index": i,
                     "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}]
        else:
            out += [{"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": block["text"]}}]
        out.append({"type": "content_block_stop", "index": i})
    return out + [{"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"output_tokens": 5}}, {"type": "message_stop"}]


class Handler(BaseHTTPRequestHandler):
    log_file = ""

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(404, b"", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        tools = [t.get("name") for t in body.get("tools") or []]
        messages = body.get("messages") or [{}]
        entry = {"path": self.path, "tools": tools}
        if "count_tokens" in self.path:
            blocks, stop = None, None
        elif "tool_result" in json.dumps(messages[-1]):
            entry["tool_result"] = messages[-1]
            blocks, stop = [{"type": "text", "text": "A peer wrote to me."}], "end_turn"
        elif WAIT in tools:
            blocks, stop = [{"type": "tool_use", "id": "toolu_wait", "name": WAIT,
                             "input": {"timeout_seconds": 60}}], "tool_use"
        else:
            blocks, stop = [{"type": "text", "text": "ok"}], "end_turn"
        with open(self.log_file, "a") as log:
            log.write(json.dumps(entry) + "\n")
        if blocks is None:
            return self.reply(200, b'{"input_tokens": 10}', "application/json")
        if body.get("stream"):
            data = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events(blocks, stop))
            return self.reply(200, data.encode(), "text/event-stream")
        self.reply(200, json.dumps({"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                                    "content": blocks, "stop_reason": stop, "stop_sequence": None,
                                    "usage": {"input_tokens": 10, "output_tokens": 5}}).encode(), "application/json")


if __name__ == "__main__":
    Handler.log_file = sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
