"""Every DARKMATTER_* setting, read in one place and validated with readable errors.

`Config.from_env(environ, **overrides)` reads the environment; CLI flags arrive as overrides and win.
Plugins read their own settings from `config.env` (the raw mapping) through the helpers below, so
that a bad value is always a `ConfigError` naming the variable, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from darkmatter.wire import ProtocolError, check_url, normalize


class ConfigError(ValueError):
    """A setting has a value we cannot use. The message names the variable and what it accepts."""


_TRUE = {"1", "true", "yes", "on"}
CHANNEL_MODES = ("verified", "all", "off")
_FALSE = {"0", "false", "no", "off"}


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} must be between {minimum} and {maximum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum or value != value or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number of at least {minimum}")
    return value


def parse_ports(text: str, name: str = "DARKMATTER_DISCOVERY_PORTS", limit: int = 256) -> list[int]:
    """Parse `8100-8110,8200` into a sorted list of ports (at most `limit`)."""
    ports: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ConfigError(f"{name}={text!r}: {part!r} is not a port or a lo-hi range of ports") from None
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or hi < lo:
            raise ConfigError(f"{name}={text!r}: {part!r} is not within 1-65535 (lo-hi with lo <= hi)")
        ports.update(range(lo, hi + 1))
        if len(ports) > limit:
            raise ConfigError(f"{name}={text!r} lists more than {limit} ports")
    if not ports:
        raise ConfigError(f"{name}={text!r} lists no ports")
    return sorted(ports)


@dataclass
class Config:
    """The node's settings. Field defaults are docs/protocol.md §13.4's."""

    port: int = 8100
    host: str = "127.0.0.1"
    display_name: str | None = None
    bio: str | None = None
    genesis: bool | None = None  # None = leave stored value (default true for a new identity)
    state_file: Path = Path("~/.darkmatter/state/8100.json")
    state_recovery: str | None = None
    transport: str = "auto"
    discovery: bool = True
    discovery_ports: list[int] = field(default_factory=lambda: list(range(8100, 8111)))
    public_url: str | None = None
    inbox_max: int = 50
    delivery_retry_seconds: float = 600.0
    rate_limits: bool = True
    upnp: bool = True
    bootstrap: bool = True
    plugins: str | None = None  # None = all installed
    disable: tuple[str, ...] = ()
    storage: str = "json"
    channel: str = "verified"  # which inbox arrivals are pushed to MCP sessions (§12.5): verified, all, off
    receipts: bool = True  # send delivery receipts to 0.3 originators (§5.8)
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = dict(os.environ if environ is None else environ)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        port = overrides.pop("port", None)
        if port is None:
            port = env_int(env, "DARKMATTER_PORT", 8100, minimum=0, maximum=65535)
        elif not 0 <= int(port) <= 65535:
            raise ConfigError(f"--port {port} must be between 0 and 65535")
        transport = overrides.pop("transport", None) or env.get("DARKMATTER_TRANSPORT", "auto").strip().lower()
        if transport not in ("auto", "stdio", "http"):
            raise ConfigError(f"DARKMATTER_TRANSPORT={transport!r} must be auto, stdio or http")
        public_url = overrides.pop("public_url", None) or env.get("DARKMATTER_PUBLIC_URL") or None
        if public_url:
            try:
                public_url = normalize(check_url(public_url.strip(), "DARKMATTER_PUBLIC_URL"))
            except ProtocolError as exc:
                raise ConfigError(f"DARKMATTER_PUBLIC_URL={public_url!r}: {exc.error}") from None
        state_raw = overrides.pop("state_file", None) or env.get("DARKMATTER_STATE_FILE") or ""
        if state_raw.strip():
            state_file = Path(state_raw).expanduser()
        else:
            home = Path(env.get("HOME") or Path.home())
            state_file = home / ".darkmatter" / "state" / f"{port}.json"
        recovery = env.get("DARKMATTER_STATE_RECOVERY") or None
        if recovery not in (None, "new-identity"):
            raise ConfigError(f"DARKMATTER_STATE_RECOVERY={recovery!r}: the only value is new-identity")
        genesis_raw = env.get("DARKMATTER_GENESIS")
        genesis = None if genesis_raw in (None, "") else env_bool(env, "DARKMATTER_GENESIS", True)
        rate = env.get("DARKMATTER_RATE_LIMITS", "on").strip().lower()
        if rate not in ("on", "off", "true", "false"):
            raise ConfigError(f"DARKMATTER_RATE_LIMITS={rate!r} must be on or off")
        channel = (env.get("DARKMATTER_CHANNEL") or "verified").strip().lower()
        if channel not in CHANNEL_MODES:
            raise ConfigError(f"DARKMATTER_CHANNEL={channel!r} must be verified, all or off")
        plugins = overrides.pop("plugins", None)
        if plugins is None:
            plugins = env.get("DARKMATTER_PLUGINS")
        disable = tuple(overrides.pop("disable", ()) or ())
        disable += tuple(p.strip() for p in env.get("DARKMATTER_DISABLE_PLUGINS", "").split(",") if p.strip())
        cfg = cls(
            port=int(port),
            host=overrides.pop("host", None) or env.get("DARKMATTER_HOST", "127.0.0.1").strip() or "127.0.0.1",
            display_name=(env.get("DARKMATTER_DISPLAY_NAME") or None),
            bio=(env.get("DARKMATTER_BIO") or None),
            genesis=genesis,
            state_file=state_file,
            state_recovery=recovery,
            transport=transport,
            discovery=env_bool(env, "DARKMATTER_DISCOVERY", True),
            discovery_ports=parse_ports(env.get("DARKMATTER_DISCOVERY_PORTS") or "8100-8110"),
            public_url=public_url,
            inbox_max=env_int(env, "DARKMATTER_INBOX_MAX", 50, minimum=1, maximum=100000),
            delivery_retry_seconds=env_float(env, "DARKMATTER_DELIVERY_RETRY_SECONDS", 600.0),
            rate_limits=rate in ("on", "true"),
            upnp=env_bool(env, "DARKMATTER_UPNP", True),
            bootstrap=env_bool(env, "DARKMATTER_BOOTSTRAP", True),
            plugins=plugins,
            disable=disable,
            storage=(env.get("DARKMATTER_STORAGE") or "json").strip(),
            channel=channel,
            receipts=env_bool(env, "DARKMATTER_RECEIPTS", True),
            env=env,
        )
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise ConfigError(f"unknown setting {key!r}")
            setattr(cfg, key, value)
        return cfg

    # Plugin helpers: read a plugin's own variable from the same environment.
    def get_bool(self, name: str, default: bool) -> bool:
        return env_bool(self.env, name, default)

    def get_int(self, name: str, default: int, **bounds: int) -> int:
        return env_int(self.env, name, default, **bounds)

    def get_float(self, name: str, default: float, minimum: float = 0.0) -> float:
        return env_float(self.env, name, default, minimum=minimum)

    def get_str(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return default if value is None else value
