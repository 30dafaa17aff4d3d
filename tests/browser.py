"""Headless Chromium driven over the DevTools protocol, for tests of pages that render WebGL.

:func:`chromium_page` starts Debian's ``chromium`` headless (software WebGL through
SwiftShader, every host name unresolvable except what ``allow_hosts`` lists, a throwaway
profile) with a DevTools port on 127.0.0.1 and yields a :class:`Page`: ``goto(url)``,
``evaluate(js)`` (the JSON value), ``wait_for(js, timeout)`` and ``screenshot(path)``. The
browser's process group is stopped on exit (:func:`services._stop`). Uses the ``websockets``
client (a dependency of viser). Nothing starts at import.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from services import LOOPBACK, ServiceError, _stop, _wait_until, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab over a DevTools websocket."""

    def __init__(self, ws) -> None:
        self._ws, self._ids = ws, itertools.count(1)

    def send(self, method: str, **params: Any) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise ServiceError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            return None
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy; its value (``ServiceError`` on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise ServiceError(f"not true after {timeout:.0f} s: {expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def _page_socket(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/json/list", timeout=2) as r:
            targets = json.loads(r.read())
    except OSError:
        return None
    pages = [t for t in targets if t.get("type") == "page"]
    return pages[0]["webSocketDebuggerUrl"] if pages else None


@contextlib.contextmanager
def chromium_page(tmp_dir: Path, size: tuple[int, int] = (960, 640),
                  allow_hosts: tuple[str, ...] = (LOOPBACK,)) -> Iterator[Page]:
    """Headless Chromium with one tab; ``size`` is ``(width, height)`` of the window."""
    from websockets.sync.client import connect

    if CHROMIUM is None:
        raise ServiceError("chromium not found")
    port = free_port()
    rules = ", ".join([f"EXCLUDE {h}" for h in allow_hosts] + ["MAP * ~NOTFOUND"])
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader",
           "--enable-unsafe-swiftshader", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-quic",
           f"--user-data-dir={tmp_dir / 'chromium-profile'}", f"--host-resolver-rules={rules}",
           f"--window-size={size[0]},{size[1]}", f"--remote-debugging-port={port}",
           "--remote-allow-origins=*", "about:blank"]
    log = tmp_dir / "chromium.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until(lambda: _page_socket(port) is not None, proc, 60, "chromium", log)
        with connect(_page_socket(port), max_size=None, open_timeout=30) as ws:
            page = Page(ws)
            page.send("Page.enable")
            yield page
    finally:
        _stop(proc)
