"""The console in real headless Chromium (Selenium, Debian's chromium and chromium-driver) against real nodes.

The nodes run on a background event loop in this process (``LoopThread``) and serve on loopback sockets; the
browser loads the page from them like a person would. Nothing is reloaded after the first load: a marker set on
``window`` must survive every live update.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from darkmatter.api import request_connection, send_message
from darkmatter.testing import connect

PLUGINS = "http_transport,console"
WAIT = 20.0


def start(loop, tmp_path: Path, name: str, **env):
    return loop.start_node(tmp_path / name, plugins=PLUGINS, DARKMATTER_DISPLAY_NAME=name, **env)


def wait(browser, condition, timeout: float = WAIT, message: str = ""):
    """Until ``condition(browser)`` is truthy. Live updates re-render the page, so an element found a moment ago
    may be gone: that counts as "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def click(browser, selector: str, text: str | None = None) -> None:
    """Click the element, again if a live update replaced it just then."""
    def clicked(b):
        element = shown(selector, text)(b)
        if element:
            element.click()
            return True
        return False
    wait(browser, clicked, message=f"nothing to click at {selector}")


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def shown(selector: str, text: str | None = None):
    def check(browser):
        for element in css(browser, selector):
            if element.is_displayed() and (text is None or text in element.text):
                return element
        return False
    return check


def open_console(browser, node) -> None:
    browser.get(f"http://127.0.0.1:{node.port}/ui")
    wait(browser, lambda b: b.find_element("id", "live").text == "live", message="the event stream did not open")
    browser.execute_script("window.__notReloaded = 42;")


def not_reloaded(browser) -> bool:
    return browser.execute_script("return window.__notReloaded;") == 42


def page_errors(browser) -> list[str]:
    """Console errors of the page: a CSP violation or a script error shows here."""
    return [entry["message"] for entry in browser.get_log("browser") if entry.get("level") == "SEVERE"]


@pytest.fixture(autouse=True)
def blank_between_tests(browser):
    yield
    browser.get("about:blank")


def test_the_page_shows_the_peer_and_a_message_that_arrives_without_a_reload(loop, browser, tmp_path):
    alice, bob = start(loop, tmp_path, "alice"), start(loop, tmp_path, "bob")
    loop.run(connect(bob, alice))
    browser.get_log("browser")  # drop entries from earlier pages
    open_console(browser, alice)

    wait(browser, shown(f'#graph g.peer.connection[data-agent-id="{bob.agent_id}"]', "bob"))
    click(browser, f'#graph g.peer.connection[data-agent-id="{bob.agent_id}"]')
    details = wait(browser, shown("#peer-details", bob.agent_id))
    assert "transport" in details.text and "http" in details.text and "last contact" in details.text

    assert wait(browser, shown("#inbox-list", "Inbox empty."))
    result = loop.run(send_message(bob, "Can you review my build script?", alice.agent_id))
    item = f'#inbox-list li.unread[data-message-id="{result["message_id"]}"]'
    wait(browser, shown(item, "Can you review my build script?"))
    wait(browser, shown(item, "bob"))
    wait(browser, shown("#alert", "New message from bob"))
    assert browser.title.startswith("(1) ")
    assert not_reloaded(browser)
    click(browser, "#alert")  # acknowledging opens the message and clears the sign
    wait(browser, shown("#message-body", "Can you review my build script?"))
    assert not browser.find_element("id", "alert").is_displayed() and not browser.title.startswith("(")
    assert page_errors(browser) == []


def test_accept_on_a_pending_request_makes_the_connection_appear(loop, browser, tmp_path):
    alice = start(loop, tmp_path, "alice", DARKMATTER_GENESIS="false")
    bob = start(loop, tmp_path, "bob")
    open_console(browser, alice)
    wait(browser, shown("#pending-list", "No requests waiting."))

    assert loop.run(request_connection(bob, alice.base_url))["status"] == "pending"
    wait(browser, shown(f'#pending-list li[data-agent-id="{bob.agent_id}"]', "bob"))
    wait(browser, shown("#alert", "bob asks to connect"))
    click(browser, f'#pending-list li[data-agent-id="{bob.agent_id}"] button.accept')

    wait(browser, shown(f'#graph g.peer.connection[data-agent-id="{bob.agent_id}"]'))
    wait(browser, shown("#pending-list", "No requests waiting."))
    assert loop.call(lambda: alice.agent_id in bob.connections and bob.agent_id in alice.connections)
    assert not_reloaded(browser)


