"""The live page, ``/dashboard``, in a real browser: Debian's headless chromium (``tests/browser``)
against an in-process server running a real camera stream (a file, decoded by FFmpeg, played
in real time). The live stream runs the real default model (yolov5s-seg) on a clip of the
sample photos, as a user sees it; the token and ``--no-dashboard`` tests check access, not
masks, and run the fake network (``tests/fakes.py``), which answers in milliseconds.

Checked: once the page's scripts ran, the DOM names the stream, its state and its model, and
its latest frame (masks drawn) is shown; pausing from the page pauses the stream (as the camera
API says); with ``--token`` the page shows nothing without the token (no stream id in the DOM,
the frame and state endpoints 401) and everything once it is entered; ``--no-dashboard`` leaves
no page and no endpoint (404).

Each run writes the browser's screenshot to ``.cache/artefacts/dashboard.png``. With
``DASHBOARD_SCREENSHOT=docs/images/dashboard.png`` it also writes the documentation's picture
there (1280x800, colours reduced to stay small).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.repository import runtime_of
from pipeline.schema import rows

from ..browser import Chromium, unavailable
from ..cameras import make_clip, scene_clip
from ..conftest import ROOT, running_server, wait_until

TOKEN = "dash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARTEFACTS = ROOT / ".cache/artefacts"
MODEL = "instance_segmentation"  # the pipeline's name in the shipped and the fake repository
needs_chromium = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard-clips")
    scene_clip(folder / "scene.mp4", seconds=120)  # longer than the tests: the stream stays live
    return folder


@pytest.fixture(scope="module")
def photo_clips(tmp_path_factory):
    """A folder with ``street.mp4``: the bus photo (a bus, people) panning slowly, longer
    than the test, so the stream stays live."""
    folder = tmp_path_factory.mktemp("dashboard-photos")
    make_clip(folder / "street.mp4", seconds=90, fps=10, size=(640, 480), photos=("bus",))
    return folder


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def add_stream(server, stream_id: str, headers=None, source: str = "scene.mp4") -> None:
    reply = requests.post(url(server, "/v1/streams"), headers=headers, timeout=30,
                          json={"source": source, "stream_id": stream_id, "track": True})
    assert reply.status_code == 201, reply.text


def wait_until_tracked(server, stream_id: str, wanted: set[str], timeout_s: float = 60.0) -> None:
    """Return once an answered frame of the stream has each class of ``wanted`` with a
    confirmed tracker id (what the drawn frame labels), read from the stream's results as a
    subscriber gets them; AssertionError if the stream ends first, TimeoutError after
    ``timeout_s``."""
    async def watch() -> None:
        subscription = server.server.cameras.subscribe(stream_id)
        try:
            async for result in subscription:
                if result.answer is not None:
                    (det,) = result.answer.detections
                    found = {row.class_name for row in rows(det, result.answer.pipe.class_names)
                             if row.tracker_id >= 0}
                    if wanted <= found:
                        return
        finally:
            server.server.cameras.unsubscribe(subscription)
        raise AssertionError(f"the stream {stream_id!r} ended before it tracked {wanted}")
    server.call(asyncio.wait_for(watch(), timeout_s), timeout=timeout_s + 5)


def shown_frame(stream_id: str) -> str:
    """JavaScript: the width of the stream's frame as the browser decoded it (0: none yet)."""
    return f"document.querySelector('[data-stream-id={json.dumps(stream_id)}] img')?.naturalWidth"


