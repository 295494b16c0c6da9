"""A real browser for the page tests: Debian's ``chromium``, headless, driven over the Chrome
DevTools protocol (its JSON messages on a websocket: aiohttp's client, no new dependency).

``Chromium`` starts the process on a free debugging port with a profile of its own, opens one
page and talks to it: ``navigate``, ``evaluate`` (a JavaScript expression's value, promises
awaited), ``wait_for`` (an expression until it is truthy) and ``screenshot`` (PNG bytes).
``unavailable()`` says why the browser cannot run here, for a skip."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time

import aiohttp

from .brokers import unavailable as binary_unavailable

CHROMIUM = "chromium"  # Debian's package (`make services` installs it)
WINDOW = (1280, 800)


def unavailable() -> str | None:
    return binary_unavailable(CHROMIUM)


class Chromium:
    """``async with Chromium() as browser``: one headless page, stopped and its profile removed
    on exit."""

    def __init__(self):
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self._process: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Chromium:
        self._process = subprocess.Popen(
            [shutil.which(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = await asyncio.to_thread(self._debugging_port)
        self._session = aiohttp.ClientSession()
        deadline = time.monotonic() + 20
        while True:  # the first page appears shortly after the port opens
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as reply:
                pages = [t for t in await reply.json() if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert pages, "chromium opened no page"
        self._socket = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Emulation.setDeviceMetricsOverride",
                        width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1, mobile=False)
        return self

    def _debugging_port(self, timeout_s: float = 30.0) -> int:
        """The port chromium chose, from the line it prints on stderr once it listens."""
        deadline = time.monotonic() + timeout_s
        lines = []
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line and self._process.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError("chromium did not open its debugging port: " + "".join(lines)[-2000:])

    async def __aexit__(self, *exc_info) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._session is not None:
            await self._session.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stderr.close()
        self._profile.cleanup()

    async def send(self, method: str, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        call = next(self._ids)
        await self._socket.send_str(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads((await self._socket.receive(timeout=60)).data)
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url))

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0):
        """``expression``'s value once it is truthy; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout_s} s: {expression}")
            await asyncio.sleep(0.2)

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
