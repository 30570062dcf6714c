"""The node's state file (docs/protocol.md §11): round trips, atomic writes under SIGKILL, corruption,
0.2 migration, permissions, the lock and the group commit."""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from darkmatter.builtin.json_storage import JsonFileStorage
from darkmatter.config import Config
from darkmatter.identity import Identity
from darkmatter.node import StartupError
from darkmatter.state import SENT_CAP, StateLocked, evict_sent
from darkmatter.testing import env_for_tests, make_node, node_context
from darkmatter.wire import now_iso

pytestmark = pytest.mark.anyio


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def inbox_entry(n: int, sender: str) -> dict:
    """An inbox entry of docs/protocol.md §4.7."""
    return {"message_id": f"msg-{n:012x}", "content": f"question {n}",
            "webhook": f"http://127.0.0.1:9/__darkmatter__/webhook/msg-{n:012x}", "hops_remaining": 10,
            "from_agent_id": sender, "metadata": {"n": n}, "received_at": now_iso(), "verified": True,
            "signature_version": 2, "forwarded_to": []}


# --- round trip ----------------------------------------------------------------------------------


async def test_state_round_trips_across_a_restart(tmp_path):
    peer = Identity.generate().public_key_hex
    async with node_context(tmp_path, plugins="") as node:
        first = {k: node.state[k] for k in ("agent_id", "private_key_hex", "public_key_hex", "created_at")}
        assert node.agent_id == node.public_key_hex == node.identity.public_key_hex  # §3.2: id = key
        node.state["inbox"].extend(inbox_entry(n, peer) for n in range(3))
        node.state["impressions"][peer] = "answers quickly"
        node.state["connections"][peer] = {"agent_id": peer, "agent_url": "http://127.0.0.1:9",
                                           "agent_public_key_hex": peer, "messages_sent": 4}
        node.state["sent_messages"]["msg-00000000abcd"] = {"message_id": "msg-00000000abcd", "content": "hi",
                                                            "status": "active", "responses": []}
        node.state["bio"] = "I answer questions about Rust."
        await node.save()
        saved_inbox = json.loads(json.dumps(node.state["inbox"]))

    async with node_context(tmp_path, plugins="") as again:
        assert {k: again.state[k] for k in first} == first
        assert again.identity.public_key_hex == first["public_key_hex"]
        assert again.state["inbox"] == saved_inbox  # no queued message lost
        assert again.state["impressions"] == {peer: "answers quickly"}
        assert again.connections[peer]["messages_sent"] == 4
        assert "msg-00000000abcd" in again.state["sent_messages"]
        assert again.state["bio"] == "I answer questions about Rust."
        assert again.state["status"] == "active" and again.state["port"] == again.port


async def test_env_settings_override_stored_values_only_when_set(tmp_path):
    async with node_context(tmp_path, plugins="", DARKMATTER_DISPLAY_NAME="alpha", DARKMATTER_BIO="first bio",
                            DARKMATTER_GENESIS="false") as node:
        assert (node.state["display_name"], node.state["bio"], node.state["is_genesis"]) == ("alpha", "first bio", False)
        node.state["status"] = "inactive"
        await node.save()
    async with node_context(tmp_path, plugins="") as node:
        # Unset variables leave stored values alone; status always comes back active (§11.4).
        assert (node.state["display_name"], node.state["bio"], node.state["is_genesis"]) == ("alpha", "first bio", False)
        assert node.state["status"] == "active"
    async with node_context(tmp_path, plugins="", DARKMATTER_DISPLAY_NAME="beta", DARKMATTER_GENESIS="true") as node:
        assert (node.state["display_name"], node.state["is_genesis"]) == ("beta", True)


async def test_a_new_identity_is_genesis_by_default(tmp_path):
    async with node_context(tmp_path, plugins="") as node:
        assert node.state["is_genesis"] is True
        assert node.public_status()["is_genesis"] is True


# --- durability and the group commit -----------------------------------------------------------


async def test_save_is_durable_on_return_and_a_burst_is_group_committed(tmp_path):
    peer = Identity.generate().public_key_hex
    async with node_context(tmp_path, plugins="") as node:
        node.state["inbox"].append(inbox_entry(0, peer))
        await node.save()
        on_disk = json.loads((tmp_path / "state.json").read_text())
        assert on_disk["inbox"][0]["message_id"] == "msg-000000000000"

        before = node.persister.commits

        async def accept(n: int) -> None:
            node.state["inbox"].append(inbox_entry(n, peer))
            await node.save()
            # Durable on return: this caller's message is in the file already.
            assert any(e["message_id"] == f"msg-{n:012x}"
                       for e in json.loads((tmp_path / "state.json").read_text())["inbox"])

        await asyncio.gather(*(accept(n) for n in range(1, 101)))
        commits = node.persister.commits - before
        assert 1 <= commits <= 5, f"100 concurrent saves took {commits} commits"
        on_disk = json.loads((tmp_path / "state.json").read_text())
        assert len(on_disk["inbox"]) == 101


