"""The bench harness cannot rot: run ``python -m bench --quick --only perhop`` for real (a DarkMatter node, the
bare baseline route and the load generator, each its own process on loopback) and check the JSON it writes
has every figure. Timings are not asserted: this machine is shared and they are the bench's business."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def spread_ok(value) -> bool:
    return (isinstance(value, dict) and value.get("n", 0) >= 1
            and all(isinstance(value.get(k), (int, float)) for k in ("median", "min", "max"))
            and value["min"] <= value["median"] <= value["max"])


@pytest.mark.timeout(240)
def test_quick_perhop_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "perhop", "--out", str(out),
                           "--logs", str(tmp_path / "logs")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scenario" in done.stdout and "per-hop c=16" in done.stdout  # the printed table
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["cpus"] >= 1
    perhop = report["scenarios"]["perhop"]
    assert "error" not in perhop, perhop.get("error")
    figures = perhop["figures"]
    assert set(figures["by_concurrency"]) == {"1", "16", "64"}
    for level in figures["by_concurrency"].values():
        for server in ("bare", "empty", "full"):
            for name in ("p50_ms", "p99_ms", "throughput_rps", "server_cpu_us_per_msg"):
                assert spread_ok(level[server][name]), (server, name, level[server][name])
        for server in ("empty", "full"):
            for name in ("p50_ratio", "p99_ratio", "throughput_ratio", "cpu_ratio"):
                assert spread_ok(level[server][name]), (server, name)
        assert spread_ok(level["full_over_empty_throughput"])
    assert figures["state_bytes"]["full"] > figures["state_bytes"]["empty"] * 10  # the full store is full
    assert spread_ok(figures["fsync_append_ms"])
    assert set(figures["targets"]) == {"p50_le_2x_bare", "throughput_ge_0_8x_bare_c16", "flat_with_full_stores_c16"}
    assert report["rows"] and all(len(row) == 6 for row in report["rows"])


@pytest.mark.timeout(240)
def test_a_small_simulation_over_the_memory_transport_connects_routes_and_heals(tmp_path):
    """``bench.simulation`` at N = 40: every connection made, a 10-hop crossing with every hop recorded at the
    origin, and after 10 % of the nodes die, deliveries to the living succeed, those to the dead queue, and
    the outbox delivers them once the dead come back."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.simulation", "--child", "40"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["connect_failures"] == 0 and result["connections"] >= 40
    assert result["cross_updates_recorded"] == 9  # every forward after the first hop, recorded by the origin
    assert result["broadcast_delivered"] == result["broadcast_recipients"] > 0
    live, expected_live = map(int, result["live_delivered"].split("/"))
    queued, expected_dead = map(int, result["dead_queued"].split("/"))
    assert live == expected_live > 0 and queued == expected_dead > 0
    assert result["heal_s"] is not None


@pytest.mark.timeout(240)
def test_quick_responsive_writes_every_figure(tmp_path):
    """The latencies the tests only bound generously (list_changed after a message, /status under write load)
    are measured by ``python -m bench --only responsive``; it must keep producing them."""
    out = tmp_path / "bench.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "responsive", "--out", str(out),
                           "--logs", str(tmp_path / "logs")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["scenarios"]["responsive"]["figures"]
    for name in ("notify_ms", "notify_max_ms", "ack_ms", "bare_post_ms", "notify_ratio"):
        assert spread_ok(figures["list_changed"][name]), name
    for server in ("node", "bare"):
        for name in ("p50_ms", "p99_ms", "max_ms", "reads"):
            assert spread_ok(figures["status_under_load"][server][name]), (server, name)
    assert spread_ok(figures["status_under_load"]["p99_ratio"])
