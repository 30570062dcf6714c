"""The reliability suite shares the harness of tests/security (``dm_acceptance``)."""

import sys
from pathlib import Path

HARNESS = str(Path(__file__).resolve().parent.parent / "security")
if HARNESS not in sys.path:
    sys.path.insert(0, HARNESS)
