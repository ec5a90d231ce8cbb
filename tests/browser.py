"""A real headless Chromium for tests, driven over the DevTools protocol: the one already on
this machine (``CHROME_BIN``, or chromium / chromium-browser / google-chrome on PATH), else
Debian's ``chromium``, installed when the tests run as root (CI), else a message naming what
to install.

The protocol is JSON over a websocket, and websocket-client is already a dependency, so this
needs no WebDriver, no chromedriver and no extra package: start the browser with
``--remote-debugging-port=0``, read the port it chose from ``DevToolsActivePort`` in its
profile folder, and talk to the page target. Every wait is bounded.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import websocket

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0


BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_VARIABLE = "CHROME_BIN"
INSTALL_HINT = (
    "the report's browser test needs headless Chromium or Chrome: install one (Debian/Ubuntu: "
    "`sudo apt-get install chromium`; macOS: `brew install --cask chromium`), or name the "
    f"binary in {BROWSER_VARIABLE}"
)


class NoBrowser(RuntimeError):
    """No Chromium or Chrome here, and none could be installed: what to install is said."""


def find_browser(environ: Mapping[str, str] | None = None, path: str | None = None) -> str | None:
    """The browser to drive: ``$CHROME_BIN`` when set, else the first of the usual names on
    ``path`` (default: PATH)."""
    env = os.environ if environ is None else environ
    named = env.get(BROWSER_VARIABLE, "").strip()
    if named:
        found = shutil.which(named, path=path)
        if not found:
            raise NoBrowser(f"{BROWSER_VARIABLE}={named} is not an executable; {INSTALL_HINT}")
        return found
    for name in BROWSER_NAMES:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    """A Chromium or Chrome binary: one already here (``CHROME_BIN``, or chromium,
    chromium-browser, google-chrome, google-chrome-stable on PATH), else Debian's chromium
    installed with apt-get when this runs as root where apt-get exists (as CI does), else
    :class:`NoBrowser` saying what to install.

    Quick when present: a PATH lookup. The package lists are refreshed only when the first
    install attempt fails, since that is what a stale or empty list looks like.
    """
    found = find_browser()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoBrowser(f"no Chromium or Chrome found ({', '.join(BROWSER_NAMES)}); {INSTALL_HINT}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    print("tests/browser.py: installing chromium with apt-get (running as root)", flush=True)
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        if subprocess.run(install, env=env, check=False).returncode != 0:
            raise NoBrowser(f"`apt-get install chromium` failed; {INSTALL_HINT}")
    found = find_browser()
    if not found:
        raise NoBrowser(f"apt-get installed chromium, but it is not on PATH; {INSTALL_HINT}")
    return found


class DevToolsError(RuntimeError):
    """The browser answered a call with an error, or not in time."""


class Chromium:
    """One headless browser with one page, for ``with Chromium(...) as page:``."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.binary = binary
        self.profile = profile
        self.width = width
        self.height = height
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: websocket.WebSocket | None = None

    def __enter__(self) -> Self:
        self.profile.mkdir(parents=True, exist_ok=True)
        log = (self.profile.parent / f"{self.profile.name}.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._ws = websocket.create_connection(
                self._page_socket(), timeout=CALL_TIMEOUT, suppress_origin=True
            )
            self.call("Page.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=self.height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _page_socket(self) -> str:
        """The websocket URL of the page target, once the browser has said where it listens."""
        assert self._proc is not None
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DevToolsError(f"chromium exited with {self._proc.returncode} at start")
            lines = port_file.read_text().split() if port_file.is_file() else []
            if lines:
                url = f"http://127.0.0.1:{lines[0]}/json/list"
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        targets = json.load(response)
                except OSError:
                    targets = []
                for target in targets:
                    if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                        return str(target["webSocketDebuggerUrl"])
            time.sleep(0.05)
        raise DevToolsError(f"chromium did not open its DevTools port in {START_TIMEOUT:g} s")

    def _stop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are
        kept in ``events``."""
        assert self._ws is not None
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            if message.get("id") != call_id:
                self.events.append(message)
                continue
            if "error" in message:
                raise DevToolsError(f"{method}: {message['error']}")
            return dict(message.get("result", {}))
        raise DevToolsError(f"{method}: no answer in {CALL_TIMEOUT:g} s")

    def wait_event(self, method: str, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        assert self._ws is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self._ws.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                self.events.append(json.loads(self._ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
            finally:
                self._ws.settimeout(CALL_TIMEOUT)
        raise DevToolsError(f"no {method} event in {timeout:g} s")

    def open(self, url: str) -> None:
        """Load a page and wait for its load event."""
        self.events.clear()
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise DevToolsError(f"cannot open {url}: {answer['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value, evaluated in the page (promises are awaited)."""
        answer = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def wait_until(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll an expression until it is truthy; its last value either way."""
        deadline = time.monotonic() + timeout
        value = self.evaluate(expression)
        while not value and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.evaluate(expression)
        return value

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
