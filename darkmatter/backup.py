"""The identity backup (docs/protocol.md §12.3): the owner keeps a copy of the agent's key in a 0600 file, and
restores it on the command line. The private key itself never appears in a tool result, a reply or a log.

``darkmatter_authenticate`` (no arguments) and ``darkmatter identity backup`` write the file once;
``darkmatter identity restore FILE`` makes a state file of that identity (the node must be stopped).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from darkmatter.identity import Identity
from darkmatter.state import StateError, make_private_dir, open_private
from darkmatter.wire import now_iso

FORMAT = "darkmatter-identity-backup"


class BackupError(StateError):
    """A backup that cannot be written or read; the message says why in one line."""


def backup_path(state_file: Path | str, env: dict | None = None) -> Path:
    """``DARKMATTER_IDENTITY_BACKUP``, else ``<state file minus .json>.identity-backup.json`` beside it."""
    given = (env or {}).get("DARKMATTER_IDENTITY_BACKUP") or ""
    if given.strip():
        return Path(given).expanduser()
    state = Path(state_file).expanduser()
    return state.with_name(state.name.removesuffix(".json") + ".identity-backup.json")


def read_private_json(path: Path) -> Any:
    fd = open_private(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read(1 << 20).decode("utf-8"))


def identity_of_state(state_file: Path) -> Identity:
    """The identity held by a state file (its snapshot: the keys never change after creation)."""
    try:
        raw = read_private_json(Path(state_file).expanduser())
        return Identity.from_private_hex(raw["private_key_hex"])
    except FileNotFoundError:
        raise BackupError(f"no state file at {state_file}: start the node once, or name it with "
                          "--state-file / DARKMATTER_STATE_FILE") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"cannot read the identity from {state_file} ({type(exc).__name__})") from None


def write_backup(path: Path, identity: Identity) -> bool:
    """Write the backup once (0600, never through a symlink). Returns True when it was created now, False when
    it already holds this identity; raises BackupError when it holds another one or cannot be written."""
    path = Path(path)
    try:
        existing = read_backup(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if existing.public_key_hex != identity.public_key_hex:
            raise BackupError(f"{path} already holds the backup of another identity; move it away first")
        return False
    data = json.dumps({"format": FORMAT, "agent_id": identity.public_key_hex,
                       "public_key_hex": identity.public_key_hex, "private_key_hex": identity.private_key_hex,
                       "created_at": now_iso()}, indent=2).encode() + b"\n"
    try:
        make_private_dir(path.parent)
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return write_backup(path, identity) if path.is_file() else _refuse(path)
    except OSError as exc:
        raise BackupError(f"cannot write the identity backup {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _refuse(path: Path) -> bool:
    raise BackupError(f"{path} exists and is not a regular file; refusing to write the identity backup there")


def read_backup(path: Path) -> Identity:
    """The identity in a backup file; FileNotFoundError when there is none, BackupError when it is unusable."""
    try:
        raw = read_private_json(Path(path))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BackupError(f"cannot read the identity backup {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise BackupError(f"{path} is not an identity backup (not JSON)") from None
    try:
        identity = Identity.from_private_hex(raw["private_key_hex"])
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"{path} is not an identity backup (no valid private_key_hex)") from None
    if raw.get("public_key_hex") not in (None, identity.public_key_hex):
        raise BackupError(f"{path} is damaged: its private and public keys do not match")
    return identity


def restore(state_file: Path, backup: Path, *, replace: bool = False) -> str:
    """Make ``state_file`` hold the identity of ``backup``; the node must not be running (the state lock).

    No state file: a fresh state of that identity. The same identity: nothing to do. Another identity: refused,
    unless ``replace``, which keeps the old file as ``<state>.replaced-<UTC time>`` first."""
    from darkmatter.builtin.json_storage import JsonFileStorage, _write_private
    from darkmatter.state import StateLock, new_state

    identity = read_backup(Path(backup))
    state_file = Path(state_file).expanduser()
    lock = StateLock(state_file)
    lock.acquire()  # StateLocked while a node runs on this state
    try:
        try:
            current = identity_of_state(state_file)
        except BackupError:
            if state_file.exists():
                if not replace:
                    raise BackupError(f"{state_file} exists but holds no readable identity; pass --replace to "
                                      "replace it (a copy is kept)") from None
                current = None
            else:
                current = None
        if current is not None and current.public_key_hex == identity.public_key_hex:
            return f"{state_file} already holds agent {identity.public_key_hex[:16]}…; nothing to restore"
        if state_file.exists():
            if not replace:
                raise BackupError(f"{state_file} holds another agent ({current.public_key_hex[:16]}…); pass "
                                  "--replace to replace it (a copy of the old file is kept)")
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            copy = state_file.with_name(f"{state_file.name}.replaced-{stamp}")
            _write_private(copy, state_file.read_bytes())
            journal = state_file.with_name(state_file.name + ".journal")
            if journal.exists():
                _write_private(copy.with_name(copy.name + ".journal"), journal.read_bytes())
        storage = JsonFileStorage(state_file)
        storage._prepare_dir()
        storage._write(json.dumps(new_state(identity)).encode("utf-8"))
        journal = state_file.with_name(state_file.name + ".journal")
        if journal.exists():
            journal.unlink()  # its records belong to the replaced state
        return f"restored agent {identity.public_key_hex[:16]}… into {state_file}"
    finally:
        lock.release()
