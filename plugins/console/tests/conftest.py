"""Fixtures for the console tests: real nodes on a background event loop, and real headless Chromium.

Chromium and its driver are Debian's `chromium` and `chromium-driver` (`.ci/system-packages` installs them);
Selenium drives them with no download at run time. Without them the browser tests are skipped, except under
CI=true, where a missing browser fails them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from darkmatter.testing import LoopThread, skip_unless_ci

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1360,1500")


@pytest.fixture
def loop():
    with LoopThread() as background:
        yield background


def _browser_paths() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why they cannot be used."""
    browser = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return ("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                ".ci/system-packages does it)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium per test module, with a fresh profile."""
    found = _browser_paths()
    if isinstance(found, str):
        skip_unless_ci(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = Path(tmp_path_factory.mktemp("chromedriver")) / "chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1], log_output=str(log)))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