def small_png(png: bytes) -> bytes:
    """A screenshot for the docs: its colours reduced to a palette, so it stays small."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=96).save(out, format="PNG", optimize=True)
    return out.getvalue()


@needs_chromium
def test_the_page_shows_a_live_stream_with_its_frame_and_pauses_it(photo_clips):
    with running_server(stream_source_dir=str(photo_clips)) as server:  # the shipped repository
        add_stream(server, "lobby", source="street.mp4")
        # The page opens once the tracker has confirmed people and the bus: the frames it
        # shows (the screenshot's) have their masks and ids drawn.
        wait_until_tracked(server, "lobby", {"person", "bus"})
        runtime = runtime_of(server.server.state.pipelines[MODEL].network_entry)

        async def look() -> bytes:
            async with Chromium() as browser:
                await browser.navigate(url(server, "/dashboard"))
                await browser.wait_for("document.body.innerText.includes('fps in')")
                text = await browser.evaluate("document.body.innerText")
                card = await browser.evaluate("document.querySelector('[data-stream-id=\"lobby\"]').innerText")
                assert "lobby" in card and "running" in card and MODEL in card and "street.mp4" in card
                assert f"{MODEL}\tREADY\t{runtime}" in text and "camera" in text  # the models', requests' tables
                assert await browser.wait_for(shown_frame("lobby")) > 0
                shot = await browser.screenshot()
                await browser.evaluate("document.querySelector('button[data-action=pause][data-stream=lobby]').click()")
                await browser.wait_for("!!document.querySelector('[data-stream-id=\"lobby\"] .state-paused')")
                return shot

        shot = asyncio.run(look())
        status = requests.get(url(server, "/v1/streams/lobby"), timeout=30).json()
        assert status["state"] == "paused"
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "dashboard.png").write_bytes(shot)
    assert Image.open(io.BytesIO(shot)).size == (1280, 800)
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        picture = ROOT / os.environ["DASHBOARD_SCREENSHOT"]
        picture.parent.mkdir(parents=True, exist_ok=True)
        picture.write_bytes(small_png(shot))


@needs_chromium
def test_with_a_token_the_page_shows_nothing_until_it_is_entered(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), token=TOKEN) as server:
        add_stream(server, "secret-cam", AUTH)
        for path in ("/dashboard/api/state", "/dashboard/api/frames/secret-cam"):
            assert requests.get(url(server, path), timeout=30).status_code == 401, path
            assert requests.get(url(server, path), headers={"Authorization": "Bearer nope"},
                                timeout=30).status_code == 401, path

        async def look() -> None:
            async with Chromium() as browser:
                await browser.navigate(url(server, "/dashboard"))
                await browser.wait_for("!document.getElementById('login').hidden")
                await asyncio.sleep(2)  # a few polls: still nothing
                page = await browser.evaluate("document.documentElement.outerHTML")
                assert "secret-cam" not in page and MODEL not in page
                await browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                                       "document.getElementById('login-form').requestSubmit()")
                await browser.wait_for("document.body.innerText.includes('secret-cam')")
                assert await browser.wait_for(shown_frame("secret-cam")) > 0
                assert await browser.evaluate("document.getElementById('login').hidden")

        asyncio.run(look())
        frame = requests.get(url(server, "/dashboard/api/frames/secret-cam"), headers=AUTH, timeout=30)
        assert frame.status_code == 200 and frame.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(frame.content)).size == (320, 192)


def test_no_dashboard_leaves_no_page_and_no_endpoint(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), no_dashboard=True) as server:
        add_stream(server, "hall")
        for path in ("/dashboard", "/dashboard/static/dashboard.js", "/dashboard/api/state",
                     "/dashboard/api/frames/hall"):
            assert requests.get(url(server, path), timeout=30).status_code == 404, path
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips)) as server:
        page = requests.get(url(server, "/dashboard"), timeout=30)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        state = requests.get(url(server, "/dashboard/api/state"), timeout=30).json()
        assert state["streams"] == [] and state["server"]["version"]
        missing = requests.get(url(server, "/dashboard/api/frames/nowhere"), timeout=30)
        assert missing.status_code == 404 and "nowhere" in str(missing.json())



def test_a_streams_lag_is_read_from_its_latest_frames_times(fake_root, clips):
    """lag p50/p99: decoded to answered over the stream's latest answered frames, the same
    times Roboflow's latency reports average (``CameraStream.times``)."""
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips)) as server:
        add_stream(server, "lag")
        wait_until(lambda: requests.get(url(server, "/v1/streams/lag"), timeout=30).json()["frames_out"] >= 5, 30)
        assert requests.post(url(server, "/v1/streams/lag/pause"), timeout=30).status_code == 200
        time.sleep(0.5)  # the frame in the batcher, if any, answered: the times hold still
        stream = requests.get(url(server, "/dashboard/api/state"), timeout=30).json()["streams"][0]
        times = list(server.server.cameras.get("lag").times)
        assert len(times) >= 5 and times == list(server.server.cameras.get("lag").times)
        lags = [t.answered - t.decoded for t in times]
        assert 0 < stream["lag_p50_ms"] <= stream["lag_p99_ms"]
        assert (stream["lag_p50_ms"], stream["lag_p99_ms"]) == tuple(
            round(float(np.quantile(lags, q)) * 1000, 1) for q in (0.5, 0.99))
