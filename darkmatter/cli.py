"""The ``darkmatter`` command: run a node, list plugins, ask a running node for its status, and steer it
(the commands of :mod:`darkmatter.commands`).

Settings come from ``DARKMATTER_*`` variables (see :mod:`darkmatter.config`); flags override them.
Expected failures (bad settings, plugin selection, a state file that cannot be used, a port in use)
print one line on stderr and exit non-zero (2 for bad settings or plugin selection, 1 for start-up
and state problems); they never show a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any, Iterator

import click

from darkmatter import PROTOCOL_VERSION, __version__
from darkmatter.config import ConfigError, Config
from darkmatter.control import no_node_answers
from darkmatter.plugins import PluginError
from darkmatter.state import StateError, StateLocked

# Exit codes: 2 = the settings or plugin selection are wrong (as click's usage errors), 1 = the node
# could not start or a running node could not be reached.
EXIT_USAGE = 2
EXIT_FAILURE = 1

_LEVELS = ("debug", "info", "warning", "error")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> None:
    click.echo(f"darkmatter: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _expected(exc: BaseException) -> tuple[BaseException, int] | None:
    """The expected failure inside ``exc`` (also inside exception groups) and its exit code."""
    from darkmatter.node import StartupError

    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _expected(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, (ConfigError, PluginError)):
        return exc, EXIT_USAGE
    if isinstance(exc, (StartupError, StateError, StateLocked)):
        return exc, EXIT_FAILURE
    return None


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn the kernel's expected failures into one line on stderr and an exit code."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - filtered just below
        found = _expected(exc)
        if found is None:
            raise
        inner, code = found
        if isinstance(inner, StateLocked):
            info = inner.info or {}
            where = f" (pid {info.get('pid')}, port {info.get('port')})" if info.get("pid") else ""
            _fail(f"the state file is in use by another DarkMatter process{where}; lock: {inner.path}", code)
        _fail(str(inner), code)


def _setup_logging(level: str) -> None:
    # NOTE: stderr only; stdout carries MCP in stdio mode.
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _log_level(option: str | None) -> str:
    raw = option if option is not None else os.environ.get("DARKMATTER_LOG_LEVEL", "info")
    level = raw.strip().lower() or "info"
    if level not in _LEVELS:
        raise ConfigError(f"DARKMATTER_LOG_LEVEL={raw!r} must be one of {', '.join(_LEVELS)}")
    return level


def _split_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--disable a --disable b,c`` -> ("a", "b", "c")."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="darkmatter",
                      message=f"%(prog)s %(version)s (protocol {PROTOCOL_VERSION})")
def cli() -> None:
    """DarkMatter: a node of the agent mesh.

    Settings are read from DARKMATTER_* environment variables; command-line flags override them.
    """


@cli.command()
@click.option("--port", type=int, help="Port for the mesh and /mcp (DARKMATTER_PORT, default 8100; 0 = any free port).")
@click.option("--host", help="Address to bind (DARKMATTER_HOST, default 127.0.0.1).")
@click.option("--plugins", "plugins", metavar="A,B",
              help='Plugins to load (DARKMATTER_PLUGINS; unset = every installed plugin, "" = none).')
@click.option("--disable", multiple=True, metavar="NAME",
              help="Plugin not to load; repeatable (adds to DARKMATTER_DISABLE_PLUGINS).")
@click.option("--transport", type=click.Choice(["stdio", "http", "auto"]),
              help="MCP over stdio and HTTP, HTTP only, or auto: stdio when stdin is not a terminal "
                   "(DARKMATTER_TRANSPORT).")
@click.option("--state-file", help="State file (DARKMATTER_STATE_FILE, default ~/.darkmatter/state/<port>.json).")
@click.option("--public-url", help="The node's public base URL (DARKMATTER_PUBLIC_URL).")
@click.option("--log-level", type=click.Choice(_LEVELS, case_sensitive=False),
              help="Log level on stderr (DARKMATTER_LOG_LEVEL, default info).")
def run(port: int | None, host: str | None, plugins: str | None, disable: tuple[str, ...],
        transport: str | None, state_file: str | None, public_url: str | None, log_level: str | None) -> None:
    """Run a node: the mesh API and /mcp on its port, and MCP over stdio when launched by an MCP client."""
    with friendly_errors():
        _setup_logging(_log_level(log_level))
        config = Config.from_env(os.environ, port=port, host=host, plugins=plugins,
                                 disable=_split_names(disable), transport=transport, state_file=state_file,
                                 public_url=public_url)
        from darkmatter import runner

        code = asyncio.run(runner.run(config))
    sys.exit(code)


def _plugin_table(selection: str | None, disable: tuple[str, ...]) -> list[dict[str, Any]]:
    """Build (but do not start) a node and describe every plugin it would load."""
    from darkmatter.node import Node

    config = Config.from_env(os.environ, plugins=selection, disable=disable)
    node = Node(config)
    route_owners: dict[tuple[str, str], str] = getattr(node, "route_owners", {})
    rows = []
    for info in node.pm.darkmatter_info:  # type: ignore[attr-defined]
        tools = sorted(name for name, tool in node.tools.items() if tool.plugin == info.name)
        # HEAD is implied by GET (Starlette adds it); list it only when registered on its own.
        routes = sorted(f"{method} {path}" for (method, path), owner in route_owners.items()
                        if owner == info.name and not (method == "HEAD" and ("GET", path) in route_owners))
        rows.append({"name": info.name, "version": info.version or (__version__ if info.builtin else None),
                     "builtin": info.builtin, "module": info.module, "hooks": list(info.hooks),
                     "tools": tools, "routes": routes})
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--plugins", "plugins", metavar="A,B", help="Show this selection instead of DARKMATTER_PLUGINS.")
@click.option("--disable", multiple=True, metavar="NAME", help="Leave this plugin out; repeatable.")
def plugins(as_json: bool, plugins: str | None, disable: tuple[str, ...]) -> None:
    """List the plugins a node would load: name, version, hooks, tools and routes."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with friendly_errors():
        rows = _plugin_table(plugins, _split_names(disable))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        kind = "built-in" if row["builtin"] else "plugin"
        click.echo(f"{row['name']} {row['version'] or '?'} ({kind}, {row['module']})")
        click.echo(f"  hooks:  {', '.join(row['hooks']) or '-'}")
        click.echo(f"  tools:  {', '.join(row['tools']) or '-'}")
        click.echo(f"  routes: {', '.join(row['routes']) or '-'}")


