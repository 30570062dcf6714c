"""The compatibility suites import the 0.2 stand-in (``legacy02``) and the tool contract from this directory."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
