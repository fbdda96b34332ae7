"""A small Chrome DevTools Protocol driver for the web page tests: headless Chromium, one page, sync calls.

    with Browser.launch() as browser:
        page = browser.new_page(width=1280, height=800)
        page.navigate("http://127.0.0.1:8000/")
        page.wait_for("document.querySelector('#conn').dataset.state === 'connected'")
        page.click("#send"); page.type_text("hello"); page.press("Enter")
        page.screenshot(path)

Chromium is started with --remote-debugging-port=0 (it picks a free port and writes it, with the browser
target's path, to DevToolsActivePort in the profile directory); we attach to a new tab with a flattened session
over one websocket (the `websockets` package's sync client). Input goes through Input.* events, as a user's
would: clicks at an element's centre, text through insertText, keys through dispatchKeyEvent.

Limits: one connection, commands are sequential (no concurrent calls from threads); events are kept only as far
as the tests need them (console errors and uncaught exceptions, see `Page.errors`); Linux/macOS only (the
browser runs in its own process group, which close() kills).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The browser binary: $FLASHCHAT_CHROMIUM if set, else the first of CANDIDATES on PATH."""
    env = os.environ.get("FLASHCHAT_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen, profile: tempfile.TemporaryDirectory, ws_url: str):
        self.proc = proc
        self._profile = profile
        self._ws = connect(ws_url, max_size=64 << 20, open_timeout=10, legacy=True)  # screenshots: one big frame
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    @classmethod
    def launch(cls, binary: str | None = None, timeout: float = 20.0) -> Browser:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium found (tried $FLASHCHAT_CHROMIUM and {', '.join(CANDIDATES)})")
        profile = tempfile.TemporaryDirectory(prefix="flashchat-chromium-")
        args = [binary, "--headless=new", "--no-sandbox", "--remote-debugging-port=0",
                f"--user-data-dir={profile.name}", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
                "--disable-background-networking", "about:blank"]
        log_path = Path(profile.name) / "chromium.log"  # a file, not a pipe: a full pipe would stall the browser
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # own process group: close() kills the renderers too
        port_file = Path(profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            if port_file.exists():
                lines = port_file.read_text().split("\n")
                if len(lines) >= 2 and lines[1].strip():
                    break
            if proc.poll() is not None:
                err = log_path.read_text(errors="replace")[-2000:]
                profile.cleanup()
                raise BrowserError(f"{binary} exited with code {proc.returncode} before it opened its debugging "
                                   f"port:\n{err}")
            if time.monotonic() > deadline:
                _kill_group(proc)
                profile.cleanup()
                raise BrowserError(f"{binary} wrote no {port_file.name} within {timeout:.0f} s")
            time.sleep(0.05)
        ws_url = f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
        try:
            return cls(proc, profile, ws_url)
        except Exception:
            _kill_group(proc)
            profile.cleanup()
            raise

    def send(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout: float = 30.0) -> dict:
        """One CDP command; returns its result. Events that arrive meanwhile are appended to self.events."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:.0f} s")
            reply = json.loads(self._ws.recv(timeout=left))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')} ({reply['error']})")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def new_page(self, width: int = 1280, height: int = 800, mobile: bool = False) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime"):
            page.send(f"{domain}.enable")
        page.set_viewport(width, height, mobile)
        return page

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:  # the browser may already be gone; killing it is what matters
            pass
        _kill_group(self.proc)
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, target_id: str, session_id: str):
        self.browser, self.target_id, self.session_id = browser, target_id, session_id

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self.browser.send(method, params, self.session_id, timeout)

    def set_viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def add_init_script(self, source: str) -> None:
        """Run this JS in every document this page loads from now on, before the document's own scripts."""
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def navigate(self, url: str, timeout: float = 20.0) -> None:
        # A marker on the old document tells it from the new one (a reload keeps the same href and readyState).
        self.evaluate("window.__cdp_old_document = true")
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("!window.__cdp_old_document && document.readyState === 'complete'", timeout,
                      what=f"{url} to load")

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The value of a JS expression (promises awaited), returned by value; a thrown exception raises here."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JS exception in {expression[:200]!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.02, what: str | None = None):
        """Poll a JS expression until it is truthy; returns its value, or raises naming what was awaited.
        The value crosses as JSON: a DOM node arrives as {} (falsy here), so compare it with null in the JS."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.1f} s waiting for {what or expression}")
            time.sleep(interval)

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first element matching selector (scrolled into view)."""
        box = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect();
            return r.width && r.height ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null;
        }})()""")
        if box is None:
            raise BrowserError(f"no visible element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                                                   "clickCount": 1})

    def type_text(self, text: str) -> None:
        """Insert text at the focused element, as an IME commit would (fires input events)."""
        self.send("Input.insertText", {"text": text})

    def press(self, key: str) -> None:
        """Press and release a named key; Enter also produces its "\\r" character like a real keyboard."""
        codes = {"Enter": 13, "Escape": 27, "Tab": 9, "Backspace": 8}
        if key not in codes:
            raise BrowserError(f"press() knows {sorted(codes)}, not {key!r}")
        base = {"key": key, "code": key, "windowsVirtualKeyCode": codes[key]}
        down = dict(base, type="keyDown", text="\r") if key == "Enter" else dict(base, type="rawKeyDown")
        self.send("Input.dispatchKeyEvent", down)
        self.send("Input.dispatchKeyEvent", dict(base, type="keyUp"))

    def screenshot(self, path: str | os.PathLike) -> Path:
        """Save a PNG of the viewport."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions and console.error messages of this page so far."""
        out = []
        for ev in self.browser.events:
            if ev.get("sessionId") != self.session_id:
                continue
            if ev["method"] == "Runtime.exceptionThrown":
                d = ev["params"]["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif ev["method"] == "Runtime.consoleAPICalled" and ev["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in ev["params"]["args"]))
        return out


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