def test_respond_sends_an_answer_that_the_other_node_receives(loop, browser, tmp_path):
    alice, bob = start(loop, tmp_path, "alice"), start(loop, tmp_path, "bob")
    loop.run(connect(bob, alice))
    message_id = loop.run(send_message(bob, "What is 6 times 7?", alice.agent_id))["message_id"]
    open_console(browser, alice)

    click(browser, f'#inbox-list li[data-message-id="{message_id}"]')
    wait(browser, shown("#message-body", "What is 6 times 7?"))
    browser.find_element("id", "respond-text").send_keys("42, of course.")
    browser.find_element("id", "respond-send").click()

    wait(browser, lambda b: loop.call(lambda: [r["response"] for r in bob.state["sent_messages"][message_id]["responses"]])
         == ["42, of course."], message="bob never got the response")
    wait(browser, lambda b: not css(b, f'#inbox-list li[data-message-id="{message_id}"]'))  # answered: it left
    wait(browser, shown("#notice", "Response delivered"))
    assert not_reloaded(browser)


def test_forward_and_send_and_the_route_is_drawn_hop_by_hop(loop, browser, tmp_path):
    alice, bob, carol = (start(loop, tmp_path, name) for name in ("alice", "bob", "carol"))
    loop.run(connect(alice, bob))
    loop.run(connect(bob, carol))
    loop.run(connect(alice, carol))
    open_console(browser, alice)

    # Send from the compose form to bob.
    wait(browser, shown(f'#send-to option[value="{bob.agent_id}"]'))
    from selenium.webdriver.support.select import Select

    Select(browser.find_element("id", "send-to")).select_by_value(bob.agent_id)
    browser.find_element("id", "send-text").send_keys("Who can translate this into French?")
    browser.find_element("id", "send-button").click()
    wait(browser, lambda b: loop.call(lambda: len(bob.state["inbox"])) == 1, message="bob got nothing")
    message_id = loop.call(lambda: bob.state["inbox"][0]["message_id"])
    wait(browser, shown(f'#sent-list li[data-message-id="{message_id}"] svg.route g[data-agent-id="{bob.agent_id}"]'))

    # bob forwards to carol, carol answers: both hops and the answer appear live on alice's page.
    from darkmatter.api import forward_message, respond_message

    loop.run(forward_message(bob, message_id, carol.agent_id, "carol speaks French"))
    wait(browser, shown(f'#sent-list li[data-message-id="{message_id}"] svg.route g[data-agent-id="{carol.agent_id}"]'))
    loop.run(respond_message(carol, message_id, "Je peux le faire."))
    wait(browser, shown(f'#sent-list li[data-message-id="{message_id}"]', "Je peux le faire."))
    wait(browser, shown(f'#sent-list li[data-message-id="{message_id}"] .pill.responded'))
    wait(browser, shown(f'#sent-list li[data-message-id="{message_id}"] svg.route '
                        f'g.responded[data-agent-id="{carol.agent_id}"]'))

    # Forward from the console: a message from bob goes on to carol.
    incoming = loop.run(send_message(bob, "Forward this to carol please", alice.agent_id))["message_id"]
    click(browser, f'#inbox-list li[data-message-id="{incoming}"]')
    wait(browser, shown(f'#forward-to option[value="{carol.agent_id}"]'))
    Select(browser.find_element("id", "forward-to")).select_by_value(carol.agent_id)
    browser.find_element("id", "forward-send").click()
    wait(browser, lambda b: loop.call(lambda: incoming in [m["message_id"] for m in carol.state["inbox"]]),
         message="carol never got the forwarded message")
    assert not_reloaded(browser)


