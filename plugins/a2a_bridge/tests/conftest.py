"""The bridge's tests import their shared harness (``bridge_harness``) from this directory; the fixtures
(``anyio_backend``) come from ``darkmatter.testing``'s pytest plugin."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
