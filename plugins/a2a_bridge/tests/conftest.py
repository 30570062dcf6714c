"""The bridge's tests import their shared harness (``bridge_harness``) from this directory."""

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture
def anyio_backend():
    return "asyncio"
