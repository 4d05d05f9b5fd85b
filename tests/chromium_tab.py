"""One headless Chromium tab driven over the DevTools websocket (the review page and OHIF viewer tests).

Every event Chromium sends is kept in :attr:`ChromiumTab.events` (network
answers, page loads), so a test can look back at what the page did.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import websocket

from tests.node.ops.test_status_page import chromium
from tests.peers import free_port, wait_until

#: software WebGL, for pages that draw with it (OHIF's viewports)
SOFTWARE_WEBGL = ("--headless=new", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")
#: plain pages
NO_GPU = ("--headless", "--disable-gpu")


class ChromiumTab:
    """A Chromium process with one tab; ``domains`` are enabled (``Page`` always)."""

    def __init__(self, profile: Path, *, flags: Sequence[str] = NO_GPU, window: tuple[int, int] = (1280, 1600),
                 domains: Sequence[str] = (), timeout_s: float = 60) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), *flags, "--no-sandbox", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = wait_until(lambda: next((t for t in _json(f"http://127.0.0.1:{port}/json/list")
                                          if t.get("type") == "page"), None), 60, "a Chromium tab")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=timeout_s, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", *domains):
            self.call(f"{domain}.enable")

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv())
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})

    def wait_event(self, name: str, since: int | None = None) -> None:
        """Until an event ``name`` arrives after the first ``since`` events (default: from now on)."""
        start = len(self.events) if since is None else since
        while not any(e["method"] == name for e in self.events[start:]):
            self._receive()

    def navigate(self, url: str) -> None:
        start = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since=start)

    def js(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                      f"(document.querySelector({selector!r}).getBoundingClientRect())")
        x, y = box  # type: ignore[misc]
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({selector!r}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot_png(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _json(url: str):  # type: ignore[no-untyped-def]
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return []
