"""The acceptance suites import their shared harness (``dm_acceptance``) from this directory."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