async def test_state_writes_run_off_the_event_loop(tmp_path):
    """While a large state is written and fsynced, the loop keeps running other tasks."""
    async with node_context(tmp_path, plugins="") as node:
        node.state["notices"] = [{"text": "x" * 200, "n": n} for n in range(20000)]  # ~4.5 MB of JSON
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.create_task(ticker())
        await node.save()
        done = True
        await task
        # A write on the loop would leave the ticker a handful of turns; a thread leaves it many.
        assert ticks >= 50, ticks


# --- atomic writes under SIGKILL -----------------------------------------------------------------

KILL_CHILD = r"""
import asyncio, sys
from pathlib import Path
from darkmatter.builtin.json_storage import JsonFileStorage
from darkmatter.storage import Persister

async def main():
    storage = JsonFileStorage(Path(sys.argv[1]))
    journal = sys.argv[2] == "journal"
    state = storage.load() or {"state_version": 3, "agent_id": "kill-loop", "counter": 0, "log": [],
                               "payload": []}
    persister = Persister(storage, lambda: state, journal_limit=4096)
    await persister.save()  # as a node's start does: a snapshot first, then journal appends
    while True:
        n = state["counter"] + 1
        state["counter"] = n
        state["log"].append(n)
        if journal and n % 5:
            # the hot path: a journal append of exactly this change
            await persister.save([("set", ["counter"], n), ("append", ["log"], n)])
        else:
            state["payload"] = [n] * 4000  # a torn snapshot could never match its counter
            await persister.save()
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()

asyncio.run(main())
"""


