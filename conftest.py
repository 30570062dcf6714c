"""Repository-wide test safety: no test process reaches beyond loopback unless it says so.

Discovery (LAN multicast joins and beacons), UPnP (SSDP) and the public-IP lookup are switched off in
the test process's environment, which every subprocess inherits unless a test passes its own
environment explicitly (the namespace tests do, inside namespaces they create).
"""

import os

import pytest


SAFE_ENV = {"DARKMATTER_DISCOVERY": "false", "DARKMATTER_UPNP": "false", "DARKMATTER_IP_LOOKUP_URL": "",
            "DARKMATTER_STUN_SERVERS": ""}


def pytest_configure(config):
    os.environ.update(SAFE_ENV)


@pytest.fixture
def anyio_backend():

    return "asyncio"
