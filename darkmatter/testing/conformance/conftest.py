import pytest


@pytest.fixture
def anyio_backend():
    # NOTE: conftest fixtures beat plugin fixtures; anyio's own plugin would otherwise add trio runs when trio
    # is installed, and which of two plugins' fixtures wins is not defined.
    return "asyncio"
