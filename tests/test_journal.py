"""The append-only journal beside the state file (darkmatter/storage.py)."""

import asyncio
import json

import pytest

from darkmatter.builtin.json_storage import JsonFileStorage
from darkmatter.storage import Persister, replay
from darkmatter.testing import RawPeer, node_context

pytestmark = pytest.mark.anyio


async def test_accepted_messages_are_journaled_not_rewritten_and_survive_a_crash(tmp_path):
    async with node_context(tmp_path / "a") as node:
        peer = RawPeer()
        await peer.connect(node)
        commits_before = node.persister.commits
        for i in range(20):
            response = await peer.post(node, "/__darkmatter__/message", peer.message(node, f"m{i}"))
            assert response.status_code == 200
        assert node.persister.commits == commits_before, "hot path must not rewrite the snapshot"
        assert node.persister.appends >= 1
        # What a crash right now would leave: the snapshot plus the journal, read by a fresh storage.
        loaded = JsonFileStorage(node.config.state_file).load()
        assert [m["content"] for m in loaded["inbox"]] == [f"m{i}" for i in range(20)]
        assert loaded["connections"][peer.agent_id]["messages_received"] == 20
        assert loaded["messages_handled"] == 20
    # a clean stop folds the journal into the snapshot
    assert (tmp_path / "a" / "state.json.journal").read_bytes() == b""
    assert len(json.loads((tmp_path / "a" / "state.json").read_text())["inbox"]) == 20


def test_replay_skips_records_the_snapshot_already_holds_and_stops_at_a_torn_line():
    state = {"journal_seq": 2, "inbox": [{"id": 1}, {"id": 2}], "n": 2}
    journal = b"\n".join([
        json.dumps({"seq": 1, "ops": [["append", ["inbox"], {"id": 1}]]}).encode(),
        json.dumps({"seq": 2, "ops": [["append", ["inbox"], {"id": 2}]]}).encode(),
        json.dumps({"seq": 3, "ops": [["append", ["inbox"], {"id": 3}], ["set", ["n"], 3]]}).encode(),
        b'{"seq": 4, "ops": [["append", ["inbox"], {"id"',
    ])
    assert replay(state, journal) == 1
    assert [m["id"] for m in state["inbox"]] == [1, 2, 3]
    assert state["n"] == 3 and state["journal_seq"] == 3


async def test_webhook_updates_and_responses_are_journaled_and_survive_a_crash(tmp_path):
    from darkmatter.mesh import outbound as actions
    from darkmatter.testing import mesh

    async with mesh(tmp_path, 3) as (a, b, c):
        mid = (await actions.send_message(a, "question", b.agent_id))["message_id"]
        await actions.forward_message(b, mid, c.agent_id, note="ask C")
        commits_before = a.persister.commits
        await actions.respond_message(c, mid, "answer")
        sent = a.state["sent_messages"][mid]
        assert sent["status"] == "responded" and sent["updates"]
        assert a.persister.commits == commits_before, "recording a response must not rewrite the snapshot"
        loaded = JsonFileStorage(a.config.state_file).load()  # what a crash right now would leave
        record = loaded["sent_messages"][mid]
        assert record["status"] == "responded"
        assert [r["response"] for r in record["responses"]] == ["answer"]
        assert record["response"]["agent_id"] == c.agent_id and record["response"]["verified"] is True
        assert [(u["type"], u["agent_id"]) for u in record["updates"]] == [("forwarded", b.agent_id)]


def _comparable(state: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in state.items() if k != "journal_seq"}))


