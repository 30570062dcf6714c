"""The kernel's conformance suite, re-run with messages on WebRTC data channels.

``pytest --pyargs darkmatter.testing.conformance --dm-transport=webrtc`` runs inside a network namespace
this test creates, whose ``lo`` also carries 127.0.0.2 (aiortc never offers 127.0.0.1 as a candidate):
every connection the cases make is upgraded to a data channel, so every message and forward travels on
it (one case checks the inbox entry says ``webrtc``): the transport registered through
``dm_register_transports`` carries the whole protocol. Without root the test skips, except under
``CI=true``, where it fails.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys

import pytest

from darkmatter.testing import skip_unless_ci

pytestmark = pytest.mark.netns

MIN_CASES = 30


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def test_the_conformance_suite_passes_over_webrtc(tmp_path):
    namespace = "dmconf" + secrets.token_hex(3)
    made = ip("netns", "add", namespace)
    if made.returncode != 0:
        reason = f"cannot create a network namespace: {made.stderr.strip() or 'ip netns add failed'}"
        skip_unless_ci(reason)
    try:
        for args in (("link", "set", "lo", "up"), ("addr", "add", "127.0.0.2/8", "dev", "lo")):
            step = ip("-n", namespace, *args)
            assert step.returncode == 0, step.stderr
        run = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--pyargs", "darkmatter.testing.conformance", "--dm-transport=webrtc", f"--basetemp={tmp_path / 'b'}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=900)
        tail = run.stdout[-4000:] + run.stderr[-2000:]
        assert run.returncode == 0, tail
        counts = re.search(r"(\d+) passed", run.stdout)
        assert counts and int(counts.group(1)) >= MIN_CASES, tail
        assert not re.search(r"\d+ (failed|skipped|error)", run.stdout), tail
    finally:
        ip("netns", "delete", namespace)
