"""Identity and keys (docs/protocol.md §3.1–§3.2, §11.1, §11.4, §12.3): the id is bound to the key, survives
restarts, is never silently replaced, its files are private, and the private key never leaves the node
except to its own local session."""

from __future__ import annotations

import json
from pathlib import Path
import stat
import uuid

import httpx
import httpx2
import pytest
from dm_acceptance import NodeProcess, free_port, run_cli
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from darkmatter.identity import Identity, v2_string, verify
from darkmatter.node import StartupError
from darkmatter.testing import RawPeer, make_node, node_context

pytestmark = pytest.mark.anyio


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_agent_id_is_the_public_key_and_every_signature_checks_out(tmp_path):
    async with node_context(tmp_path) as node:
        assert node.agent_id == node.public_key_hex == Identity.from_private_hex(
            node.state["private_key_hex"]).public_key_hex
        peer = RawPeer()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", trust_env=False) as http:
            status = (await http.get("/__darkmatter__/status")).json()
            well_known = (await http.get("/.well-known/darkmatter.json")).json()
            accepted = (await http.post("/__darkmatter__/connection_request", json=peer.connection_request())).json()
        assert status["agent_id"] == status["public_key_hex"] == well_known["public_key_hex"] == node.agent_id
        text = v2_string("connection_accepted", accepted["agent_id"], accepted["agent_url"],
                         accepted["agent_public_key_hex"], peer.agent_id, accepted["timestamp"])
        assert verify(node.agent_id, text, accepted["signature_v2_hex"])


async def test_identity_survives_clean_and_crash_restarts_and_a_new_port(tmp_path):
    proc = NodeProcess(tmp_path)
    try:
        first = (await proc.start())["agent_id"]
        assert await proc.stop() == 0
        assert (await proc.start())["agent_id"] == first
        await proc.kill9()
        assert (await proc.start())["agent_id"] == first
        await proc.stop()
        moved = NodeProcess(tmp_path, port=free_port(), state_file=proc.state_file)
        try:
            assert (await moved.start())["agent_id"] == first
        finally:
            await moved.stop()
    finally:
        await proc.stop()


def _valid_state(tmp_path) -> bytes:
    other = Identity.generate()
    return json.dumps({"state_version": 3, "agent_id": other.public_key_hex, "public_key_hex": other.public_key_hex,
                       "private_key_hex": other.private_key_hex, "connections": {}}).encode()


def corrupt_variants(tmp_path) -> dict[str, bytes]:
    good = _valid_state(tmp_path)
    a, b = Identity.generate(), Identity.generate()
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "garbage": bytes(range(256)) * 4,
        "invalid utf-8": b'{"agent_id": "\xff\xfe"}',
        "not an object": b"[1, 2, 3]",
        "no agent_id": json.dumps({"public_key_hex": a.public_key_hex, "private_key_hex": a.private_key_hex}).encode(),
        "mismatched keys": json.dumps({"agent_id": a.public_key_hex, "public_key_hex": a.public_key_hex,
                                       "private_key_hex": b.private_key_hex}).encode(),
        "NaN": b'{"agent_id": NaN}',
    }


async def test_a_corrupt_state_file_is_never_silently_replaced(tmp_path):
    """Every start without the override refuses (not only the first: a copy already kept is no licence to
    replace the file), leaves the file as it was and says how to go on; only the explicit override starts
    a new identity -- one taken from nothing in the corrupt file -- and it keeps the copy."""
    for name, data in corrupt_variants(tmp_path).items():
        directory = tmp_path / name.replace(" ", "_")
        directory.mkdir()
        state = directory / "state.json"
        state.write_bytes(data)
        for attempt in range(2):
            node = make_node(directory)
            with pytest.raises(StartupError) as info:
                await node.start()
            message = str(info.value)
            copies = list(directory.glob("state.json.corrupt-*"))
            assert copies and all(c.read_bytes() == data and mode(c) == 0o600 for c in copies), (name, attempt)
            assert state.read_bytes() == data, f"{name}: the original was changed (start {attempt + 1})"
            assert str(state) in message and "DARKMATTER_STATE_RECOVERY" in message, (name, attempt)
            assert any(c.name in message for c in copies), (name, attempt)
            journal = directory / "state.json.journal"
            assert not journal.exists() or journal.read_bytes() == b"", (name, attempt)
        # the lock was released: an explicit recovery starts a fresh identity and keeps the copy
        async with node_context(directory, DARKMATTER_STATE_RECOVERY="new-identity") as fresh:
            identity = (fresh.agent_id, fresh.public_key_hex, fresh.state["private_key_hex"])
        assert identity[0] == identity[1]
        assert not any(part.encode() in data for part in identity), f"{name}: the new identity came from the file"
        assert all(c.read_bytes() == data for c in copies), name
        saved = json.loads(state.read_text())
        assert (saved["agent_id"], saved["private_key_hex"]) == (identity[0], identity[2]), name
        # and from now on that new identity is the node's, without the override
        async with node_context(directory) as again:
            assert again.agent_id == identity[0], name