async def test_outbound_steps_are_journaled_and_replay_to_the_live_state(tmp_path):
    """Sending, forwarding, responding, reading and every delivery's bookkeeping append journal records: no
    snapshot is rewritten, and what a crash would leave (snapshot + journal) is the live state."""
    from darkmatter.builtin import core_tools
    from darkmatter.mesh import outbound as actions
    from darkmatter.testing import mesh

    async with mesh(tmp_path, 3) as nodes:
        a, b, c = nodes
        for node in nodes:
            await node.persister.drain()
        commits = [node.persister.commits for node in nodes]
        for i in range(3):
            sent = await actions.send_message(a, f"question {i}", b.agent_id)
            mid = sent["message_id"]
            assert sent["deliveries"][b.agent_id]["state"] == "delivered"
            await core_tools.get_message(b, {"message_id": mid}, None)  # read: a receipt goes back to A
            forwarded = await actions.forward_message(b, mid, c.agent_id, note="ask C")
            assert forwarded["delivery"] == "delivered"
            answered = await actions.respond_message(c, mid, "answer")
            assert answered["delivery"] == "delivered"
        broadcast = await actions.send_message(a, "to everyone")  # A's only connection is B
        assert broadcast["deliveries"][b.agent_id]["state"] == "delivered"
        expired = await actions.expire_message(a, broadcast["message_id"])
        assert expired["status"] == "expired"
        for _ in range(200):  # the forwarded updates and receipts are delivered in the background
            if not any(node.state["outbox"] for node in nodes):
                break
            await asyncio.sleep(0.02)
        assert not any(node.state["outbox"] for node in nodes)
        for node in nodes:
            await node.persister.drain()
        assert [node.persister.commits for node in nodes] == commits, "an outbound step rewrote a snapshot"
        for node in nodes:
            loaded = JsonFileStorage(node.config.state_file).load()  # what a crash right now would leave
            assert _comparable(loaded) == _comparable(node.state)
        record = a.state["sent_messages"][mid]
        assert record["status"] == "responded" and record["routed_to"] == [b.agent_id]
        assert [u["type"] for u in record["updates"]] == ["forwarded"]
        assert {r["state"] for r in record.get("receipts", [])} >= {"read"}
        held = next(m for m in b.state["inbox"] if m["message_id"] == mid)
        assert held["forwarded_to"] == [c.agent_id] and held["read_at"]
        assert not c.state["inbox"]


def test_selector_paths_replay_onto_list_items():
    state = {"journal_seq": 0, "outbox": [{"id": "o1", "n": 0}, {"id": "o2", "n": 0}],
             "inbox": [{"message_id": "m1", "forwarded_to": []}]}
    records = [
        {"seq": 1, "ops": [["set", ["outbox", {"id": "o2"}, "n"], 5], ["del", ["outbox", {"id": "o1"}]]]},
        {"seq": 2, "ops": [["append", ["inbox", {"message_id": "m1"}, "forwarded_to"], "x"],
                           ["set", ["outbox", {"id": "o2"}], {"id": "o2", "n": 7}]]},
        {"seq": 3, "ops": [["set", ["inbox", {"message_id": "gone"}, "read_at"], "t"],
                           ["del", ["outbox", {"id": "o1"}]]]},
    ]
    journal = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    assert replay(state, journal) == 3
    assert state["outbox"] == [{"id": "o2", "n": 7}]
    assert state["inbox"] == [{"message_id": "m1", "forwarded_to": ["x"]}]


async def test_appends_run_on_the_loop_only_while_the_disk_has_been_fast_and_stay_durable(tmp_path):
    """A small append that one save waits for, whose measured average is under ``inline_below``, runs on the
    event loop (no thread hand-off); the first append, an append that several saves wait for (a group commit:
    the loop has other work), one nobody waits for, and every append while the average is over the bound go
    to the writer thread. Either way each record is on disk when append returns, in order."""
    storage = JsonFileStorage(tmp_path / "state.json")
    await storage.commit(json.dumps({"agent_id": "a" * 64, "journal_seq": 0}).encode())
    records = [json.dumps({"seq": i, "ops": [["set", ["n"], i]]}).encode() + b"\n" for i in range(1, 8)]
    try:
        storage.inline_below = 3600.0  # any measured disk counts as fast
        await storage.append(records[0])
        assert storage.inline_appends == 0  # not measured yet: the thread
        await storage.append(records[1])
        await storage.append(records[2] + records[3], waiters=1)  # one save, a deferred change riding along
        assert storage.inline_appends == 2
        assert storage.journal_path.read_bytes() == b"".join(records[:4])
        await storage.append(records[4], waiters=3)  # a group commit: the thread
        await storage.append(records[5], waiters=0)  # nobody waits: the thread
        assert storage.inline_appends == 2
        assert storage.journal_path.read_bytes() == b"".join(records[:6])
        storage.inline_below = 0.0  # no disk is that fast: back to the thread
        await storage.append(records[6])
        assert storage.inline_appends == 2
    finally:
        storage.close()
    loaded = JsonFileStorage(tmp_path / "state.json").load()
    assert loaded["n"] == 7 and loaded["journal_seq"] == 7


