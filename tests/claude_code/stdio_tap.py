"""``python stdio_tap.py LOG -- COMMAND...``: run COMMAND as a stdio MCP server and copy its traffic both ways,
appending each line to LOG as ``{"from": "client"|"server", "message": ...}`` (a test's view of what a real MCP
client and the server said to each other)."""

import json
import signal
import subprocess
import sys
import threading

log_path = sys.argv[1]
command = sys.argv[sys.argv.index("--") + 1:]
child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
lock = threading.Lock()


def record(side: str, line: bytes) -> None:
    try:
        message = json.loads(line)
    except ValueError:
        message = line.decode("utf-8", errors="replace")
    with lock, open(log_path, "a") as log:
        log.write(json.dumps({"from": side, "message": message}) + "\n")


def pump(source, sink, side: str) -> None:
    for line in iter(source.readline, b""):
        record(side, line)
        try:
            sink.write(line)
            sink.flush()
        except (BrokenPipeError, ValueError):
            break
    try:
        sink.close()
    except (BrokenPipeError, ValueError):
        pass


def stop(signum, frame) -> None:
    child.terminate()


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
threading.Thread(target=pump, args=(sys.stdin.buffer, child.stdin, "client"), daemon=True).start()
server = threading.Thread(target=pump, args=(child.stdout, sys.stdout.buffer, "server"), daemon=True)
server.start()
code = child.wait()
server.join(timeout=5)
sys.exit(code)
