"""A loopback stand-in for the Anthropic Messages API, to drive a real `claude -p` in an opt-in test.

``python fake_anthropic_api.py PORT LOGFILE`` serves ``POST /v1/messages`` on 127.0.0.1:PORT. When the request
offers the tool ``mcp__darkmatter__darkmatter_respond_message`` and the conversation names a message id (the
autospawn prompt's ``- message_id: ...`` line), it answers with a ``tool_use`` of that tool; once the tool
result comes back, it ends the turn. Every request is logged (path, model, offered tools, tool results).
"""

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL = "mcp__darkmatter__darkmatter_respond_message"


def stream_events(blocks: list[dict], stop: str) -> list[dict]:
    events = [{"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}]
    for i, block in enumerate(blocks):
        if block["type"] == "tool_use":
            events.append({"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
            events.append({"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        else:
            events.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            events.append({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta",
                                                                                "text": block["text"]}})
        events.append({"type": "content_block_stop", "index": i})
    events.append({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"output_tokens": 5}})
    events.append({"type": "message_stop"})
    return events


class Handler(BaseHTTPRequestHandler):
    log_file = None

    def log_message(self, *args):
        pass

    def record(self, entry: dict) -> None:
        with open(self.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def do_GET(self):
        self.record({"method": "GET", "path": self.path})
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        tools = [t.get("name") for t in body.get("tools") or []]
        messages = body.get("messages") or [{}]
        last = json.dumps(messages[-1])
        entry = {"method": "POST", "path": self.path, "model": body.get("model"), "tools": tools}
        if "count_tokens" in self.path:
            self.record(entry)
            return self.send_json({"input_tokens": 100})
        found = re.search(r"- message_id: ([A-Za-z0-9._~-]+)", json.dumps(messages))
        if "tool_result" in last:
            entry["tool_result"] = messages[-1]
            blocks, stop = [{"type": "text", "text": "Answered."}], "end_turn"
        elif found and TOOL in tools:
            blocks = [{"type": "tool_use", "id": "toolu_fake1", "name": TOOL,
                       "input": {"message_id": found.group(1), "response": "42, from a real claude -p"}}]
            stop = "tool_use"
        else:
            blocks, stop = [{"type": "text", "text": "ok"}], "end_turn"
        self.record(entry)
        if body.get("stream"):
            data = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in stream_events(blocks, stop)).encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_json({"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                            "content": blocks, "stop_reason": stop, "stop_sequence": None,
                            "usage": {"input_tokens": 10, "output_tokens": 5}})

    def send_json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    Handler.log_file = sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