async def test_the_cli_refuses_a_corrupt_state_in_one_line_without_a_traceback(tmp_path):
    good = _valid_state(tmp_path)
    state = tmp_path / "state.json"
    state.write_bytes(good[: len(good) - 7])
    result = run_cli(tmp_path, "run", "--transport", "http", "--port", str(free_port()),
                     DARKMATTER_STATE_FILE=str(state))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors and str(state) in errors[-1] and "DARKMATTER_STATE_RECOVERY" in errors[-1]
    assert state.read_bytes() == good[: len(good) - 7]


async def test_key_files_are_private_whatever_the_umask(tmp_path):
    home = tmp_path / "home"
    proc = NodeProcess(home, DARKMATTER_STATE_FILE="", umask="0")  # default location under $HOME
    try:
        await proc.start()
        state_dir = home / ".darkmatter" / "state"
        state = state_dir / f"{proc.port}.json"
        assert state.exists()
        assert mode(state_dir) == 0o700
        for path in (state, state.with_name(state.name + ".lock"), state.with_suffix(".token")):
            assert path.exists() and mode(path) == 0o600, path
        # a widened state file is tightened on the next start
        await proc.stop()
        state.chmod(0o644)
        state_dir.chmod(0o755)
        await proc.start()
        assert mode(state) == 0o600 and mode(state_dir) == 0o700
        journal = state.with_name(state.name + ".journal")
        if journal.exists():
            assert mode(journal) == 0o600
        assert not list(state_dir.glob(".*tmp-*")), "temporary files left behind"
    finally:
        await proc.stop()


async def test_the_private_key_is_in_no_http_or_mcp_answer_and_no_log_line(tmp_path):
    proc = NodeProcess(tmp_path, log_level="debug")
    try:
        status = await proc.start()

        class Remote:
            agent_id = status["agent_id"]
            port = proc.port
        private = json.loads(proc.state_file.read_text())["private_key_hex"]
        answers: list[str] = []
        peer = RawPeer()
        legacy = RawPeer(agent_id=str(uuid.uuid4()), keyed=False)
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http:
            answers.append((await http.post("/__darkmatter__/connection_request", json=peer.connection_request())).text)
            answers.append((await http.post("/__darkmatter__/connection_request",
                                            json=legacy.connection_request(sign=False))).text)
            for i in range(3):
                answers.append((await http.post("/__darkmatter__/message", json=peer.message(Remote, f"m{i}"))).text)
            for path in ("/__darkmatter__/status", "/__darkmatter__/network_info", "/.well-known/darkmatter.json",
                         f"/__darkmatter__/peer_lookup/{peer.agent_id}", "/__darkmatter__/webhook/msg-x",
                         f"/__darkmatter__/impression/{peer.agent_id}", "/nope", "/bootstrap"):
                answers.append((await http.get(path)).text)
            for path, body in (("/__darkmatter__/message", b"{"), ("/__darkmatter__/peer_update", b"[]"),
                               ("/__darkmatter__/connection_accepted", b'{"agent_id": 1}'),
                               ("/__darkmatter__/webhook/msg-x", b'{"type": "response"}')):
                answers.append((await http.post(path, content=body)).text)
        remote = {"X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer " + (
            proc.state_file.with_suffix(".token")).read_text().strip()}
        http2 = httpx2.AsyncClient(trust_env=False, headers=remote, timeout=httpx2.Timeout(30.0))
        async with Client(streamable_http_client(proc.url + "/mcp", http_client=http2)) as c:
            tools = await c.list_tools()
            answers.append(json.dumps([t.model_dump() for t in tools.tools]))
            for tool in tools.tools:
                if tool.annotations and tool.annotations.read_only_hint and not tool.input_schema.get("required"):
                    result = await c.call_tool(tool.name, {})
                    answers.append(json.dumps([b.model_dump() for b in result.content]))
            result = await c.call_tool("darkmatter_authenticate", {})
            answers.append(json.dumps([b.model_dump() for b in result.content]))
        # not even a local session gets it (§12.3): it gets the path of the 0600 backup file instead
        http3 = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0))
        async with Client(streamable_http_client(proc.url + "/mcp", http_client=http3)) as c:
            local = await c.call_tool("darkmatter_authenticate", {})
            assert not local.is_error
            answers.append(json.dumps([b.model_dump() for b in local.content]))
            backup = Path(local.structured_content["identity_backup"])
            assert json.loads(backup.read_text())["private_key_hex"] == private
            assert backup.stat().st_mode & 0o777 == 0o600
        for text in answers:
            assert private not in text.lower()
        await proc.stop()
        log = proc.log_text()
        assert "DEBUG" in log, "debug logging was not on"
        assert private not in log.lower()
    finally:
        await proc.stop()
