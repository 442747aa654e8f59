"""A real browser over ws and wss: headless Chromium (Debian's ``chromium``)
opens tests/browser/index.html, served here by a small http.server, which
loads MQTT.js from its local npm install (tests/browser/node_modules, made by
.ci/run with ``npm ci``; never from a CDN), connects to the broker's ws or wss
listener, subscribes, and shows in the page what a paho-mqtt client publishes.

The test reads the page through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on file
descriptors 3 and 4 of the browser), evaluating ``#status`` and
``#message`` in the page. That needs no Python dependency (no selenium, no
playwright, no WebSocket client), and lets the test publish only once the
page says it has subscribed, instead of guessing a delay.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from bastionmq.listeners.ws import BoundedDeflate
from bastionmq.pki import init_pki
from conftest import Client
from mosquitto_peer import missing, tool

TIMEOUT = 20.0
PAGE_DIR = Path(__file__).parent / "browser"
MQTT_JS = PAGE_DIR / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"



@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    """Like the mosquitto peers, these are installed by .ci/run: a missing one
    fails the test in CI and skips it, with the reason, elsewhere."""
    if not os.path.exists(CHROMIUM):
        missing("Debian's chromium is not installed: apt-get install chromium")
    if not MQTT_JS.exists():
        # The pinned copy (package-lock.json) from the npm registry, as
        # .ci/run installs it, so that a plain ``pytest`` works too.
        npm = tool("npm")  # it installs MQTT.js
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=PAGE_DIR, check=True, timeout=300)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """tests/browser/ served on an ephemeral loopback port."""
    handler = functools.partial(_QuietHandler, directory=str(PAGE_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


def _above_4(fd: int) -> int:
    if fd > 4:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium on one URL, driven over --remote-debugging-pipe."""

    def __init__(self, url: str, profile: Path, extra_args: list[str] = (),
                 home: Path | None = None) -> None:
        # Chromium reads commands from its fd 3 and writes answers to its fd 4.
        # The child's ends are moved above 4 first, so that dup2 onto 3 and 4
        # cannot overwrite one with the other.
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        to_browser_r = _above_4(to_browser_r)
        from_browser_w = _above_4(from_browser_w)
        args = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            f"--user-data-dir={profile}", "--remote-debugging-pipe",
            *extra_args, url,
        ]

        def child_fds() -> None:
            # dup2 makes 3 and 4 inheritable; close_fds=False keeps them open
            # through exec (Python's own descriptors are not inheritable, so
            # nothing else leaks into the browser).
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, close_fds=False, preexec_fn=child_fds,
            env={**os.environ, "HOME": str(home)} if home is not None else None)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        self._stderr: list[bytes] = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr[-40:]).decode(errors="replace")

    def _send(self, method: str, params: dict | None = None,
              session: str | None = None) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:  # events and other answers are skipped
            while b"\0" not in self._buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer to {method}\n{self.stderr}")
                chunk = os.read(self._from_browser, 65536)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe\n{self.stderr}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def _page_session(self) -> str:
        if self._session is None:
            deadline = time.monotonic() + TIMEOUT
            while True:
                pages = [target for target in self._send("Target.getTargets")["targetInfos"]
                         if target["type"] == "page"]
                if pages:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no page target\n{self.stderr}")
                time.sleep(0.05)
            self._session = self._send("Target.attachToTarget",
                                       {"targetId": pages[0]["targetId"],
                                        "flatten": True})["sessionId"]
        return self._session

    def text(self, element_id: str) -> str | None:
        """The text of ``#element_id`` in the page now (None before it exists)."""
        expression = (f"(() => {{ const e = document.getElementById({json.dumps(element_id)});"
                      f" return e ? e.textContent : null; }})()")
        result = self._send("Runtime.evaluate",
                            {"expression": expression, "returnByValue": True},
                            self._page_session())
        return result["result"].get("value")

    def wait_status(self, prefix: str) -> str:
        """Poll #status until it starts with ``prefix``; fail at once on an error."""
        deadline = time.monotonic() + TIMEOUT
        status = None
        while time.monotonic() < deadline:
            status = self.text("status")
            if status is not None and status.startswith(prefix):
                return status
            if status is not None and (status.startswith("error") or status == "closed"):
                break
            time.sleep(0.05)
        raise AssertionError(f"page status {status!r}, expected {prefix!r}\n{self.stderr}")

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except Exception:
            pass
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._stderr_thread.join(TIMEOUT)
        self.process.stderr.close()


@pytest.fixture
def open_browser(tmp_path) -> Iterator:
    browsers: list[Browser] = []

    def open_(url: str, extra_args: list[str] = (), home: Path | None = None) -> Browser:
        browser = Browser(url, tmp_path / f"profile-{len(browsers)}", list(extra_args), home)
        browsers.append(browser)
        return browser

    yield open_
    for browser in browsers:
        browser.close()