@pytest.mark.parametrize("writes", ["snapshot", "journal"])
def test_the_state_is_always_old_or_new_under_a_kill_9_loop(tmp_path, writes):
    """SIGKILL a process committing state in a tight loop, 30 times at random moments: what a restart
    loads is always the last acknowledged state or the one being written, never a mix, a gap or a
    record applied twice (``journal``: appends between snapshots, as on the message hot path)."""
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    state_dir = tmp_path / "state"
    path = state_dir / "state.json"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    previous = 0
    kills = 30
    for attempt in range(kills):
        proc = subprocess.Popen([sys.executable, str(script), str(path), writes], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"child made no commit in 30 s (seed {seed})"
            first = proc.stdout.readline()
            time.sleep(rng.uniform(0, 0.04))
        finally:
            proc.kill()  # SIGKILL
            proc.wait(timeout=30)
            # NOTE: read through the same buffered reader as readline() (communicate() would skip its buffer).
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -9, err.decode()
        acked = [int(line) for line in (first + out).split()]
        assert acked, f"no acknowledged commit (seed {seed}): {err.decode()}"
        last = acked[-1]
        json.loads(path.read_bytes())  # the snapshot itself always parses
        assert mode(path) == 0o600
        data = JsonFileStorage(path).load()  # what the next start sees (journal applied)
        counter = data["counter"]
        # The last acknowledged state, or the one being written when the kill landed, nothing else.
        assert counter in (last, last + 1), f"loaded {counter}, last ack {last} (seed {seed}, kill {attempt})"
        assert data["log"] == list(range(1, counter + 1)), f"gap or double apply (seed {seed}, kill {attempt})"
        if data["payload"]:
            assert data["payload"] == [data["payload"][0]] * 4000
        else:  # journal mode writes the first payload with the first snapshot after the start, at n = 5
            assert writes == "journal" and counter < 5
        assert counter > previous
        previous = counter
    assert sorted(p.name for p in state_dir.iterdir() if not p.name.startswith(".")) in (
        ["state.json"], ["state.json", "state.json.journal"])
    # Temp files of dead writers are never read and are cleared at the next load.
    assert JsonFileStorage(path).load()["counter"] == previous
    assert list(state_dir.glob(".state.json.tmp-*")) == []


async def test_records_acknowledged_after_a_torn_journal_tail_survive_the_next_load(tmp_path):
    """A crash mid-append (power loss) leaves a torn last journal line. The records appended after the
    restart must not be glued to it, or the next load would stop there and lose them."""
    from darkmatter.storage import Persister

    path = tmp_path / "state.json"
    async with node_context(tmp_path, plugins="") as node:
        agent_id = node.agent_id
    journal = path.with_name("state.json.journal")
    with open(journal, "ab") as f:
        f.write(b'{"seq": 1, "ops": [["append", ["inbox"], {"message_id": "msg-torn')  # no newline: torn

    storage = JsonFileStorage(path)
    state = storage.load()
    assert state["agent_id"] == agent_id and state["inbox"] == []
    persister = Persister(storage, lambda: state)
    peer = Identity.generate().public_key_hex
    for n in range(3):
        entry = inbox_entry(n, peer)
        state["inbox"].append(entry)
        await persister.save([("append", ["inbox"], entry)])  # acknowledged: durable on return
    assert persister.appends >= 1 and persister.commits == 0
    # A crash now: no final snapshot. The next start must see all three.
    loaded = JsonFileStorage(path).load()
    assert [m["message_id"] for m in loaded["inbox"]] == [f"msg-{n:012x}" for n in range(3)]
    assert list(tmp_path.glob("state.json.journal.corrupt-*")) == []  # a torn tail is no corruption


async def test_a_journal_damaged_in_the_middle_is_kept_aside(tmp_path):
    path = tmp_path / "state.json"
    async with node_context(tmp_path, plugins=""):
        pass
    seq = json.loads(path.read_text()).get("journal_seq") or 0
    journal = path.with_name("state.json.journal")
    good = json.dumps({"seq": seq + 1, "ops": [["set", ["bio"], "from the journal"]]}).encode() + b"\n"
    damaged = good + b"garbage\n" + json.dumps({"seq": seq + 2, "ops": [["set", ["bio"], "lost"]]}).encode() + b"\n"
    journal.write_bytes(damaged)
    loaded = JsonFileStorage(path).load()
    assert loaded["bio"] == "from the journal"  # replay stops at the damage
    copies = list(tmp_path.glob("state.json.journal.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == damaged and mode(copies[0]) == 0o600
    assert journal.read_bytes() == good


# --- corruption ---------------------------------------------------------------------------------


def _valid_state_bytes() -> bytes:
    identity = Identity.generate()
    return json.dumps({"state_version": 3, "agent_id": identity.public_key_hex,
                       "private_key_hex": identity.private_key_hex, "public_key_hex": identity.public_key_hex,
                       "connections": {}, "sent_messages": {}, "impressions": {}}, indent=2).encode()


def _mismatched_keys() -> bytes:
    a, b = Identity.generate(), Identity.generate()
    return json.dumps({"agent_id": a.public_key_hex, "private_key_hex": a.private_key_hex,
                       "public_key_hex": b.public_key_hex}).encode()


CORRUPT = {
    "invalid-json": b'{"agent_id": "abc", ',
    "truncated": _valid_state_bytes()[:90],
    "empty": b"",
    "not-an-object": b'["agent_id"]',
    "missing-agent-id": b'{"bio": "hello", "connections": {}}',
    "key-mismatch": _mismatched_keys(),
    "not-utf8": b'{"agent_id": "\xff\xfe"}',
    "connections-not-object": b'{"agent_id": "abc", "connections": []}',
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
async def test_a_corrupt_state_file_is_kept_aside_and_reported_never_replaced(tmp_path, case):
    path = tmp_path / "state.json"
    path.write_bytes(CORRUPT[case])
    os.chmod(path, 0o644)
    before = path.stat()
    node = make_node(tmp_path, plugins="")
    with pytest.raises(StartupError) as err:
        await node.start()
    message = str(err.value)
    copies = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(copies) == 1
    copy = copies[0]
    assert str(path) in message and str(copy) in message and "DARKMATTER_STATE_RECOVERY=new-identity" in message
    assert copy.read_bytes() == CORRUPT[case]
    assert mode(copy) == 0o600
    # The original is untouched: same bytes, same inode, same mtime.
    assert path.read_bytes() == CORRUPT[case]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (before.st_ino, before.st_mtime_ns, before.st_mode)
    assert not node.started

    # Only the explicit override starts fresh, and the copy stays.
    async with node_context(tmp_path, plugins="", DARKMATTER_STATE_RECOVERY="new-identity") as fresh:
        assert fresh.agent_id == fresh.public_key_hex
        assert fresh.agent_id not in CORRUPT[case].decode("utf-8", "replace")
    assert json.loads(path.read_text())["agent_id"] == fresh.agent_id
    assert copy.read_bytes() == CORRUPT[case]


# --- 0.2 migration ------------------------------------------------------------------------------

V02_AGENT = "3f2b8c1e-7a4d-4e9b-9c2a-5d6e7f8a9b0c"
V02_PEER_UUID = "9d1c6a52-0b7e-4f43-8d2a-1e6f3c5b7a90"


def v02_state(with_keys: bool = True) -> tuple[dict, Identity, Identity]:
    """A state file as an original 0.2 node wrote it: UUID id, /mcp URLs, `response` on sent messages."""
    me, peer_key = Identity.generate(), Identity.generate()
    hex_peer = peer_key.public_key_hex
    state = {
        "agent_id": V02_AGENT,
        "bio": "Rust and systems questions.",
        "status": "active",
        "port": 8101,
        "is_genesis": False,
        "created_at": "2026-01-12T09:15:02.123456+00:00",
        "messages_handled": 17,
        "claimed": True,
        "display_name": "rusty",
        "connections": {
            V02_PEER_UUID: {
                "agent_id": V02_PEER_UUID, "agent_url": "http://localhost:8100/mcp",
                "agent_bio": "Genesis node.", "direction": "outbound",
                "connected_at": "2026-01-12T09:16:00.000000+00:00", "messages_sent": 5, "messages_received": 3,
                "messages_declined": 1, "total_response_time_ms": 1834.5,
                "last_activity": "2026-01-13T10:00:00.000000+00:00", "agent_public_key_hex": None,
                "agent_display_name": "genesis",
            },
            hex_peer: {
                "agent_id": hex_peer, "agent_url": "http://127.0.0.1:8102/mcp/", "agent_bio": "Python helper.",
                "direction": "inbound", "connected_at": "2026-01-12T11:00:00.000000+00:00", "messages_sent": 0,
                "messages_received": 2, "messages_declined": 0, "total_response_time_ms": 0,
                "last_activity": None, "agent_public_key_hex": hex_peer.upper(), "agent_display_name": None,
            },
        },
        "sent_messages": {
            "msg-0123456789ab": {
                "message_id": "msg-0123456789ab", "content": "Who knows about lifetimes?", "status": "responded",
                "initial_hops": 10, "routed_to": [V02_PEER_UUID], "created_at": "2026-01-13T09:00:00.000000+00:00",
                "updates": [{"type": "forwarded", "agent_id": V02_PEER_UUID, "target_agent_id": hex_peer,
                             "note": None, "timestamp": "2026-01-13T09:00:05.000000+00:00"}],
                "response": {"agent_id": hex_peer, "response": "Ask me.", "metadata": {},
                             "timestamp": "2026-01-13T09:01:00.000000+00:00"},
            },
            "msg-ba9876543210": {
                "message_id": "msg-ba9876543210", "content": "Anyone?", "status": "active", "initial_hops": 3,
                "routed_to": [], "created_at": "2026-01-13T12:00:00.000000+00:00", "updates": [],
                "response": None,
            },
        },
        "impressions": {V02_PEER_UUID: "Reliable, answers within minutes.", hex_peer: "Good at Python."},
    }
    if with_keys:
        state["private_key_hex"] = me.private_key_hex
        state["public_key_hex"] = me.public_key_hex
    return state, me, peer_key


async def test_a_02_state_file_loads_with_its_identity_connections_impressions_and_sent_messages(tmp_path):
    state, me, peer_key = v02_state()
    original = json.dumps(state, indent=2).encode()
    path = tmp_path / "state.json"
    path.write_bytes(original)
    hex_peer = peer_key.public_key_hex

    async with node_context(tmp_path, plugins="") as node:
        assert node.agent_id == V02_AGENT  # a UUID stays a UUID
        assert (node.state["private_key_hex"], node.public_key_hex) == (me.private_key_hex, me.public_key_hex)
        assert node.identity.public_key_hex == me.public_key_hex
        assert (node.state["display_name"], node.state["bio"], node.state["is_genesis"]) == ("rusty",
                                                                                           "Rust and systems questions.", False)
        assert node.state["messages_handled"] == 17
        assert set(node.connections) == {V02_PEER_UUID, hex_peer}
        genesis = node.connections[V02_PEER_UUID]
        assert genesis["agent_url"] == "http://localhost:8100"  # the /mcp suffix is gone (§2.6)
        assert (genesis["messages_sent"], genesis["messages_received"], genesis["messages_declined"],
                genesis["total_response_time_ms"]) == (5, 3, 1, 1834.5)
        assert node.connections[hex_peer]["agent_url"] == "http://127.0.0.1:8102"
        assert node.connections[hex_peer]["agent_public_key_hex"] == hex_peer
        assert node.state["impressions"] == state["impressions"]
        answered = node.state["sent_messages"]["msg-0123456789ab"]
        assert answered["status"] == "responded" and answered["routed_to"] == [V02_PEER_UUID]
        assert answered["updates"][0]["verified"] is False
        assert len(answered["responses"]) == 1
        response = answered["responses"][0]
        assert (response["agent_id"], response["response"], response["verified"]) == (hex_peer, "Ask me.", False)
        assert answered["response"]["response"] == "Ask me."
        assert node.state["sent_messages"]["msg-ba9876543210"]["responses"] == []
        for key in ("inbox", "outbox", "pending_requests", "pending_outbound", "seen_message_ids"):
            assert key in node.state
        assert node.state["state_version"] == 3

    backup = tmp_path / "state.json.bak-0.2"
    assert backup.read_bytes() == original
    assert mode(backup) == 0o600
    saved = json.loads(path.read_text())
    assert saved["state_version"] == 3 and saved["agent_id"] == V02_AGENT
    backup_mtime = backup.stat().st_mtime_ns

    # Written once: a restart keeps the backup as it is and loads the migrated file.
    async with node_context(tmp_path, plugins="") as again:
        assert again.agent_id == V02_AGENT and again.public_key_hex == me.public_key_hex
        assert again.state["sent_messages"]["msg-0123456789ab"]["responses"][0]["response"] == "Ask me."
    assert backup.read_bytes() == original and backup.stat().st_mtime_ns == backup_mtime


async def test_a_02_state_file_without_keys_gets_a_keypair_that_persists(tmp_path):
    state, _, _ = v02_state(with_keys=False)
    (tmp_path / "state.json").write_text(json.dumps(state))
    async with node_context(tmp_path, plugins="") as node:
        assert node.agent_id == V02_AGENT
        generated = (node.state["private_key_hex"], node.public_key_hex)
        assert Identity.from_private_hex(generated[0]).public_key_hex == generated[1]
        assert len(node.connections) == 2
    async with node_context(tmp_path, plugins="") as again:
        assert (again.state["private_key_hex"], again.public_key_hex) == generated
    assert (tmp_path / "state.json.bak-0.2").exists()


async def test_a_02_state_file_with_only_a_private_key_derives_the_public_key(tmp_path):
    state, me, _ = v02_state()
    del state["public_key_hex"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    async with node_context(tmp_path, plugins="") as node:
        assert node.public_key_hex == me.public_key_hex


# --- permissions, location and the lock ------------------------------------------------------------


async def test_state_file_is_0600_in_a_0700_directory_and_wider_modes_are_tightened(tmp_path):
    home = tmp_path / "home"
    env = env_for_tests(home, DARKMATTER_STATE_FILE="")
    config = Config.from_env(env, port=0, plugins="")
    assert config.state_file == home / ".darkmatter" / "state" / "0.json"
    from darkmatter.node import Node

    async with Node(config) as node:
        path = config.state_file
        assert path.exists()
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        token = path.with_name("0.token")
        assert mode(token) == 0o600 and len(token.read_text().strip()) == 64
        agent_id = node.agent_id
    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o755)
    async with Node(config) as node:
        assert node.agent_id == agent_id
        assert mode(path) == 0o600 and mode(path.parent) == 0o700


async def test_a_second_node_on_the_same_state_file_is_refused_by_the_lock(tmp_path):
    async with node_context(tmp_path, plugins="") as first:
        second = make_node(tmp_path, plugins="")
        with pytest.raises(StateLocked) as err:
            await second.start()
        assert err.value.info["agent_id"] == first.agent_id
        assert err.value.info["port"] == first.port and err.value.info["pid"] == os.getpid()
    # Released at stop: the same state starts again.
    async with node_context(tmp_path, plugins="") as again:
        assert again.agent_id == first.agent_id


def test_sent_messages_are_capped_oldest_first_but_never_one_with_outbox_entries():
    state = {"sent_messages": {}, "outbox": [{"message_id": "msg-000000000000"}]}
    for n in range(SENT_CAP + 5):
        state["sent_messages"][f"msg-{n:012x}"] = {"created_at": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}+00:00"}
    evict_sent(state)
    kept = set(state["sent_messages"])
    assert len(kept) == SENT_CAP
    assert "msg-000000000000" in kept  # oldest, but still in the outbox
    assert not {f"msg-{n:012x}" for n in range(1, 6)} & kept  # the next five oldest went
    assert f"msg-{SENT_CAP + 4:012x}" in kept
