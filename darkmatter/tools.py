"""MCP tool objects registered by plugins through ``dm_register_tools``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


class ToolError(Exception):
    """An error the model should read: returned as a tool result with ``isError: true``."""


@dataclass
class Session:
    """Who is calling a tool: ``local`` is true for stdio and loopback HTTP clients (§12.3)."""

    local: bool = True
    transport: str = "stdio"


Handler = Callable[[Any, dict, Session], Awaitable[dict]]


@dataclass
class Tool:
    name: str
    description: str
    handler: Handler
    properties: dict[str, dict] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    open_world: bool = False
    title: str | None = None
    plugin: str | None = None  # filled in by the kernel

    @property
    def input_schema(self) -> dict:
        return {"type": "object", "properties": self.properties, "required": list(self.required),
                "additionalProperties": False}

    @property
    def annotations(self) -> dict:
        return {"title": self.title or self.name, "readOnlyHint": self.read_only,
                "destructiveHint": self.destructive, "idempotentHint": self.idempotent,
                "openWorldHint": self.open_world}


def string(description: str, *, max_length: int | None = None, min_length: int | None = None,
           default: Any = None, enum: list[str] | None = None) -> dict:
    schema: dict[str, Any] = {"type": "string", "description": description}
    if max_length is not None:
        schema["maxLength"] = max_length
    if min_length is not None:
        schema["minLength"] = min_length
    if default is not None:
        schema["default"] = default
    if enum is not None:
        schema["enum"] = enum
    return schema


def integer(description: str, *, minimum: int | None = None, maximum: int | None = None,
            default: int | None = None) -> dict:
    schema: dict[str, Any] = {"type": "integer", "description": description}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if default is not None:
        schema["default"] = default
    return schema


def boolean(description: str, default: bool | None = None) -> dict:
    schema: dict[str, Any] = {"type": "boolean", "description": description}
    if default is not None:
        schema["default"] = default
    return schema


def obj(description: str) -> dict:
    return {"type": "object", "description": description}
