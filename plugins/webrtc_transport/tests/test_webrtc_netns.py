"""Two real nodes upgrading to a WebRTC data channel, inside a network namespace this test creates.

aiortc never offers 127.0.0.1 as an ICE candidate, so two nodes on the host's plain loopback never open
a channel. The module fixture creates a namespace whose ``lo`` also carries 127.0.0.2, runs
``netns_driver.py`` there once (two in-process nodes with ``http_transport,webrtc_transport`` and
``DARKMATTER_STUN_SERVERS=""``), and each test asserts one behaviour from the JSON it reports. The
namespace is deleted afterwards. Where namespaces cannot be created (no root), the tests are skipped
with the reason; under ``CI=true`` (CI runs as root) they fail instead.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from darkmatter.testing import skip_unless_ci

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "netns_driver.py"


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    namespace = "dmrtc" + secrets.token_hex(3)
    made = ip("netns", "add", namespace)
    if made.returncode != 0:
        reason = f"cannot create a network namespace: {made.stderr.strip() or 'ip netns add failed'}"
        print(reason)
        skip_unless_ci(reason)
    try:
        for args in (("link", "set", "lo", "up"), ("addr", "add", "127.0.0.2/8", "dev", "lo")):
            step = ip("-n", namespace, *args)
            assert step.returncode == 0, step.stderr
        directory = tmp_path_factory.mktemp("webrtc")
        log_path = directory / "driver.log"
        with open(log_path, "wb") as log:
            proc = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, str(DRIVER), str(directory)],
                                  stdout=subprocess.PIPE, stderr=log, timeout=300)
        lines = proc.stdout.decode().strip().splitlines()
        assert lines, f"driver printed nothing (exit {proc.returncode}); log:\n{log_path.read_text()[-6000:]}"
        result = json.loads(lines[-1])
        assert "driver_error" not in result, f"{result['driver_error']}; log:\n{log_path.read_text()[-6000:]}"
        return result
    finally:
        ip("netns", "delete", namespace)


def test_two_nodes_upgrade_and_list_webrtc(run):
    assert run["before"]["a_can_send"] is False
    assert set(run["before"]["a_lists"].values()) == {"http"}
    upgrade = run["upgrade"]
    assert upgrade["result"]["success"] is True and upgrade["result"]["transport"] == "webrtc"
    assert upgrade["both_open"] is True
    assert set(upgrade["a_lists"].values()) == {"webrtc"}
    assert set(upgrade["b_lists"].values()) == {"webrtc"}
    assert upgrade["again"]["already_open"] is True


def test_live_status_marks_webrtc_peers(run):
    assert any(line.startswith("[webrtc]") for line in run["upgrade"]["a_status"])
    assert any(line.startswith("[webrtc]") for line in run["upgrade"]["b_status"])
    assert not any("[webrtc]" in line for line in run["after_close"]["a_status"])


def test_messages_flow_both_ways_over_the_channel(run):
    for step in ("a_to_b", "b_to_a", "a_to_b_2"):
        sent = run[step]
        assert sent["state"] == "delivered", step
        assert sent["transport"] == "webrtc", step          # the sender's delivery record
        assert sent["inbox_transport"] == ["webrtc"], step  # the receiver's inbox entry (mesh.message's Caller)
    assert run["frames"]["a_out"] >= 2 and run["frames"]["b_in"] >= 2


def test_http_message_route_not_hit_while_channel_open(run):
    # Every message the receivers accepted before the 40 KB one arrived over the channel, not POST /message.
    observed_b = [m["transport"] for m in run["observed"]["b"]]
    first_http = observed_b.index("http")
    assert observed_b[:first_http] == ["webrtc", "webrtc"]
    assert run["observed"]["b"][first_http]["message_id"] == run["big"]["message_id"]
    assert run["observed"]["a"][0] == {"message_id": run["b_to_a"]["message_id"], "transport": "webrtc"}


def test_large_message_goes_over_http(run):
    big = run["big"]
    assert big["state"] == "delivered" and big["transport"] == "http" and big["inbox_transport"] == ["http"]
    assert big["channel_still_open"] is True


def test_forged_offers_refused_without_disturbing_the_channel(run):
    bad = run["bad_offers"]
    assert bad["unsigned"] == {"status": 403, "code": "signature_required"}
    assert bad["wrong_key"] == {"status": 403, "code": "invalid_signature"}
    assert bad["stale"] == {"status": 403, "code": "stale_timestamp"}
    assert bad["stranger"] == {"status": 403, "code": "not_connected"}
    after = run["after_bad_offers"]
    assert after["b_same_link"] is True and after["a_same_link"] is True
    assert after["b_negotiating"] == []
    assert after["message"]["transport"] == "webrtc" and after["message"]["inbox_transport"] == ["webrtc"]


def test_closed_channel_resends_unacked_frame_over_http(run):
    resend = run["resend"]
    assert resend["held"] is True
    assert resend["state"] == "delivered" and resend["transport"] == "http"
    assert resend["copies_at_b"] == 1  # deduplicated: accepted once, over the channel
    # the close itself triggered the resend: A's ack timeout (2 s here, less than B's 3 s hold) never fired
    assert resend["ack_timeouts"] == 0
    assert resend["both_http"] is True


def test_after_close_messages_use_http_and_list_shows_http(run):
    after = run["after_close"]
    for step in ("a_to_b", "b_to_a"):
        assert after[step]["state"] == "delivered" and after[step]["transport"] == "http"
        assert after[step]["inbox_transport"] == ["http"]
    assert set(after["a_lists"].values()) == {"http"}
    assert set(after["b_lists"].values()) == {"http"}


def test_reupgrade_from_other_side_and_disconnect_closes_channels(run):
    again = run["reupgrade"]
    assert again["result"]["success"] is True and again["open"] is True
    assert again["b_to_a"]["transport"] == "webrtc"
    assert again["closed_on_disconnect"] is True


def test_fire_and_forget_to_peer_not_known_03(run):
    # B holds the message, and so its ack, in its event hook until A's send has returned: a sender that
    # waited for the ack could not report it delivered over the channel (it would time out to HTTP, or
    # leave it queued)
    fire = run["fire_and_forget"]
    assert fire["state"] == "delivered" and fire["transport"] == "webrtc"
    assert fire["acknowledged"] is False
    assert fire["returned_before_b_released"] is True
    assert fire["held_at_b"] is True and fire["released"] is True
    assert fire["arrived"] is True and fire["inbox_transport"] == ["webrtc"]


def test_no_ack_falls_back_to_http(run):
    no_ack = run["no_ack"]
    assert no_ack["held"] is True
    assert no_ack["state"] == "delivered" and no_ack["transport"] == "http"
    assert 1.5 <= no_ack["seconds"] < 10  # waited for A's 2 s ack timeout, then HTTP
    assert no_ack["copies_at_b"] == 1
    assert no_ack["a_reverted"] is True and set(no_ack["a_lists"].values()) == {"http"}


def test_shutdown_closes_channels_and_saves_http(run):
    assert run["before_shutdown_open"] is True
    assert run["a_links_after_stop"] == 0
    assert set(run["saved_transport"].values()) == {"http"}


def test_ice_gathering_timeout_is_an_error_not_a_hang(run):
    slow = run["gather_timeout"]
    assert "ICE gathering did not finish within 1 s" in slow["offerer"]["tool_error"]
    assert slow["offerer_seconds"] < 5
    # the answerer side of the same limit: the offer is answered 503, reported by the offerer's tool
    assert "HTTP 503" in slow["answerer"]["tool_error"] and "ICE gathering" in slow["answerer"]["tool_error"]
    assert slow["answerer_seconds"] < 5
    assert slow["links"] == [0, 0, 0]
    assert slow["background_closed"] is True
    assert slow["offerer_transport"] == slow["offerer_transport_after"] == "http"
