"""Open a local HTML file in headless Chromium and report what happened, through the DevTools protocol.

The protocol runs over a pipe (``--remote-debugging-pipe``: commands on the browser's fd 3, replies on fd 4,
NUL-separated JSON), so nothing but the standard library is needed. ``open_page(path)`` returns every request
the page made, every console message and log entry (CSP violations are log entries), uncaught exceptions, and
the rendered size and number of drawn elements of each ``.figure svg``; ``leaving`` lists the requests for
anything but the page itself and inline ``data:`` URIs (matplotlib's SVG carries its raster images inline).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--remote-debugging-pipe"]

FIGURES_JS = """JSON.stringify(Array.from(document.querySelectorAll('.figure svg')).map(s => {
  const r = s.getBoundingClientRect();
  return {width: r.width, height: r.height, drawn: s.querySelectorAll('path, rect, text, use, image').length};
}))"""


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            e = self._read(max(0.01, deadline - time.monotonic()))
            self.events.append(e)
            if e.get("method") == method:
                return e


def open_page(path: str | Path, *, settle_s: float = 0.5, screenshot: str | Path | None = None,
              width: int = 1280, height: int = 2000) -> dict[str, Any]:
    """Load ``path`` from disk; return {requests, console, exceptions, log, figures} (and write a PNG
    screenshot of the first ``height`` pixels when asked)."""
    import base64

    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="repsim-chromium-")
    log = open(Path(profile).with_suffix(".log"), "wb")  # noqa: SIM115 (closed in the finally below)
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire() -> None:  # in the child: the protocol's fds 3 (commands in) and 4 (replies out)
        a, b = os.dup(to_browser_r), os.dup(from_browser_w)  # above 4 first: the originals may sit on 3 or 4
        os.dup2(a, 3, inheritable=True)
        os.dup2(b, 4, inheritable=True)

    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log, preexec_fn=wire, close_fds=False)
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(proc, to_browser_w, from_browser_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        pipe.events.clear()
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=60)
        time.sleep(settle_s)
        figures = json.loads(pipe.send("Runtime.evaluate", {"expression": FIGURES_JS, "returnByValue": True},
                                       session=session)["result"]["value"])
        if screenshot is not None:
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "clip": {
                "x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, session=session)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        events = pipe.events
        with_method = [e for e in events if "method" in e]
        return {
            "requests": [e["params"]["request"]["url"] for e in with_method
                         if e["method"] == "Network.requestWillBeSent"],
            "console": [(e["params"]["type"], " ".join(str(a.get("value", a.get("description", "")))
                                                       for a in e["params"].get("args", [])))
                        for e in with_method if e["method"] == "Runtime.consoleAPICalled"],
            "exceptions": [e["params"]["exceptionDetails"].get("text", "") for e in with_method
                           if e["method"] == "Runtime.exceptionThrown"],
            "log": [(e["params"]["entry"]["level"], e["params"]["entry"].get("text", "")) for e in with_method
                    if e["method"] == "Log.entryAdded"],
            "figures": figures,
            "url": url,
            "leaving": [u for u in (e["params"]["request"]["url"] for e in with_method
                                    if e["method"] == "Network.requestWillBeSent")
                        if u != url and not u.startswith("data:")],
        }
    finally:
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
