"""Persistence (docs/protocol.md §1.2 goal 3, §11): kill -9 during heavy writes, two processes on one state file,
a full or read-only disk. Real ``python -m darkmatter run`` subprocesses; the state is read back with the
node's own loader (snapshot plus journal) after every crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid

import httpx
import pytest
from dm_acceptance import NodeProcess, can_mount, figure, free_port, read_only, remount, tmpfs

from darkmatter.builtin.json_storage import JsonFileStorage
from darkmatter.testing import RawPeer, in_ci

pytestmark = pytest.mark.anyio

MSG = "/__darkmatter__/message"
REQ = "/__darkmatter__/connection_request"


class Remote:
    """What RawPeer needs to address a subprocess node."""

    def __init__(self, agent_id: str, port: int):
        self.agent_id = agent_id
        self.port = port


def load(path) -> dict:
    state = JsonFileStorage(path).load()
    assert state is not None
    return state


@pytest.mark.slow
async def test_50_kill9_during_heavy_writes_lose_nothing_acknowledged(tmp_path):
    rounds = int(os.environ.get("DM_KILL_ROUNDS", "50"))
    rng = random.Random(int(os.environ.get("DM_KILL_SEED", "7")))
    proc = NodeProcess(tmp_path, DARKMATTER_RATE_LIMITS="off", DARKMATTER_INBOX_MAX="100000")
    status = await proc.start()
    identity = status["agent_id"]
    private = json.loads(proc.state_file.read_text())["private_key_hex"]
    remote = Remote(identity, proc.port)
    writers = [RawPeer() for _ in range(4)]
    for peer in writers:
        assert (await peer.connect(remote))["auto_accepted"] is True
    acked_messages: set[str] = set()
    acked_peers: dict[str, str] = {}  # agent_id -> "connected" | "pending"
    evictions = 0
    in_flight_at_kill = 0
    started = time.monotonic()
    try:
        for round_ in range(rounds):
            if round_:
                status = await proc.start()
                assert status["agent_id"] == identity
            stop = asyncio.Event()

            async def write_messages(peer: RawPeer, http: httpx.AsyncClient) -> None:
                while not stop.is_set():
                    body = peer.message(remote, f"round {round_} " + "x" * rng.randrange(10, 3000))
                    try:
                        reply = await http.post(proc.url + MSG, json=body)
                    except httpx.TransportError:
                        return
                    if reply.status_code == 200 and reply.json().get("queued"):
                        acked_messages.add(body["message_id"])

            async def write_connections(http: httpx.AsyncClient) -> None:
                while not stop.is_set():  # full-snapshot writes (new connections / pending requests)
                    newcomer = RawPeer(agent_id=str(uuid.uuid4()))
                    try:
                        reply = await http.post(proc.url + REQ, json=newcomer.connection_request())
                    except httpx.TransportError:
                        return
                    if reply.status_code == 200:
                        acked_peers[newcomer.agent_id] = "connected" if reply.json()["auto_accepted"] else "pending"
                    await asyncio.sleep(0.02)

            async with httpx.AsyncClient(trust_env=False, timeout=10,
                                         limits=httpx.Limits(max_connections=16)) as http:
                tasks = [asyncio.create_task(write_messages(p, http)) for p in writers for _ in range(2)]
                tasks.append(asyncio.create_task(write_connections(http)))
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                in_flight_at_kill += sum(1 for t in tasks if not t.done())
                await proc.kill9()
                stop.set()
                await asyncio.gather(*tasks)
            # the snapshot is always a whole JSON document; with the journal it holds everything acknowledged
            raw = json.loads(proc.state_file.read_bytes())
            assert raw["agent_id"] == identity and raw["private_key_hex"] == private
            state = load(proc.state_file)
            assert state["agent_id"] == identity and state["private_key_hex"] == private
            inbox = {m["message_id"] for m in state["inbox"]}
            missing = acked_messages - inbox
            assert not missing, f"round {round_}: {len(missing)} acknowledged message(s) lost"
            assert len(state["inbox"]) == len(inbox), f"round {round_}: a message was stored twice"
            pending = {r["from_agent_id"] for r in state["pending_requests"].values()}
            # A full table makes the oldest probationary connection give way to a newcomer (§13.2): a recorded
            # eviction, not a loss. Checked every round, so the 50 kept notices always cover the round's evictions.
            evicted = {n["agent_id"] for n in state["notices"] if n.get("type") == "evicted"}
            for agent_id, how in list(acked_peers.items()):
                if agent_id in evicted and agent_id not in state["connections"]:
                    del acked_peers[agent_id]
                    evictions += 1
                    continue
                assert agent_id in state["connections"] or agent_id in pending, f"round {round_}: lost {how} peer"
        # and a node started on it serves the same identity with everything in it
        status = await proc.start()
        assert status["agent_id"] == identity
        await proc.stop()
        final = load(proc.state_file)
        assert acked_messages <= {m["message_id"] for m in final["inbox"]}
        figure("kill -9 rounds survived", f"{rounds} rounds in {time.monotonic() - started:.0f} s; "
               f"{len(acked_messages)} acknowledged messages and {len(acked_peers) + evictions} handshakes "
               f"({evictions} later evicted as probationary), none lost; "
               f"{in_flight_at_kill} writers in flight at the kills")
    finally:
        await proc.stop()


async def test_two_processes_on_one_state_file_never_tear_it(tmp_path):
    first = NodeProcess(tmp_path / "a", state_file=tmp_path / "shared.json")
    second = NodeProcess(tmp_path / "b", state_file=tmp_path / "shared.json")
    try:
        identity = (await first.start())["agent_id"]
        remote = Remote(identity, first.port)
        peer = RawPeer()
        await peer.connect(remote)
        assert (await peer.post(remote, MSG, peer.message(remote, "before"))).status_code == 200
        before = (tmp_path / "shared.json").read_bytes()
        second.spawn()
        code = await second.wait_exit(30)
        assert code not in (None, 0), "a second process started on a locked state file"
        assert "Traceback" not in second.log_text()
        assert "in use" in second.log_text() or "lock" in second.log_text().lower()
        assert (tmp_path / "shared.json").read_bytes() == before, "the loser wrote the state"
        # the owner is unaffected
        assert (await peer.post(remote, MSG, peer.message(remote, "after"))).status_code == 200
        await first.stop()
        assert [m["content"] for m in load(tmp_path / "shared.json")["inbox"]] == ["before", "after"]
        # simultaneous starts: exactly one wins, every time
        for round_ in range(3):
            a = NodeProcess(tmp_path / f"ra{round_}", state_file=tmp_path / "shared.json")
            b = NodeProcess(tmp_path / f"rb{round_}", state_file=tmp_path / "shared.json")
            a.spawn()
            b.spawn()
            results = await asyncio.gather(a.wait_ready(30), b.wait_ready(30), return_exceptions=True)
            winners = [p for p, r in zip((a, b), results) if isinstance(r, dict)]
            assert len(winners) == 1, results
            assert results[(a, b).index(winners[0])]["agent_id"] == identity
            loser = b if winners[0] is a else a
            assert await loser.wait_exit(20) not in (None, 0)
            await winners[0].stop()
            assert load(tmp_path / "shared.json")["agent_id"] == identity
    finally:
        for proc in (first, second):
            await proc.stop()


# (under CI=true, which runs as root, these never skip: a failing mount fails the test)
needs_mount = pytest.mark.skipif(not can_mount() and not in_ci(), reason="needs root to mount a small tmpfs")



@needs_mount
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
async def test_a_full_or_read_only_disk_is_a_clear_error_and_nothing_diverges(tmp_path, fault):
    """While the state cannot be written, writes are refused with a clear 503 and nothing is acknowledged
    or kept in memory only; once the disk is back, the same request succeeds and survives a crash."""
    mount = tmp_path / "disk"
    with tmpfs(mount, "4m"):
        proc = NodeProcess(tmp_path / "home", state_file=mount / "state.json")
        try:
            status = await proc.start()
            remote = Remote(status["agent_id"], proc.port)
            peer = RawPeer()
            await peer.connect(remote)
            assert (await peer.post(remote, MSG, peer.message(remote, "before"))).status_code == 200
            filler = mount / "filler"
            with contextlib.ExitStack() as fault_on:
                if fault == "disk full":
                    with open(filler, "wb") as f:
                        with contextlib.suppress(OSError):
                            while True:
                                f.write(b"\0" * 65536)
                                f.flush()
                    fault_on.callback(filler.unlink)
                else:
                    fault_on.enter_context(read_only(mount))
                # (big enough that the write needs new blocks, not just the free end of the journal's last one)
                body = peer.message(remote, "during the fault " + "x" * 60000)
                for attempt in range(2):  # the retry is refused too: nothing was half-accepted
                    reply = await peer.post(remote, MSG, body)
                    assert reply.status_code == 503, (attempt, reply.text)
                    error = reply.json()
                    assert error["code"] == "unavailable" and "save" in error["error"].lower(), error
                    assert "Traceback" not in reply.text and str(mount) not in reply.text
                newcomer = RawPeer()
                refused = await newcomer.post(remote, REQ, newcomer.connection_request())
                assert refused.status_code == 503, refused.text
                async with httpx.AsyncClient(trust_env=False) as http:
                    assert (await http.get(proc.url + "/__darkmatter__/status")).status_code == 200  # reads work
            reply = await peer.post(remote, MSG, body)
            assert reply.status_code == 200 and reply.json().get("queued") is True, reply.text
            assert (await newcomer.post(remote, REQ, newcomer.connection_request())).status_code == 200
            await proc.kill9()
            state = load(mount / "state.json")
            assert [m["content"][:16] for m in state["inbox"]] == ["before", "during the fault"]
            assert newcomer.agent_id in state["connections"]
        finally:
            await proc.stop()


@needs_mount
async def test_writes_acknowledged_around_a_disk_full_spell_survive_a_crash(tmp_path):
    mount = tmp_path / "disk"
    with tmpfs(mount, "4m"):
        proc = NodeProcess(tmp_path / "home", state_file=mount / "state.json")
        try:
            status = await proc.start()
            remote = Remote(status["agent_id"], proc.port)
            peer = RawPeer()
            await peer.connect(remote)
            acked = []

            async def send(text: str) -> None:
                reply = await peer.post(remote, MSG, peer.message(remote, text))
                if reply.status_code == 200:
                    acked.append(text[:12])
            await send("before")
            filler = mount / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            await send("during the fault " + "x" * 60000)
            filler.unlink()
            for i in range(3):
                await send(f"after {i}")
            await proc.kill9()
            assert [m["content"][:12] for m in load(mount / "state.json")["inbox"]] == acked
        finally:
            await proc.stop()


@needs_mount
async def test_starting_on_a_read_only_state_directory_is_a_one_line_error(tmp_path):
    mount = tmp_path / "disk"
    with tmpfs(mount, "1m"):
        proc = NodeProcess(tmp_path / "home", state_file=mount / "state.json", port=free_port())
        await proc.start()
        await proc.stop()
        before = (mount / "state.json").read_bytes()
        remount(mount, "ro")
        proc.spawn()
        code = await proc.wait_exit(30)
        remount(mount, "rw")
        assert code not in (None, 0)
        assert (mount / "state.json").read_bytes() == before
        assert "Traceback" not in proc.log_text(), proc.log_tail()
