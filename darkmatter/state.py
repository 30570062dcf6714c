"""The node's state (docs/protocol.md §11): schema, new identities, 0.2 migration, the state lock.

State is a plain JSON-shaped dict in the 0.2/0.3 schema, so a state file written by an original 0.2
node loads as it is and ours stays readable by humans. The node mutates it on the event loop only; a
storage (see ``storage.py``) persists snapshots.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from darkmatter.identity import Identity, keys_match
from darkmatter.wire import MAX_BIO, MAX_NAME, now_iso, try_normalize

log = logging.getLogger(__name__)

STATE_VERSION = 3
SENT_CAP = 100

GENERIC_BIO = "A DarkMatter mesh agent."

_03_DEFAULTS: dict[str, Any] = {
    "inbox": list,
    "outbox": list,
    "pending_requests": dict,
    "pending_outbound": list,
    "seen_message_ids": dict,
    "notices": list,
    "connections": dict,
    "sent_messages": dict,
    "impressions": dict,
}


class StateError(Exception):
    """The state cannot be used; the message names the files and the way out."""


class StateLocked(Exception):
    """Another process holds the state lock; ``info`` is what it wrote into the lock file."""

    def __init__(self, path: Path, info: dict):
        super().__init__(f"state {path} is in use by another process: {info}")
        self.path = path
        self.info = info


def new_state(identity: Identity | None = None) -> dict[str, Any]:
    identity = identity or Identity.generate()
    state = {
        "state_version": STATE_VERSION,
        "agent_id": identity.public_key_hex,
        "bio": GENERIC_BIO,
        "status": "active",
        "port": None,
        "is_genesis": True,
        "created_at": now_iso(),
        "messages_handled": 0,
        "claimed": False,
        "private_key_hex": identity.private_key_hex,
        "public_key_hex": identity.public_key_hex,
        "display_name": None,
        "last_public_url": None,
    }
    for key, factory in _03_DEFAULTS.items():
        state[key] = factory()
    return state


def check_loaded(raw: Any) -> str | None:
    """Why `raw` is not a usable state, or None."""
    if not isinstance(raw, dict):
        return "the file does not hold a JSON object"
    agent_id = raw.get("agent_id")
    if not isinstance(agent_id, str) or not agent_id:
        return "the required key 'agent_id' is missing"
    priv, pub = raw.get("private_key_hex"), raw.get("public_key_hex")
    if priv is not None and not isinstance(priv, str) or pub is not None and not isinstance(pub, str):
        return "the keys are not strings"
    if priv and pub and not keys_match(priv, pub):
        return "the private key does not match the public key"
    if priv and not pub and not _valid_private(priv):
        return "the private key is not a valid Ed25519 seed"
    for key in ("connections", "sent_messages", "impressions"):
        if key in raw and not isinstance(raw[key], dict):
            return f"'{key}' is not an object"
    return None


def _valid_private(priv: str) -> bool:
    try:
        Identity.from_private_hex(priv)
    except ValueError:
        return False
    return True


def is_02(raw: dict) -> bool:
    return "state_version" not in raw


def migrate(raw: dict) -> dict[str, Any]:
    """Bring a loaded dict (0.2 or 0.3) up to the 0.3 schema in place and return it."""
    priv, pub = raw.get("private_key_hex"), raw.get("public_key_hex")
    if priv and not pub:
        raw["public_key_hex"] = Identity.from_private_hex(priv).public_key_hex
    elif not priv:
        if pub:
            log.warning("state has a public key without its private key; generating a new keypair")
        identity = Identity.generate()
        raw["private_key_hex"], raw["public_key_hex"] = identity.private_key_hex, identity.public_key_hex
    raw["private_key_hex"] = raw["private_key_hex"].lower()
    raw["public_key_hex"] = raw["public_key_hex"].lower()
    for key, factory in _03_DEFAULTS.items():
        if not isinstance(raw.get(key), factory):
            raw[key] = factory()
    raw.setdefault("bio", GENERIC_BIO)
    raw.setdefault("is_genesis", True)
    raw.setdefault("created_at", now_iso())
    raw.setdefault("messages_handled", 0)
    raw.setdefault("claimed", False)
    raw.setdefault("display_name", None)
    raw.setdefault("last_public_url", None)
    for agent_id, conn in list(raw["connections"].items()):
        if not isinstance(conn, dict):
            del raw["connections"][agent_id]
            continue
        migrate_connection(agent_id, conn)
    for message_id, sent in list(raw["sent_messages"].items()):
        if not isinstance(sent, dict):
            del raw["sent_messages"][message_id]
            continue
        migrate_sent(message_id, sent)
    raw["state_version"] = STATE_VERSION
    return raw


def migrate_connection(agent_id: str, conn: dict) -> None:
    conn.setdefault("agent_id", agent_id)
    url = try_normalize(conn.get("agent_url"))
    if url:
        conn["agent_url"] = url
    for key, default in (("agent_bio", ""), ("direction", "outbound"), ("connected_at", now_iso()),
                         ("messages_sent", 0), ("messages_received", 0), ("messages_declined", 0),
                         ("total_response_time_ms", 0), ("last_activity", None),
                         ("agent_public_key_hex", None), ("agent_display_name", None), ("self_url", None),
                         ("protocol_version", None), ("health_failures", 0), ("last_peer_update_ts", None)):
        conn.setdefault(key, default)
    if conn["agent_public_key_hex"]:
        conn["agent_public_key_hex"] = conn["agent_public_key_hex"].lower()


def migrate_sent(message_id: str, sent: dict) -> None:
    sent.setdefault("message_id", message_id)
    for key, default in (("status", "active"), ("initial_hops", 10), ("routed_to", []),
                         ("created_at", now_iso()), ("updates", []), ("response", None),
                         ("metadata", {}), ("webhook", None), ("deliveries", {}), ("content", "")):
        sent.setdefault(key, default)
    if "responses" not in sent:
        old = sent.get("response")
        sent["responses"] = []
        if isinstance(old, dict):
            old = {**old, "verified": False, "after_expiry": False}
            old.setdefault("sent_at", None)
            sent["responses"].append(old)
            sent["response"] = old
    for update in sent["updates"]:
        if isinstance(update, dict):
            update.setdefault("verified", False)
            update.setdefault("sent_at", None)


def apply_overrides(state: dict, *, port: int, display_name: str | None, bio: str | None,
                    genesis: bool | None) -> None:
    """§11.4 Load: port and status are reset; set env values override stored ones."""
    state["port"] = port
    state["status"] = "active"
    if display_name is not None:
        state["display_name"] = display_name[:MAX_NAME]
    if bio is not None:
        state["bio"] = bio[:MAX_BIO]
    if genesis is not None:
        state["is_genesis"] = genesis


def evict_sent(state: dict, cap: int = SENT_CAP) -> list[str]:
    """Keep at most `cap` sent messages, oldest first out, never one with outbox entries; return the ids of
    those removed."""
    sent = state["sent_messages"]
    if len(sent) <= cap:
        return []
    busy = {e.get("message_id") for e in state["outbox"]}
    removed = []
    for message_id in sorted(sent, key=lambda m: sent[m].get("created_at") or ""):
        if len(sent) <= cap:
            break
        if message_id not in busy:
            del sent[message_id]
            removed.append(message_id)
    return removed


def corrupt_copy_name(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return path.with_name(f"{path.name}.corrupt-{stamp}")


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that never follows a symlink at ``path`` and creates files 0600 (§12.3)."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)


def make_private_dir(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700, whatever the umask (§11.1)."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


# --- the state lock (§11.1) ------------------------------------------------------------------


class StateLock:
    """An exclusive ``flock`` on ``<state>.lock`` for the node's lifetime."""

    def __init__(self, state_path: Path):
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            make_private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(f"Cannot create or open the state lock {self.path}: {exc.strerror}. Check that "
                             f"the state directory is writable, or set DARKMATTER_STATE_FILE elsewhere.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(self.path, read_lock_info(self.path)) from None
        self._fd = fd

    def acquire_or_raise_locked(self) -> None:
        """Raise StateLocked when another process holds the lock; otherwise take it and release it at once."""
        self.acquire()
        self.release()

    def write_info(self, info: dict) -> None:
        if self._fd is None:
            return
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def read_lock_info(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
