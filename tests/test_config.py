"""Configuration: every DARKMATTER_* setting read in one place, defaults of docs/protocol.md §13.4, readable
errors, flags over environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from darkmatter.config import Config, ConfigError, parse_ports


def test_defaults_are_the_protocol_defaults(tmp_path):
    cfg = Config.from_env({"HOME": str(tmp_path)})
    assert cfg.port == 8100
    assert cfg.host == "127.0.0.1"
    assert cfg.genesis is None  # unset: a new identity is genesis, a stored flag is kept
    assert cfg.state_file == tmp_path / ".darkmatter" / "state" / "8100.json"
    assert cfg.transport == "auto"
    assert cfg.discovery is True
    assert cfg.discovery_ports == list(range(8100, 8111))
    assert cfg.inbox_max == 50
    assert cfg.delivery_retry_seconds == 600.0
    assert cfg.rate_limits is True
    assert cfg.upnp is True and cfg.bootstrap is True
    assert cfg.display_name is None and cfg.bio is None and cfg.public_url is None
    assert cfg.state_recovery is None
    assert cfg.plugins is None and cfg.disable == ()
    assert cfg.storage == "json"
    assert cfg.channel == "verified" and cfg.receipts is True


def test_every_setting_is_read_from_the_environment(tmp_path):
    env = {
        "HOME": str(tmp_path), "DARKMATTER_PORT": "9200", "DARKMATTER_HOST": "0.0.0.0",
        "DARKMATTER_DISPLAY_NAME": "alpha", "DARKMATTER_BIO": "Knows Rust.", "DARKMATTER_GENESIS": "false",
        "DARKMATTER_STATE_FILE": str(tmp_path / "s.json"), "DARKMATTER_TRANSPORT": "HTTP",
        "DARKMATTER_DISCOVERY": "off", "DARKMATTER_DISCOVERY_PORTS": "9000-9002, 9100",
        "DARKMATTER_PUBLIC_URL": "https://Node.Example.com:443/mcp", "DARKMATTER_INBOX_MAX": "7",
        "DARKMATTER_DELIVERY_RETRY_SECONDS": "2.5", "DARKMATTER_RATE_LIMITS": "off", "DARKMATTER_UPNP": "0",
        "DARKMATTER_BOOTSTRAP": "no", "DARKMATTER_STATE_RECOVERY": "new-identity",
        "DARKMATTER_PLUGINS": "http_transport", "DARKMATTER_DISABLE_PLUGINS": "a, b", "DARKMATTER_STORAGE": "memory",
        "DARKMATTER_CHANNEL": " All ", "DARKMATTER_RECEIPTS": "false",
    }
    cfg = Config.from_env(env)
    assert (cfg.port, cfg.host, cfg.display_name, cfg.bio, cfg.genesis) == (9200, "0.0.0.0", "alpha", "Knows Rust.", False)
    assert cfg.state_file == tmp_path / "s.json"
    assert cfg.transport == "http"
    assert cfg.discovery is False and cfg.discovery_ports == [9000, 9001, 9002, 9100]
    assert cfg.public_url == "https://node.example.com"
    assert (cfg.inbox_max, cfg.delivery_retry_seconds, cfg.rate_limits) == (7, 2.5, False)
    assert cfg.upnp is False and cfg.bootstrap is False
    assert cfg.state_recovery == "new-identity"
    assert (cfg.plugins, cfg.disable, cfg.storage) == ("http_transport", ("a", "b"), "memory")
    assert (cfg.channel, cfg.receipts) == ("all", False)
    assert cfg.env is not env and cfg.env["DARKMATTER_BIO"] == "Knows Rust."


def test_flags_override_the_environment(tmp_path):
    env = {"HOME": str(tmp_path), "DARKMATTER_PORT": "9200", "DARKMATTER_HOST": "0.0.0.0",
           "DARKMATTER_PLUGINS": "http_transport", "DARKMATTER_TRANSPORT": "stdio",
           "DARKMATTER_STATE_FILE": str(tmp_path / "env.json"), "DARKMATTER_PUBLIC_URL": "http://10.0.0.5:9200",
           "DARKMATTER_DISABLE_PLUGINS": "x"}
    cfg = Config.from_env(env, port=9300, host="127.0.0.1", plugins="", transport="http",
                          state_file=str(tmp_path / "flag.json"), public_url="http://10.0.0.6:9300/",
                          disable=("y",))
    assert (cfg.port, cfg.host, cfg.plugins, cfg.transport) == (9300, "127.0.0.1", "", "http")
    assert cfg.state_file == tmp_path / "flag.json"
    assert cfg.public_url == "http://10.0.0.6:9300"
    assert set(cfg.disable) == {"x", "y"}
    # Flags left out (None) fall back to the environment.
    cfg = Config.from_env(env, port=None, plugins=None)
    assert (cfg.port, cfg.plugins) == (9200, "http_transport")


def test_the_default_state_file_follows_the_configured_port(tmp_path):
    cfg = Config.from_env({"HOME": str(tmp_path)}, port=8105)
    assert cfg.state_file == tmp_path / ".darkmatter" / "state" / "8105.json"


def test_plugin_setting_helpers_validate_their_variables():
    cfg = Config.from_env({"HOME": "/nonexistent", "DARKMATTER_X_ON": "yes", "DARKMATTER_X_N": "12",
                           "DARKMATTER_X_F": "0.5", "DARKMATTER_X_BAD": "twelve"})
    assert cfg.get_bool("DARKMATTER_X_ON", False) is True
    assert cfg.get_bool("DARKMATTER_X_MISSING", True) is True
    assert cfg.get_int("DARKMATTER_X_N", 1, minimum=1, maximum=20) == 12
    assert cfg.get_float("DARKMATTER_X_F", 1.0) == 0.5
    assert cfg.get_str("DARKMATTER_X_MISSING", "d") == "d"
    with pytest.raises(ConfigError, match="DARKMATTER_X_BAD='twelve' is not a whole number"):
        cfg.get_int("DARKMATTER_X_BAD", 1)
    with pytest.raises(ConfigError, match="DARKMATTER_X_BAD='twelve' is not a boolean"):
        cfg.get_bool("DARKMATTER_X_BAD", True)
    with pytest.raises(ConfigError, match="DARKMATTER_X_N='12' must be between 1 and 10"):
        cfg.get_int("DARKMATTER_X_N", 1, minimum=1, maximum=10)


BAD = [
    ("DARKMATTER_DISCOVERY_PORTS", "abc", "DARKMATTER_DISCOVERY_PORTS='abc': 'abc' is not a port"),
    ("DARKMATTER_DISCOVERY_PORTS", "8110-8100", "not within 1-65535"),
    ("DARKMATTER_DISCOVERY_PORTS", "1-2000", "more than 256 ports"),
    ("DARKMATTER_DISCOVERY_PORTS", " , ", "lists no ports"),
    ("DARKMATTER_PORT", "abc", "DARKMATTER_PORT='abc' is not a whole number"),
    ("DARKMATTER_PORT", "70000", "DARKMATTER_PORT='70000' must be between 0 and 65535"),
    ("DARKMATTER_PORT", "-1", "must be between 0 and 65535"),
    ("DARKMATTER_GENESIS", "maybe", "DARKMATTER_GENESIS='maybe' is not a boolean"),
    ("DARKMATTER_DISCOVERY", "sometimes", "DARKMATTER_DISCOVERY='sometimes' is not a boolean"),
    ("DARKMATTER_UPNP", "2", "DARKMATTER_UPNP='2' is not a boolean"),
    ("DARKMATTER_BOOTSTRAP", "nah", "is not a boolean"),
    ("DARKMATTER_TRANSPORT", "pigeon", "DARKMATTER_TRANSPORT='pigeon' must be auto, stdio or http"),
    ("DARKMATTER_RATE_LIMITS", "half", "DARKMATTER_RATE_LIMITS='half' must be on or off"),
    ("DARKMATTER_STATE_RECOVERY", "yes", "DARKMATTER_STATE_RECOVERY='yes'"),
    ("DARKMATTER_PUBLIC_URL", "ftp://example.com", "DARKMATTER_PUBLIC_URL='ftp://example.com'"),
    ("DARKMATTER_INBOX_MAX", "0", "DARKMATTER_INBOX_MAX='0' must be between 1"),
    ("DARKMATTER_DELIVERY_RETRY_SECONDS", "nan", "DARKMATTER_DELIVERY_RETRY_SECONDS='nan'"),
    ("DARKMATTER_DELIVERY_RETRY_SECONDS", "-5", "must be a finite number"),
    ("DARKMATTER_CHANNEL", "loud", "DARKMATTER_CHANNEL='loud' must be verified, all or off"),
    ("DARKMATTER_RECEIPTS", "perhaps", "DARKMATTER_RECEIPTS='perhaps' is not a boolean"),
]


@pytest.mark.parametrize("name,value,expected", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_bad_values_are_readable_config_errors(name, value, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_env({"HOME": "/nonexistent", name: value})
    assert expected in str(err.value)
    assert name in str(err.value)


def test_a_bad_port_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="--port 70000"):
        Config.from_env({"HOME": "/nonexistent"}, port=70000)


def test_port_lists_parse_ranges_and_single_ports():
    assert parse_ports("8100-8102,8200, 8101") == [8100, 8101, 8102, 8200]


def _run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_")}
    base.update({"HOME": str(tmp_path), "DARKMATTER_TRANSPORT": "http", "DARKMATTER_DISCOVERY": "false",
                 "DARKMATTER_UPNP": "false", "DARKMATTER_IP_LOOKUP_URL": ""})
    base.update(env)
    return subprocess.run([sys.executable, "-m", "darkmatter", *args], env=base, capture_output=True, text=True,
                          timeout=60)


CLI_BAD = [
    ({"DARKMATTER_DISCOVERY_PORTS": "abc"}, (), "DARKMATTER_DISCOVERY_PORTS='abc'"),
    ({"DARKMATTER_PORT": "eighty"}, (), "DARKMATTER_PORT='eighty' is not a whole number"),
    ({"DARKMATTER_GENESIS": "perhaps"}, (), "DARKMATTER_GENESIS='perhaps' is not a boolean"),
    ({"DARKMATTER_DISCOVERY": "2"}, (), "DARKMATTER_DISCOVERY='2' is not a boolean"),
    ({}, ("--port", "99999"), "--port 99999 must be between 0 and 65535"),
    ({"DARKMATTER_LOG_LEVEL": "loud"}, (), "DARKMATTER_LOG_LEVEL='loud'"),
]


@pytest.mark.parametrize("env,args,expected", CLI_BAD, ids=[e for _, _, e in CLI_BAD])
def test_config_errors_from_the_cli_are_one_line_exit_2_and_no_traceback(tmp_path, env, args, expected):
    result = _run_cli(tmp_path, "run", *args, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("darkmatter: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / ".darkmatter").exists()  # nothing was created


def test_a_bad_flag_value_is_a_usage_error_without_traceback(tmp_path):
    result = _run_cli(tmp_path, "run", "--transport", "carrier-pigeon")
    assert result.returncode == 2
    assert "Invalid value for '--transport'" in result.stderr and "Traceback" not in result.stderr


def test_each_rate_limit_row_is_configurable_and_bad_values_are_readable(tmp_path):
    from darkmatter.config import ConfigError
    from darkmatter.testing import make_node

    node = make_node(tmp_path / "a", DARKMATTER_RATE_MESSAGE_PEER="5/1/10")
    assert node.rate.rules["message_peer"] == (5.0, 1.0, 10.0)
    assert node.rate.rules["message_node"] == (200, 200, 60)
    with pytest.raises(ConfigError, match="DARKMATTER_RATE_WEBHOOK_IP='abc' must be capacity/refill/seconds"):
        make_node(tmp_path / "b", DARKMATTER_RATE_WEBHOOK_IP="abc")
    with pytest.raises(ConfigError, match="capacity must be at least 1"):
        make_node(tmp_path / "c", DARKMATTER_RATE_GET_IP="0/1/1")
