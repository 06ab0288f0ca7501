"""The report in a real browser: headless Chromium, driven over the DevTools protocol.

Opens OUTPUT/report.html of the shared real run (which has script/markup payloads planted in a
key, a caption, a json sidecar and a tar member name, see test_report.py) and checks that it
renders without console errors or exceptions, that no payload ran (`window.__pwned` stays
undefined), that the page made no request other than itself (no network, no external
resources), that the thumbnails decode and the charts are there. Saves a screenshot to the
test's tmp dir, and to docs/report-screenshot.png (the README's picture) when
UPDATE_SCREENSHOT=1.

Needs /usr/bin/chromium (Debian package `chromium`; `scripts/install_chromium.sh` installs it,
`make test` runs that) or the binary named by $CHROMIUM. Without it the test skips, unless CI
is set (CI=true): then it fails.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_report import shared_runs  # the same real run as test_report.py (built once)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "report-screenshot.png"
WINDOW = (1280, 2000)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-extensions", "--mute-audio",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}"]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium() -> str:
    """The Chromium binary: $CHROMIUM when set (only that), else /usr/bin/chromium or PATH."""
    if os.environ.get("CHROMIUM"):
        candidates = [os.environ["CHROMIUM"]]
    else:
        candidates = ["/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    message = (f"headless Chromium not found ({', '.join(c for c in candidates if c)}): run "
               "scripts/install_chromium.sh (Debian package `chromium`)")
    if _ci():
        pytest.fail(f"CI is set but {message}")
    pytest.skip(message)


class Browser:
    """One Chromium process with --remote-debugging-port=0 and a minimal CDP client."""

    def __init__(self, chromium: str, profile: Path):
        self.profile = profile
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.ws = None
        self.events = []
        self._next_id = 0

    def endpoint(self, timeout: float = 60.0) -> str:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise AssertionError(f"chromium exited with {self.proc.returncode}: {err}")
            if port_file.exists():
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.1)
        raise AssertionError("chromium did not open its DevTools port in time")

    async def send(self, method: str, params=None, session=None, timeout: float = 30.0):
        self._next_id += 1
        msg_id = self._next_id
        message = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic()))
            reply = json.loads(raw)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    async def wait_for_event(self, method: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic()))
            reply = json.loads(raw)
            if "method" in reply:
                self.events.append(reply)

    async def drain(self, seconds: float) -> None:
        """Collect the events that arrive in the next `seconds` (late console messages)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                return
            reply = json.loads(raw)
            if "method" in reply:
                self.events.append(reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # the group of the process we started
                self.proc.wait(timeout=10)


async def _inspect(browser: Browser, url: str) -> dict:
    import websockets

    async with websockets.connect(browser.endpoint(), max_size=None) as ws:
        browser.ws = ws
        target = await browser.send("Target.createTarget", {"url": "about:blank"})
        session = (await browser.send("Target.attachToTarget",
                                      {"targetId": target["targetId"], "flatten": True}))[
            "sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await browser.send(f"{domain}.enable", session=session)
        await browser.send("Emulation.setDeviceMetricsOverride",
                           {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1,
                            "mobile": False}, session=session)
        await browser.send("Page.navigate", {"url": url}, session=session)
        await browser.wait_for_event("Page.loadEventFired", timeout=60)
        await browser.drain(0.5)

        async def evaluate(expression: str):
            result = await browser.send("Runtime.evaluate",
                                        {"expression": expression, "returnByValue": True},
                                        session=session)
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        facts = {
            "pwned": await evaluate("typeof window.__pwned"),
            "title": await evaluate("document.title"),
            "images": await evaluate("document.images.length"),
            "images_ok": await evaluate(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"),
            "charts": await evaluate("document.querySelectorAll('svg.chart').length"),
            "thresholds": await evaluate("document.querySelectorAll('line.threshold').length"),
            "scripts": await evaluate("document.scripts.length"),
            "accounting_rows": await evaluate(
                "document.querySelectorAll('#accounting-table tr[data-status]').length"),
        }
        shot = await browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        facts["png"] = base64.b64decode(shot["data"])
        await browser.send("Target.closeTarget", {"targetId": target["targetId"]})
    facts["events"] = browser.events
    return facts


def _problems(events) -> list:
    """Console errors/warnings, uncaught exceptions, failed loads, CSP violations."""
    problems = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(("exception", params["exceptionDetails"].get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning",
                                                                             "assert"):
            problems.append(("console", [a.get("value") for a in params.get("args", [])]))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            problems.append(("log", params["entry"].get("text")))
        elif method == "Network.loadingFailed":
            problems.append(("load failed", params.get("errorText")))
    return problems


@pytest.fixture(scope="session")
def chromium():   # session scope: checked before the session's model and run are built
    try:
        import websockets  # noqa: F401 (the DevTools client)
    except ImportError:
        message = "the `websockets` package is missing (pip install websockets)"
        if _ci():
            pytest.fail(f"CI is set but {message}")
        pytest.skip(message)
    return _chromium()


def test_report_renders_in_chromium_without_running_payloads(chromium, tmp_path_factory,
                                                             tiny_model_dir, tmp_path):
    from beam_curator.report import write_report

    runs = shared_runs(tmp_path_factory, tiny_model_dir)
    path = Path(write_report(runs["out"]))
    page = path.read_text(encoding="utf-8")
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page   # the payload is there

    browser = Browser(chromium, tmp_path / "profile")
    try:
        facts = asyncio.run(asyncio.wait_for(_inspect(browser, path.as_uri()), timeout=120))
    finally:
        browser.close()

    assert facts["pwned"] == "undefined"
    assert facts["scripts"] == 0
    assert facts["title"].startswith("Curation report")
    assert facts["images"] >= 4 and facts["images_ok"] is True
    assert facts["charts"] >= 4 and facts["thresholds"] >= 3
    assert facts["accounting_rows"] == len(runs["summary"]["counts"]) + 2
    assert _problems(facts["events"]) == []
    requests = [e["params"]["request"]["url"] for e in facts["events"]
                if e["method"] == "Network.requestWillBeSent"]
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests

    png = facts["png"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.size == WINDOW
        # not a blank page: many distinct colours (charts, thumbnails, text)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    (tmp_path / "report-screenshot.png").write_bytes(png)
    if os.environ.get("UPDATE_SCREENSHOT"):   # refresh the README's picture only when asked
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
