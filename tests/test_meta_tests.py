"""Meta-tests that keep the test suite itself honest (issue 20).

* ``tests/security/README.md`` lists exactly the tests of ``tests/security`` and ``tests/reliability``, each in
  the section of its file, and claims an expected failure (xfail) only for a test that carries the marker;
* a test whose prerequisite is missing (root for network namespaces or mounts, node/npm, a headless browser)
  skips on a developer machine but fails under ``CI=true``, and the tests that need one use that helper
  instead of a bare ``pytest.skip``; README.md names them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECURITY_README = ROOT / "tests" / "security" / "README.md"
SUITES = (ROOT / "tests" / "security", ROOT / "tests" / "reliability")
SECTION = re.compile(r"^### .* — `([^`]+\.py)`")
QUALIFIED = re.compile(r"`([\w./-]+\.py)::(test_\w+)`")


def defined_tests(path: Path) -> dict[str, ast.AST]:
    """Every ``test_*`` function of a module (module level or in a class), by name."""
    tree = ast.parse(path.read_text())
    return {node.name: node for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def readme_rows() -> list[tuple[Path, str, list[str]]]:
    """(file of the section, the whole row, the test names in its first cell) for every table row."""
    rows = []
    section: Path | None = None
    for line in SECURITY_README.read_text().splitlines():
        heading = SECTION.match(line)
        if heading:
            name = heading.group(1)
            section = ROOT / name if "/" in name else ROOT / "tests" / "security" / name
            continue
        if line.startswith("## "):
            section = None
        if section is None or not line.startswith("| ") or line.startswith("| Case") or line.startswith("|---"):
            continue
        first_cell = line[2:].split(" | ", 1)[0]
        rows.append((section, line, re.findall(r"`(test_\w+)", first_cell)))
    return rows


def is_xfail(node: ast.AST) -> bool:
    return any("xfail" in ast.unparse(decorator) for decorator in getattr(node, "decorator_list", []))


def test_the_readme_has_a_section_for_every_suite_file():
    sections = {section for section, _, _ in readme_rows()}
    files = {path for suite in SUITES for path in suite.glob("test_*.py")}
    assert files <= sections, f"files without a section in {SECURITY_README.name}: {sorted(map(str, files - sections))}"
    assert all(path.exists() for path in sections), [str(p) for p in sections if not p.exists()]


def test_every_test_named_in_the_security_readme_exists_in_its_file():
    missing = []
    for section, line, names in readme_rows():
        defined = defined_tests(section)
        missing += [f"{section.relative_to(ROOT)}::{name}" for name in names if name not in defined]
        for path, name in QUALIFIED.findall(line):  # references to tests elsewhere, path-qualified
            if name not in defined_tests(ROOT / path):
                missing.append(f"{path}::{name}")
    assert not missing, f"{SECURITY_README.name} names tests that do not exist: {missing}"
    assert sum(len(names) for _, _, names in readme_rows()) > 50  # the parser found the tables


def test_every_security_and_reliability_test_is_named_in_the_readme():
    named: dict[Path, set[str]] = {}
    for section, _, names in readme_rows():
        named.setdefault(section, set()).update(names)
    unnamed = [f"{path.relative_to(ROOT)}::{name}" for suite in SUITES for path in sorted(suite.glob("test_*.py"))
               for name in defined_tests(path) if name not in named.get(path, set())]
    assert not unnamed, f"tests missing from {SECURITY_README.name}: {unnamed}"


def test_expected_failures_in_the_readme_are_exactly_the_xfail_markers():
    claimed = {(section, name) for section, line, names in readme_rows() if "xfail" in line.lower()
               for name in names}
    marked = {(path, name) for suite in SUITES for path in suite.glob("test_*.py")
              for name, node in defined_tests(path).items() if is_xfail(node)}
    assert claimed == marked, {"claimed without a marker": sorted(str(c) for c in claimed - marked),
                               "marked without a claim": sorted(str(m) for m in marked - claimed)}
    has_section = "## Expected failures" in SECURITY_README.read_text()
    assert has_section == bool(marked), "an 'Expected failures' section goes with xfail markers, and only then"


PROBE = '''
from darkmatter.testing import skip_unless_ci

def test_needs_something_missing_here():
    skip_unless_ci("the probe's prerequisite is missing")
'''


@pytest.mark.parametrize("ci,outcome", [("", "1 skipped"), ("true", "1 failed")])
def test_a_missing_prerequisite_skips_here_and_fails_under_ci(tmp_path, ci, outcome):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(probe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in done.stdout, done.stdout[-2000:]
    assert "the probe's prerequisite is missing" in done.stdout
    if ci:
        assert "CI=true" in done.stdout


# Tests that need what CI provides (root for network namespaces and tmpfs mounts, node/npm, a headless
# browser): the file that decides to skip -> the tests README.md must name for it.
NEEDS_ROOT_OR_NPM = {
    "plugins/http_transport/tests/test_upkeep.py": "plugins/http_transport/tests/test_upkeep.py",
    "plugins/webrtc_transport/tests/test_webrtc_netns.py": "plugins/webrtc_transport/tests/test_webrtc_netns.py",
    "plugins/webrtc_transport/tests/test_webrtc_conformance.py":
        "plugins/webrtc_transport/tests/test_webrtc_conformance.py",
    "plugins/discovery_lan/tests/test_lan_netns.py": "plugins/discovery_lan/tests/test_lan_netns.py",
    "tests/reliability/test_persistence.py": "tests/reliability/test_persistence.py",
    "tests/test_mcp_js.py": "tests/test_mcp_js.py",
    "plugins/console/tests/conftest.py": "plugins/console/tests/test_console_browser.py",
}


def test_tests_that_need_root_or_npm_never_skip_silently_in_ci():
    """No bare ``pytest.skip`` in them (``skip_unless_ci`` instead), and a ``skipif`` only with ``in_ci()``;
    every file marked ``netns`` is in the list above (and so in the README's list)."""
    problems = []
    for name in NEEDS_ROOT_OR_NPM:
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called == "pytest.skip":
                    problems.append(f"{name}:{node.lineno}: pytest.skip (use skip_unless_ci)")
                if called == "pytest.mark.skipif" and "in_ci()" not in ast.unparse(node):
                    problems.append(f"{name}:{node.lineno}: skipif without in_ci()")
    assert not problems, problems
    marked = {str(path.relative_to(ROOT)) for base in ("tests", "plugins") for path in (ROOT / base).rglob("test_*.py")
              if ".venv" not in path.parts and path != Path(__file__).resolve()
              and "pytest.mark.netns" in path.read_text()}
    assert marked <= set(NEEDS_ROOT_OR_NPM), sorted(marked - set(NEEDS_ROOT_OR_NPM))


def test_the_readme_says_which_tests_need_root_or_npm():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tests"):text.index("## Benchmarks")]
    for name in NEEDS_ROOT_OR_NPM.values():
        assert name in section, f"README.md's Tests section does not name {name}"
    assert "CI=true" in section
