"""Drive headless Chromium through the DevTools protocol over a pipe (no extra dependency).

``chromium --remote-debugging-pipe`` reads protocol commands from file descriptor 3 and
writes answers and events to descriptor 4, one JSON message per NUL-terminated chunk;
that needs no websocket client. Used by the draw page's browser test and by
``assets/make_screenshot.py``.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

from .errors import UserError

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
         "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """The Chromium executable on PATH (Debian's ``chromium`` or Ubuntu's ``chromium-browser``)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _pipes_to_3_and_4(read_end: int, write_end: int) -> None:
    """In the child: put the command pipe on fd 3 and the answer pipe on fd 4 (Chromium's pipe protocol).

    Both are first copied above 9, so neither can be overwritten by the other's ``dup2``.
    """
    high_read, high_write = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10), fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)


class Chromium:
    """One headless browser with one page; ``call`` sends a protocol command to that page.

    Parameters
    ----------
    width, height : the page's viewport in CSS pixels.
    timeout : seconds any single command may take.
    """

    def __init__(self, width: int = 1200, height: int = 800, timeout: float = 60.0):
        exe = find_chromium()
        if exe is None:
            raise UserError("chromium is not installed (Debian: apt-get install -y chromium)")
        self.timeout, self._next_id, self._replies, self._cond = timeout, 0, {}, threading.Condition()
        self._profile = tempfile.mkdtemp(prefix="selfexplain-chromium-")
        to_child, self._write_fd = os.pipe()
        self._read_fd, from_child = os.pipe()
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(3, 4), preexec_fn=lambda: _pipes_to_3_and_4(to_child, from_child))
        os.close(to_child)
        os.close(from_child)
        threading.Thread(target=self._read_loop, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, page=False)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # ------------------------------------------------------------------ protocol
    def _read_loop(self) -> None:
        buffer = b""
        with os.fdopen(self._read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                with self._cond:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._replies[message["id"]] = message
                    self._cond.notify_all()

    def call(self, method: str, params: dict | None = None, page: bool = True) -> dict:
        """Send one command (to the page's session unless ``page=False``) and wait for its result."""
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        message = {"id": msg_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: msg_id in self._replies, self.timeout):
                raise TimeoutError(f"chromium did not answer {method} within {self.timeout:.0f} s")
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    # ------------------------------------------------------------------ page helpers
    def goto(self, url: str) -> None:
        """Open ``url`` and wait until its document has loaded."""
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Poll until the expression is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expression!r}")

    def stroke(self, points: list[tuple[float, float]], pointer: str = "mouse") -> None:
        """Draw one stroke through viewport points with real input events (mouse, pen or touch)."""
        if pointer == "touch":
            kinds = ["touchStart"] + ["touchMove"] * (len(points) - 1)
            for kind, (x, y) in zip(kinds, points):
                self.call("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
            self.call("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
            return
        common = {"button": "left", "pointerType": pointer, "clickCount": 1}
        x, y = points[0]
        self.call("Input.dispatchMouseEvent", {"type": "mousePressed", "x": x, "y": y, "buttons": 1, **common})
        for x, y in points[1:]:
            self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y, "buttons": 1, **common})
        self.call("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": x, "y": y, "buttons": 0, **common})

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        """Stop the browser and remove its temporary profile."""
        try:
            os.close(self._write_fd)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
