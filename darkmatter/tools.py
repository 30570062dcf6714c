"""MCP tool objects registered by plugins through ``dm_register_tools``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


class ToolError(Exception):
    """An error the model should read: returned as a tool result with ``isError: true``."""


@dataclass
class Session:
    """Who is calling a tool: ``local`` is true for stdio and loopback HTTP clients (§12.3); ``scope`` names the
    one message a spawned agent's session may act on (§12.6, ``darkmatter.scope``)."""

    local: bool = True
    transport: str = "stdio"
    scope: str | None = None  # the message a spawned agent's session is limited to (§12.6), or None


Handler = Callable[[Any, dict, Session], Awaitable[dict]]


@dataclass
class Tool:
    """One MCP tool.

    ``aliases`` maps another accepted name of an argument to its canonical property (``{"agent_id":
    "ask_agent_id"}``): the original implementation's name, or this node's earlier one. Both names are
    advertised; a canonical property that has an alias is left out of the schema's ``required`` list (a
    caller may use either spelling, and clients reject top-level ``anyOf``/``oneOf``) and :meth:`prepare`
    requires one of them instead, with a readable error.
    """

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
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for alias, canonical in self.aliases.items():
            if canonical not in self.properties or alias in self.properties:
                raise ValueError(f"tool {self.name}: alias {alias!r} must name a new spelling of a property, "
                                 f"got {alias!r} -> {canonical!r}")

    @property
    def input_schema(self) -> dict:
        properties = dict(self.properties)
        for alias, canonical in self.aliases.items():
            others = " or ".join(a for a, c in self.aliases.items() if c == canonical)
            base = dict(self.properties[canonical])
            if canonical in self.required:
                properties[canonical] = dict(base, description=f"{base.get('description', '').rstrip()} "
                                                               f"Required (or give it as {others}).")
            properties[alias] = dict(base, description=f"Alias of {canonical}: give one of them, not both.")
        required = [r for r in self.required if r not in self.aliases.values()]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    def prepare(self, arguments: dict) -> dict:
        """The arguments of a call as the handler reads them, before schema validation.

        Accepts what callers of the original implementation (protocol 0.2, a FastMCP server) send: the
        arguments wrapped in its ``{"params": {...}}`` envelope (also as a JSON string), ``null`` for an
        optional argument it declared ``Optional[...] = None``, and an alias instead of a canonical name.
        Raises :class:`ToolError` when an aliased argument is missing or given twice with different values.
        """
        args = dict(arguments)
        if set(args) == {"params"} and "params" not in self.properties:
            inner = args["params"]
            if isinstance(inner, str):
                try:
                    inner = json.loads(inner)
                except ValueError:
                    inner = None
            if not isinstance(inner, dict):
                raise ToolError(f"Invalid arguments for {self.name}: params must be an object of arguments.")
            args = dict(inner)
        args = {k: v for k, v in args.items() if v is not None or k in self.required}
        for alias, canonical in self.aliases.items():
            if alias not in args:
                continue
            value = args.pop(alias)
            if canonical in args and args[canonical] != value:
                raise ToolError(f"Invalid arguments for {self.name}: {canonical} and its alias {alias} differ; "
                                "give one of them.")
            args[canonical] = value
        for canonical in dict.fromkeys(self.aliases.values()):
            if canonical in self.required and canonical not in args:
                others = " or ".join(repr(a) for a, c in self.aliases.items() if c == canonical)
                raise ToolError(f"Invalid arguments for {self.name}: {canonical!r} is a required property "
                                f"(or give it as {others}).")
        return args

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
