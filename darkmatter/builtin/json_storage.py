"""The JSON state file of PROTOCOL.md §11: atomic writes, 0600, corruption kept aside."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from darkmatter import hookimpl
from darkmatter.state import StateError, check_loaded, corrupt_copy_name, is_02

log = logging.getLogger(__name__)


class JsonFileStorage:
    """One JSON document per node, replaced atomically on every commit."""

    name = "json"

    def __init__(self, path: Path, recovery: str | None = None):
        self.path = Path(path)
        self.recovery = recovery
        self._backup_02 = False

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = directory.stat().st_mode & 0o777
        if mode & 0o077 and directory.name == "state" and directory.parent.name == ".darkmatter":
            log.warning("state directory %s had mode %o; tightening to 0700", directory, mode)
            os.chmod(directory, 0o700)

    def load(self) -> dict[str, Any] | None:
        self._prepare_dir()
        try:
            raw_bytes = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc.strerror}") from None
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("state file %s had mode %o; tightening to 0600", self.path, mode)
            os.chmod(self.path, 0o600)
        try:
            raw = json.loads(raw_bytes.decode("utf-8"))
            problem = check_loaded(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            problem = f"it is not valid JSON ({type(exc).__name__})"
        if problem:
            copy = corrupt_copy_name(self.path)
            shutil.copy2(self.path, copy)
            os.chmod(copy, 0o600)
            if self.recovery == "new-identity":
                log.warning("state file %s is unusable (%s); kept a copy at %s and starting a new identity "
                            "because DARKMATTER_STATE_RECOVERY=new-identity", self.path, problem, copy)
                return None
            raise StateError(
                f"The state file {self.path} is unusable: {problem}. It was left in place and a copy was "
                f"kept at {copy}. Fix or restore the file, or start with a new identity by setting "
                f"DARKMATTER_STATE_RECOVERY=new-identity (the copy is kept).")
        if is_02(raw):
            self._backup_02 = True
        return raw

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        if self._backup_02:
            backup = self.path.with_name(self.path.name + ".bak-0.2")
            if not backup.exists():
                shutil.copy2(self.path, backup)
                os.chmod(backup, 0o600)
            self._backup_02 = False
        tmp = directory / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def commit(self, data: bytes) -> None:
        await asyncio.to_thread(self._write, data)

    def close(self) -> None:
        pass


@hookimpl
def dm_register_storage(register, node):
    register(JsonFileStorage(node.config.state_file, node.config.state_recovery))