STATUS_PATH = "/__darkmatter__/status"


@cli.command()
@click.option("--port", type=int, help="Port of the running node (DARKMATTER_PORT, default 8100).")
@click.option("--json", "as_json", is_flag=True, help="Print the node's JSON answer as it is.")
def status(port: int | None, as_json: bool) -> None:
    """Ask the node running on this machine at PORT for its status."""
    import httpx

    with friendly_errors():
        port = Config.from_env(os.environ, port=port).port
    url = f"http://127.0.0.1:{port}{STATUS_PATH}"
    try:
        with httpx.Client(trust_env=False, timeout=5.0, follow_redirects=False) as http:
            reply = http.get(url)
    except httpx.TransportError as exc:
        _fail(no_node_answers(port, exc), EXIT_FAILURE)
    try:
        body = reply.json()
    except ValueError:
        body = None
    if reply.status_code != 200 or not isinstance(body, dict) or "agent_id" not in body:
        _fail(f"the service on 127.0.0.1:{port} is not a DarkMatter node: GET {STATUS_PATH} answered "
              f"HTTP {reply.status_code}", EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    for key in ("agent_id", "display_name", "status", "is_genesis", "num_connections", "accepting_connections",
                "protocol_version", "bio", "public_key_hex"):
        if key in body:
            click.echo(f"{key}: {body[key]}")


@cli.group()
def identity() -> None:
    """Back up and restore the agent's identity (its Ed25519 key), on this machine only.

    The private key is never shown by a tool or an HTTP reply (docs/protocol.md §12.3); these commands keep it
    in a private file (mode 0600) instead.
    """


@identity.command("backup")
@click.option("--state-file", help="State file (DARKMATTER_STATE_FILE, default ~/.darkmatter/state/<port>.json).")
@click.option("--port", type=int, help="Port whose default state file to use (DARKMATTER_PORT).")
@click.option("--out", "out", help="Backup file (DARKMATTER_IDENTITY_BACKUP, default beside the state file).")
def identity_backup(state_file: str | None, port: int | None, out: str | None) -> None:
    """Write the identity backup file once (0600) and print its path."""
    from darkmatter.backup import backup_path, identity_of_state, write_backup

    with friendly_errors():
        config = Config.from_env(os.environ, port=port, state_file=state_file)
        target = backup_path(config.state_file, {"DARKMATTER_IDENTITY_BACKUP": out} if out else config.env)
        who = identity_of_state(config.state_file)
        created = write_backup(target, who)
    click.echo(f"{'wrote' if created else 'already there:'} {target} (agent {who.public_key_hex}; mode 0600, "
               "keep a copy somewhere safe)")


@identity.command("restore")
@click.argument("backup_file")
@click.option("--state-file", help="State file (DARKMATTER_STATE_FILE, default ~/.darkmatter/state/<port>.json).")
@click.option("--port", type=int, help="Port whose default state file to use (DARKMATTER_PORT).")
@click.option("--replace", is_flag=True, help="Replace a state file of another agent (a copy of it is kept).")
def identity_restore(backup_file: str, state_file: str | None, port: int | None, replace: bool) -> None:
    """Make the state file hold the identity in BACKUP_FILE (stop the node first)."""
    from darkmatter.backup import restore

    with friendly_errors():
        config = Config.from_env(os.environ, port=port, state_file=state_file)
        try:
            message = restore(config.state_file, backup_file, replace=replace)
        except FileNotFoundError:
            _fail(f"no identity backup at {backup_file}", EXIT_FAILURE)
    click.echo(message)


def _add_node_commands() -> None:
    from darkmatter.commands import add_commands

    add_commands(cli)


_add_node_commands()  # connect, peers, pending, accept, reject, send, inbox, respond, forward, sent, ui


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a usage error is one ``darkmatter: error:`` line too (exit 2), like every other failure."""
    try:
        code = cli.main(args=argv, prog_name="darkmatter", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `darkmatter`: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "darkmatter"
        _fail(f"{exc.format_message().rstrip('.')} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