async def persisted_counter(storage):
    """A state with a counter ``n`` over ``storage``, its Persister, and ``save(n)``: set n, await its save."""
    state = {"agent_id": "a" * 64, "n": 0}
    persister = Persister(storage, lambda: state)
    await persister.flush()

    async def save(n: int) -> None:
        state["n"] = n
        await persister.save([("set", ["n"], n)])
    return state, persister, save


async def test_the_persister_tells_the_storage_how_many_saves_wait_for_an_append(tmp_path):
    """One request's save with deferred changes riding along is appended on the event loop (one save waits);
    saves of requests served side by side are group committed on the writer thread (several wait)."""
    storage = JsonFileStorage(tmp_path / "state.json")
    storage.inline_below = 3600.0  # any measured disk counts as fast
    state, persister, save = await persisted_counter(storage)
    try:
        await save(1)  # the first append measures the disk (thread)
        inline = storage.inline_appends
        state["read"] = True
        persister.mark([("set", ["read"], True)], within=60.0)  # a read mark: rides on the next write
        await save(2)
        assert storage.inline_appends == inline + 1, "one save with a change riding along went to the thread"
        assert storage.journal_path.read_bytes().count(b"\n") == 3
        appends = persister.appends
        await asyncio.gather(save(3), save(4), save(5))
        assert persister.appends == appends + 1  # one group commit ...
        assert storage.inline_appends == inline + 1, "a group commit of three saves held the event loop"
    finally:
        storage.close()
    loaded = JsonFileStorage(tmp_path / "state.json").load()
    assert loaded["n"] == 5 and loaded["read"] is True


async def test_records_the_loop_already_has_ready_join_the_group_commit(tmp_path):
    """When more than one record waits for the disk, the writer first lets the callbacks the event loop already
    has ready run (no timer), while they keep adding records: they go in the same append instead of the next."""
    storage = JsonFileStorage(tmp_path / "state.json")
    state = {"agent_id": "a" * 64, "n": 0}
    persister = Persister(storage, lambda: state)
    await persister.flush()
    appends_before = persister.appends

    last = asyncio.Event()

    def change(n: int, then=None) -> None:
        state["n"] = n
        persister.mark([("set", ["n"], n)])
        if then is not None:
            asyncio.get_running_loop().call_soon(then)
        if n == 5:
            last.set()

    try:
        change(1)
        change(2)  # two records before the writer runs: it gathers
        asyncio.get_running_loop().call_soon(change, 3, lambda: change(4, lambda: change(5)))
        await last.wait()
        await persister.drain()  # every record marked so far is on disk
        assert persister.appends - appends_before == 1, "records ready on the loop waited for another fsync"
        assert storage.journal_path.read_bytes().count(b"\n") == 5
    finally:
        storage.close()
    loaded = JsonFileStorage(tmp_path / "state.json").load()
    assert loaded["n"] == 5


class PlainJournal:
    """A journaling storage written against the protocol before ``append`` took ``waiters``."""
    name = "plain"

    def __init__(self):
        self.snapshot: bytes | None = None
        self.journal = b""

    def load(self):
        return None

    async def commit(self, data: bytes) -> None:
        self.snapshot, self.journal = data, b""

    async def append(self, records: bytes) -> None:
        self.journal += records

    def close(self) -> None:
        pass


async def test_a_storage_whose_append_takes_no_hint_is_called_without_it():
    storage = PlainJournal()
    state, persister, save = await persisted_counter(storage)
    await save(1)
    await asyncio.gather(save(2), save(3))
    assert persister.error is None and persister.appends == 2
    replayed = json.loads(storage.snapshot)
    replay(replayed, storage.journal)
    assert replayed["n"] == 3
