"""The plugin's ``DARKMATTER_A2A_*`` settings, read from the node's config and validated at start.

A bad value is a ``ConfigError`` naming the variable, raised while the node starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from darkmatter.api import Config, ConfigError

INBOUND_MODES = ("local", "on", "off")
MAX_SKILLS = 32


@dataclass
class Skill:
    id: str
    name: str
    description: str
    tags: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


@dataclass
class Settings:
    inbound: str = "local"  # local: loopback and bearer-token callers; on: anyone; off: nobody
    skills: list[Skill] | None = None  # None: one skill made from the bio
    block_seconds: float = 30.0  # how long a blocking SendMessage waits for the answer
    tasks_kept: int = 200  # finished inbound tasks kept in the state (oldest go first)


def _inbound(raw: str | None) -> str:
    value = (raw or "local").strip().lower()
    value = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(value, value)
    if value not in INBOUND_MODES:
        raise ConfigError(f"DARKMATTER_A2A_INBOUND={raw!r} must be local (loopback and token holders), "
                          "on (anyone) or off")
    return value


def _skills(raw: str | None) -> list[Skill] | None:
    if raw is None or not raw.strip():
        return None
    name = "DARKMATTER_A2A_SKILLS"
    try:
        items = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a JSON list of skills, e.g. "
                          '[{"name": "Translate", "description": "French to English"}]') from None
    if not isinstance(items, list) or not items or len(items) > MAX_SKILLS:
        raise ConfigError(f"{name} must be a JSON list of 1 to {MAX_SKILLS} skills")
    skills: list[Skill] = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ConfigError(f"{name}: skill {n + 1} needs a non-empty \"name\" (or is a plain string)")
        text_fields = {k: item.get(k) for k in ("id", "description")}
        if any(v is not None and not isinstance(v, str) for v in text_fields.values()):
            raise ConfigError(f"{name}: skill {n + 1}: \"id\" and \"description\" must be strings")
        lists = {k: item.get(k) or [] for k in ("tags", "examples")}
        if any(not isinstance(v, list) or not all(isinstance(x, str) for x in v) for v in lists.values()):
            raise ConfigError(f"{name}: skill {n + 1}: \"tags\" and \"examples\" must be lists of strings")
        skill_id = text_fields["id"] or "-".join(item["name"].lower().split())[:64]
        skills.append(Skill(id=skill_id, name=item["name"].strip()[:100],
                            description=(text_fields["description"] or item["name"]).strip()[:1000],
                            tags=[t[:64] for t in lists["tags"][:16]],
                            examples=[e[:500] for e in lists["examples"][:8]]))
    if len({s.id for s in skills}) != len(skills):
        raise ConfigError(f"{name}: two skills have the same id")
    return skills


def read(config: Config) -> Settings:
    """Every setting, validated. Raises ConfigError naming the variable."""
    s = Settings()
    s.inbound = _inbound(config.get_str("DARKMATTER_A2A_INBOUND"))
    s.skills = _skills(config.get_str("DARKMATTER_A2A_SKILLS"))
    s.block_seconds = config.get_float("DARKMATTER_A2A_BLOCK_SECONDS", 30.0, minimum=0.1)
    if s.block_seconds > 300:
        raise ConfigError("DARKMATTER_A2A_BLOCK_SECONDS must be at most 300")
    s.tasks_kept = config.get_int("DARKMATTER_A2A_TASKS_KEPT", 200, minimum=10, maximum=10000)
    return s