@contextlib.contextmanager
def other_site():
    """Another web page on this machine (another port: another origin, without the console's CSP)."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>elsewhere</title><p>an ordinary page elsewhere</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_cross_origin_post_is_refused(loop, browser, tmp_path, caplog):
    alice = start(loop, tmp_path, "alice", DARKMATTER_GENESIS="false")
    bob = start(loop, tmp_path, "bob")
    assert loop.run(request_connection(bob, alice.base_url))["status"] == "pending"
    request_id = loop.call(lambda: next(iter(alice.state["pending_requests"])))
    # The browser holds a console session with alice (her cookie goes to any port of 127.0.0.1) ...
    open_console(browser, alice)
    caplog.set_level(logging.WARNING, logger="darkmatter_console")
    with other_site() as page:
        # ... and then visits a page of another origin, whose script posts to alice's console.
        browser.get(page)
        outcome = browser.execute_async_script("""
            const [url, body, done] = arguments;
            const results = [];
            try {  // a "simple" request: no preflight; the browser sends it, with this page's Origin
              await fetch(url, {method: "POST", mode: "no-cors", credentials: "include", body,
                                headers: {"Content-Type": "text/plain"}});
              results.push("opaque answer");
            } catch (e) { results.push("answer withheld"); }  // alice's Cross-Origin-Resource-Policy
            try {  // with a CSRF header and JSON: needs a preflight, which alice does not grant
              await fetch(url, {method: "POST", credentials: "include", body,
                                headers: {"Content-Type": "application/json", "X-DM-CSRF": "guess"}});
              results.push("answered");
            } catch (e) { results.push("blocked"); }
            done(results);
        """, f"http://127.0.0.1:{alice.port}/ui/api/action/accept", f'{{"request_id": "{request_id}"}}')
    assert outcome[1] == "blocked", outcome
    # The simple request did reach alice, and her Origin check refused it: nothing was accepted.
    origin = page.rstrip("/")
    assert [r for r in caplog.records if "refused action 'accept' (HTTP 403)" in r.getMessage()
            and origin in r.getMessage()], outcome
    assert loop.call(lambda: request_id in alice.state["pending_requests"] and not alice.connections)
    assert loop.call(lambda: not bob.connections)


def test_screenshot_of_a_busy_node(loop, browser, tmp_path):
    """A screenshot of a node with connections, a discovered peer, a request, an inbox and a routed message.
    DARKMATTER_CONSOLE_SCREENSHOT=path also writes it there (the README's docs/console.png)."""
    alice = start(loop, tmp_path, "alice", DARKMATTER_GENESIS="false")
    peers = {name: start(loop, tmp_path, name) for name in ("bob", "carol", "dave", "erin", "frank")}
    for name in ("bob", "carol", "dave"):
        loop.run(connect(alice, peers[name]))
    loop.run(connect(peers["carol"], peers["erin"]))
    loop.run(request_connection(peers["frank"], alice.base_url))
    loop.call(alice.record_discovered, {"agent_id": peers["erin"].agent_id, "url": peers["erin"].base_url,
                                        "display_name": "erin", "source": "local"})
    loop.run(alice.discovery_settled())  # erin proves its key at that URL first (docs/protocol.md §6.1)
    sent = loop.run(send_message(alice, "Does anyone have a GPU free tonight for a 2-hour training run?"))
    from darkmatter.api import forward_message, respond_message

    loop.run(forward_message(peers["carol"], sent["message_id"], peers["erin"].agent_id, "erin has GPUs"))
    loop.run(respond_message(peers["erin"], sent["message_id"], "Yes: my A100 is free from 20:00."))
    loop.run(send_message(peers["dave"], "Lunch at 12:30?", alice.agent_id))
    loop.call(lambda: alice.state["impressions"].update({peers["bob"].agent_id: "careful, answers fast"}))
    browser.set_window_size(1360, 1700)
    open_console(browser, alice)
    wait(browser, shown(f'#graph g.peer[data-agent-id="{peers["bob"].agent_id}"]'))
    wait(browser, shown("#sent-list", "my A100 is free"))
    click(browser, f'#graph g.peer[data-agent-id="{peers["bob"].agent_id}"]')
    wait(browser, shown("#peer-details", "careful, answers fast"))
    # Something arrives while the page is open: the sign shows.
    loop.run(send_message(peers["bob"], "The staging deploy is green; shall I promote it?", alice.agent_id))
    wait(browser, shown("#alert", "New message from bob"))
    browser.execute_script("document.getElementById('alert').classList.remove('pulse')")  # a still picture
    path = tmp_path / "console.png"
    assert browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    target = os.environ.get("DARKMATTER_CONSOLE_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)