def _browser_receives(page_origin: str, open_browser, mqtt_url: str, publish_port: int,
                      extra_args: list[str] = (), home: Path | None = None) -> None:
    """The page subscribes at ``mqtt_url``; paho publishes on the tcp listener;
    the page shows the message."""
    topic = f"browser/{uuid.uuid4().hex}"
    payload = f"hello from paho {uuid.uuid4().hex[:8]}"
    url = f"{page_origin}/index.html?" + urllib.parse.urlencode({"url": mqtt_url, "topic": topic})
    browser = open_browser(url, extra_args, home)
    assert browser.wait_status("subscribed") == "subscribed 1"
    publisher = Client(publish_port)
    try:
        info = publisher.paho.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        browser.wait_status("received")
        assert browser.text("topic") == topic
        assert browser.text("message") == payload
    finally:
        publisher.paho.disconnect()
        publisher.paho.loop_stop()


@pytest.mark.parametrize("websocket", [
    "",
    # The origin check and permessage-deflate, as a real browser does them.
    "check_origin_enable = true\n    allowed_origins = [\"{origin}\"]\n    compress = true",
], ids=["defaults", "origin-check-compress"])
def test_browser_over_ws(start_broker, page_origin, open_browser, websocket, monkeypatch):
    deflate = []  # BoundedDeflate.enabled() answers: permessage-deflate agreed?
    enabled = BoundedDeflate.enabled
    monkeypatch.setattr(BoundedDeflate, "enabled",
                        lambda self: deflate.append(enabled(self)) or deflate[-1])
    broker = start_broker(f"""
listeners.ws.default {{
  bind = "127.0.0.1:0"
  websocket {{
    mqtt_path = "/mqtt"
    {websocket.format(origin=page_origin)}
  }}
}}
""")
    port = broker.port_of("ws:default")
    _browser_receives(page_origin, open_browser, f"ws://127.0.0.1:{port}/mqtt", broker.port)
    if "compress" in websocket:  # Chromium offers it; the broker agreed
        assert deflate and all(deflate)
    else:
        assert not any(deflate)


def _wss_config(pki: Path) -> str:
    return f"""
listeners.wss.default {{
  bind = "127.0.0.1:0"
  websocket {{ mqtt_path = "/mqtt" }}
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}"
    certfile = "{pki / 'server.pem'}"
    keyfile = "{pki / 'server.key'}"
    verify = verify_none
  }}
}}
"""


def test_browser_over_wss(start_broker, page_origin, open_browser, tmp_path):
    pki = tmp_path / "pki"
    init_pki(pki)  # server.pem for localhost, 127.0.0.1 and ::1
    # Browsers present no client certificate to a page's WebSocket here, so
    # the listener asks for none (the shipped one demands one).
    broker = start_broker(_wss_config(pki))
    port = broker.port_of("wss:default")
    # Chromium on Linux takes locally added trust anchors from the NSS
    # database in ~/.pki/nssdb: the development CA goes into one under a
    # HOME of the test's own, so the browser verifies the server's chain up
    # to that CA (and its name) as it would for any site, and the user's
    # real browser profile is never touched.
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    certutil = tool("certutil")
    subprocess.run([certutil, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True,
                   capture_output=True, timeout=TIMEOUT)
    subprocess.run([certutil, "-A", "-d", f"sql:{nssdb}", "-n", "bastionmq development CA",
                    "-t", "C,,", "-i", str(pki / "ca.pem")], check=True, capture_output=True,
                   timeout=TIMEOUT)
    _browser_receives(page_origin, open_browser, f"wss://127.0.0.1:{port}/mqtt", broker.port,
                      home=home)


def test_browser_over_wss_refuses_untrusted_server(start_broker, page_origin, open_browser,
                                                   tmp_path):
    """Without the development CA among its trust anchors the page cannot
    connect: the trust above is what lets it in, not a browser that accepts
    any certificate."""
    pki = tmp_path / "pki"
    init_pki(pki)
    broker = start_broker(_wss_config(pki))
    port = broker.port_of("wss:default")
    url = f"{page_origin}/index.html?" + urllib.parse.urlencode(
        {"url": f"wss://127.0.0.1:{port}/mqtt", "topic": "browser/x"})
    browser = open_browser(url)
    deadline = time.monotonic() + TIMEOUT
    status = None
    while time.monotonic() < deadline:
        status = browser.text("status")
        if status is not None and (status.startswith("error") or status == "closed"):
            break
        assert not (status or "").startswith(("connected", "subscribed"))
        time.sleep(0.05)
    assert status is not None and (status.startswith("error") or status == "closed"), status
