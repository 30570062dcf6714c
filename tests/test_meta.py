"""Meta-tests that keep the plugin surface honest (STYLE.md §8): every hook spec is documented in
docs/plugin-hooks.md with its real signature and exercised by a named test; every installed plugin
implements only specified hooks, and no decision hook is ``async``."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import pytest

from darkmatter import hookspecs
from darkmatter.plugins import build_plugin_manager, installed_plugins

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugin-hooks.md"
EXAMPLE = ROOT / "examples" / "trust_routing_plugin"

# Each hook spec -> the tests that exercise it ("file::test_function"). Add the test when adding a hook.
HOOK_TESTS: dict[str, list[str]] = {
    "dm_register_transports": ["tests/test_plugins.py::test_transports_are_ordered_by_priority_and_duplicates_fail",
                               "darkmatter/testing/conformance/test_messages.py::test_a_sent_message_arrives_verified",
                               "plugins/webrtc_transport/tests/test_webrtc_conformance.py::"
                               "test_the_conformance_suite_passes_over_webrtc"],
    "dm_register_discovery": [
        "tests/test_plugins.py::test_discovery_sources_run_when_discovery_is_on_and_feed_the_discovered_table"],
    "dm_register_storage": ["tests/test_plugins.py::test_storage_plugin_is_used_when_selected_by_DARKMATTER_STORAGE"],
    "dm_register_tools": ["tests/test_plugins.py::test_registered_tools_are_collected_with_their_plugin",
                          "tests/test_plugins.py::test_duplicate_tool_name_fails_at_startup_naming_both_plugins"],
    "dm_register_routes": ["tests/test_plugins.py::test_plugin_route_is_served_on_the_node_port",
                           "tests/test_plugins.py::test_duplicate_route_fails_at_startup_naming_both_plugins"],
    "dm_lifespan": ["tests/test_plugins.py::test_lifespan_runs_after_state_load_and_exits_before_the_final_flush"],
    "dm_on_message_received": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_message_forwarded": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_message_responded": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_response_received": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_message_expired": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_connection_changed": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                               "tests/test_nodes.py::test_a_three_node_chain_in_one_process_carries_a_message_and_its_answer"],
    "dm_on_message_seen": ["tests/test_plugins.py::test_event_hooks_are_awaited_and_a_failing_plugin_is_isolated",
                           "tests/test_plugins.py::test_listing_and_reading_the_inbox_emits_dm_on_message_seen_once_per_state"],
    "dm_status_lines": ["tests/test_plugins.py::test_status_lines_from_plugins_are_collected"],
    "dm_trust_connection_request": [
        "tests/test_plugins.py::test_default_trust_policy_accepts_on_genesis_and_queues_otherwise",
        "tests/test_example_plugin.py::test_trust_decisions_of_the_entry_point_plugin_take_effect"],
    "dm_claim_message": [
        "tests/test_plugins.py::test_a_claimed_message_is_answered_and_expired_through_dm_claim_message_never_a_webhook",
        "plugins/a2a_bridge/tests/test_inbound.py::test_a_message_answered_through_mcp_completes_the_task"],
    "dm_rank_forwarding_candidates": [
        "tests/test_plugins.py::test_default_forwarding_rank_is_empty_and_a_plugin_ranking_wins",
        "tests/test_example_plugin.py::test_forwarding_ranking_of_the_entry_point_plugin"],
}


def specs() -> dict[str, inspect.Signature]:
    found = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("dm_"):
            assert hasattr(fn, "darkmatter_spec"), f"{name} in hookspecs.py is not marked @hookspec"
            found[name] = inspect.signature(fn)
    return found


def test_hookspecs_are_found():
    assert len(specs()) >= 15
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("dm_"):
            assert (fn.__doc__ or "").strip(), f"{name} has no docstring"


def documented() -> dict[str, list[str]]:
    text = DOCS.read_text()
    return {m.group(1): [a.strip() for a in m.group(2).split(",") if a.strip()]
            for m in re.finditer(r"^### `(dm_\w+)\(([^)]*)\)`", text, flags=re.M)}


def test_every_hookspec_is_documented_with_its_signature():
    docs = documented()
    for name, signature in specs().items():
        assert name in docs, f"{name} has no section in docs/plugin-hooks.md"
        assert docs[name] == list(signature.parameters), f"{name}: documented arguments differ from the spec"
    assert set(docs) <= set(specs()), f"documented hooks that do not exist: {set(docs) - set(specs())}"


def test_every_doc_section_has_an_example():
    text = DOCS.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for section in sections:
        name = section.split("(", 1)[0].strip("`")
        assert "```python" in section, f"{name}: no example"
        assert "**Returns:**" in section, f"{name}: return value not described"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_hookspec_is_exercised_by_a_named_test():
    assert set(HOOK_TESTS) == set(specs()), "HOOK_TESTS must list exactly the hook specs"
    for hook, tests in HOOK_TESTS.items():
        assert tests, f"{hook}: no test"
        for ref in tests:
            rel, _, function = ref.partition("::")
            path = ROOT / rel
            assert path.exists(), f"{hook}: {rel} does not exist"
            assert function in _test_functions(path), f"{hook}: {ref} does not exist"
            assert hook in path.read_text(), f"{hook}: {rel} never mentions the hook"


@pytest.fixture
def example_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import darkmatter_trust_routing

    yield darkmatter_trust_routing
    sys.modules.pop("darkmatter_trust_routing", None)


def test_all_installed_plugins_implement_only_specified_hooks(example_plugin):
    pm = build_plugin_manager(None, extra=[example_plugin])
    pm.check_pending()
    skipped = set(installed_plugins()) - {i.name for i in pm.darkmatter_info}
    assert not skipped, f"installed plugins that failed to load: {skipped}"


def test_no_decision_hook_is_implemented_as_async(example_plugin):
    pm = build_plugin_manager(None, extra=[example_plugin])
    for name in specs():
        caller = getattr(pm.hook, name)
        if not caller.spec.opts.get("firstresult"):
            continue
        for impl in caller.get_hookimpls():
            assert not inspect.iscoroutinefunction(impl.function), \
                f"{impl.plugin_name} implements the decision hook {name} as async def"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme.split("## Quick start", 1)[1].split("\n## ", 1)[0])
    assert len(commands) == 2, "the quick start gives one install-and-run and one install-and-test command"
    assert "darkmatter run" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    runs = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    # Before it, only the repository's own system-package steps (e.g. Chromium for the browser tests).
    assert runs[-1] == commands[1]
    for step in runs[:-1]:
        assert step.startswith("bash .ci/") and (ROOT / step.split()[1]).is_file(), step
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111


# --- the declared API and the kernel's layers (docs/plugin-hooks.md, STYLE §10) ----------------------------

ALLOWED = ("darkmatter", "darkmatter.api", "darkmatter.testing")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_plugins_import_only_the_declared_api():
    offenders = []
    for path in sorted([*ROOT.glob("plugins/*/**/*.py"), *EXAMPLE.glob("**/*.py")]):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top == "darkmatter" and not (module in ALLOWED or module.startswith("darkmatter.testing.")):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if top.startswith("darkmatter_") and not path.relative_to(ROOT).parts[1] in top.removeprefix("darkmatter_"):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports another plugin ({module})")
    assert offenders == []


def test_the_api_exports_exactly_what_it_declares():
    import darkmatter.api as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == []
    assert len(set(api.__all__)) == len(api.__all__)


def kernel_import_graph() -> dict[str, set[str]]:
    """Edges between darkmatter/ modules, counting imports inside functions (not TYPE_CHECKING ones)."""
    package = ROOT / "darkmatter"
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                and getattr(branch.test, "id", getattr(branch.test, "attr", "")) == "TYPE_CHECKING"
                for stmt in branch.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                target = ".".join(parts)
                if target and target != module and not module.startswith(target + ".") and target != "darkmatter":
                    graph[module].add(target)
    return graph


def test_the_kernel_has_no_import_cycle():
    graph = kernel_import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [module, target]) if target in stack
                              else f"{module} -> {target}")
            elif target not in state:
                visit(target, stack + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_the_mesh_speaks_to_peers_only_through_transports():
    """No HTTP client in the kernel's mesh code: every outbound request goes through a transport."""
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "darkmatter" / "mesh").glob("*.py"))
                 for line, module in imported_modules(path)
                 if module.split(".")[0] in ("httpx", "aiohttp", "urllib3", "requests", "socket", "hypercorn")]
    assert offenders == []
