"""The plugin's ``DARKMATTER_AGENT_*`` settings, read from the node's config and validated at start.

A bad value is a :class:`darkmatter.config.ConfigError` naming the variable, raised from the plugin's
``dm_lifespan`` hook, i.e. while the node starts (``darkmatter run`` prints it and exits 2).
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from darkmatter.api import SPAWNED_AGENT_TOOLS, Config, ConfigError

# The MCP server name the spawned agent is given; Claude Code names the tools ``mcp__darkmatter__*``.
MCP_SERVER_NAME = "darkmatter"

# Default permission arguments for Claude Code (`claude -p`): no built-in tools at all (`--tools ""`:
# no shell, no file access, no web), and only the DarkMatter tools a spawned agent needs allowed without a
# prompt (read its message, answer or forward it, see its connections). The node enforces the same scope
# itself through the session token (docs/protocol.md §12.6), whatever this list says.
ALLOWED_TOOLS = ",".join(f"mcp__{MCP_SERVER_NAME}__{name}" for name in SPAWNED_AGENT_TOOLS)
DEFAULT_ARGS = ("--tools", "", "--allowedTools", ALLOWED_TOOLS)

# Set in every spawned agent's environment: the marker makes a node started inside it refuse to spawn
# whatever DARKMATTER_AGENT_ENABLED says there (the recursion guard's second lock).
SPAWNED_MARKER = "DARKMATTER_AGENT_MESSAGE_ID"


@dataclass
class Settings:
    enabled: bool = False
    command: list[str] = field(default_factory=lambda: ["claude"])
    args: list[str] = field(default_factory=lambda: list(DEFAULT_ARGS))
    mcp_config: bool = True
    max_concurrent: int = 2
    max_per_hour: int = 6
    window: float = 3600.0
    timeout: float = 300.0
    kill_grace: float = 5.0
    allow_unverified: bool = False
    max_per_sender: int = 2
    max_from_strangers: int = 3
    cwd: Path = field(default_factory=Path.cwd)
    log_dir: Path | None = None
    log_keep: int = 200
    content_max: int = 8000
    inside_spawned_agent: bool = False


def _split(name: str, raw: str) -> list[str]:
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} cannot be split into arguments ({exc}); "
                          "quote it as a shell would") from None


def _positive(config: Config, name: str, default: float, *, upper: float) -> float:
    value = config.get_float(name, default)
    if not 0 < value <= upper:
        raise ConfigError(f"{name}={config.get_str(name)!r} must be more than 0 and at most {upper:g} seconds")
    return value


def read(config: Config) -> Settings:
    """Every setting, validated. Raises ConfigError naming the variable."""
    s = Settings()
    s.enabled = config.get_bool("DARKMATTER_AGENT_ENABLED", False)
    s.inside_spawned_agent = bool(config.get_str(SPAWNED_MARKER))

    raw_command = config.get_str("DARKMATTER_AGENT_COMMAND") or "claude"
    s.command = _split("DARKMATTER_AGENT_COMMAND", raw_command)
    if not s.command:
        raise ConfigError("DARKMATTER_AGENT_COMMAND is empty; set it to the agent's command (default claude)")

    raw_args = config.get_str("DARKMATTER_AGENT_ARGS")
    if raw_args is not None and raw_args.strip():
        s.args = _split("DARKMATTER_AGENT_ARGS", raw_args)
    s.mcp_config = config.get_bool("DARKMATTER_AGENT_MCP_CONFIG", True)

    s.max_concurrent = config.get_int("DARKMATTER_AGENT_MAX_CONCURRENT", 2, minimum=1, maximum=64)
    s.max_per_hour = config.get_int("DARKMATTER_AGENT_MAX_PER_HOUR", 6, minimum=1, maximum=100000)
    s.window = _positive(config, "DARKMATTER_AGENT_RATE_WINDOW", 3600.0, upper=86400)
    s.timeout = _positive(config, "DARKMATTER_AGENT_TIMEOUT", 300.0, upper=86400)
    s.kill_grace = _positive(config, "DARKMATTER_AGENT_KILL_GRACE", 5.0, upper=600)
    s.allow_unverified = config.get_bool("DARKMATTER_AGENT_ALLOW_UNVERIFIED", False)
    s.max_per_sender = config.get_int("DARKMATTER_AGENT_MAX_PER_SENDER", max(1, s.max_per_hour // 3), minimum=1,
                                      maximum=100000)
    s.max_from_strangers = config.get_int("DARKMATTER_AGENT_MAX_FROM_STRANGERS", max(1, s.max_per_hour // 2),
                                          minimum=1, maximum=100000)
    # NOTE: at most 24000 characters, so that the prompt stays one exec argument (Linux caps one argument at
    # 128 KiB, and a character may take 4 bytes).
    s.content_max = config.get_int("DARKMATTER_AGENT_CONTENT_MAX", 8000, minimum=200, maximum=24000)
    s.log_keep = config.get_int("DARKMATTER_AGENT_LOG_KEEP", 200, minimum=1, maximum=100000)

    raw_cwd = config.get_str("DARKMATTER_AGENT_CWD")
    s.cwd = Path(raw_cwd).expanduser() if raw_cwd is not None and raw_cwd.strip() else Path(os.getcwd())

    raw_logs = config.get_str("DARKMATTER_AGENT_LOG_DIR")
    if raw_logs is not None and raw_logs.strip():
        s.log_dir = Path(raw_logs).expanduser()
    else:
        s.log_dir = Path(config.state_file).expanduser().parent / "logs"
    return s


def check_paths(s: Settings) -> None:
    """The checks that touch the file system (run in a worker thread at start)."""
    if not s.cwd.is_dir():
        raise ConfigError(f"DARKMATTER_AGENT_CWD={str(s.cwd)!r} is not a directory")
    s.cwd = s.cwd.resolve()
    executable = s.command[0]
    found = shutil.which(executable)
    if found is None:
        raise ConfigError(f"DARKMATTER_AGENT_COMMAND: {executable!r} is not an executable file nor found on PATH "
                          "(install the agent, or set DARKMATTER_AGENT_COMMAND)")
    # NOTE: absolute, so that the agent's working directory (DARKMATTER_AGENT_CWD) cannot change what runs.
    s.command[0] = str(Path(found).absolute())
    assert s.log_dir is not None
    try:
        s.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"DARKMATTER_AGENT_LOG_DIR={str(s.log_dir)!r} cannot be created: {exc}") from None
    s.log_dir = s.log_dir.resolve()
