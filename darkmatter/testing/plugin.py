"""The DarkMatter pytest plugin (entry point ``pytest11``): fixtures every DarkMatter test suite shares.

* ``anyio_backend``: ``asyncio`` (the node runs on asyncio). Where anyio's own plugin is also installed with
  trio, which of the two fixtures wins is not defined: define ``anyio_backend`` in your conftest too.
* ``dm_transport``: the transport under test; tests that use it (or ``dm``) run once per transport named by
  ``--dm-transport`` (comma-separated; default ``memory,http``).
* ``dm``: a :class:`darkmatter.testing.harness.Harness` over ``dm_transport``, its nodes stopped afterwards.
* ``wait_for``: ``await wait_for(predicate, timeout=10)`` polls until the predicate holds.

The conformance suite is ``pytest --pyargs darkmatter.testing.conformance --dm-transport=memory``.
"""

from __future__ import annotations

import pytest

from darkmatter.testing.harness import TRANSPORTS, Harness, wait_for as _wait_for

DEFAULT_TRANSPORTS = "memory,http"


def pytest_addoption(parser):
    group = parser.getgroup("darkmatter")
    group.addoption("--dm-transport", default=None, metavar="NAMES",
                    help=f"transports the DarkMatter conformance cases run over, comma-separated "
                         f"({', '.join(TRANSPORTS)}; default {DEFAULT_TRANSPORTS})")


def selected_transports(config) -> list[str]:
    raw = config.getoption("--dm-transport") or DEFAULT_TRANSPORTS
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown or not names:
        raise pytest.UsageError(f"--dm-transport: unknown transport {', '.join(unknown) or raw!r} "
                                f"(known: {', '.join(TRANSPORTS)})")
    return names


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: a case of the DarkMatter transport conformance suite")
    selected_transports(config)


def pytest_generate_tests(metafunc):
    if "dm_transport" in metafunc.fixturenames:
        metafunc.parametrize("dm_transport", selected_transports(metafunc.config))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def dm(tmp_path, dm_transport):
    async with Harness(tmp_path, dm_transport) as harness:
        yield harness


@pytest.fixture
def wait_for():
    return _wait_for
