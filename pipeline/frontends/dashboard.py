"""The live page: ``/dashboard`` on the HTTP port, for a person who leaves it open.

One static page and its script (``static/``, package files: no build step, no CDN, no fonts
from elsewhere) poll one JSON document, ``/dashboard/api/state``, every second, and each
stream's latest frame with its masks drawn, ``/dashboard/api/frames/{id}`` (JPEG). The page
and its script hold no data, so they are served without the token (``PAGES``); everything
else goes through the same bearer check as every route, so with ``--token`` the page asks for
the token, keeps it in the tab's sessionStorage and sends it as ``Authorization: Bearer``
(never in a URL). Its actions call the camera API itself (``/v1/streams``).

What the document holds is read from the books that exist: the streams' status (the camera
API's own), their latest frames' times (``CameraStream.times``, which Roboflow's latency
reports read too), the ledger's per-model totals and requests by way in.
Frames come from one subscription to every stream's results with frames (the gRPC
``Subscribe`` mechanism), opened while the page is watched and closed ``IDLE_S`` after the
last poll, so a server nobody watches keeps no frames for it. ``--no-dashboard`` mounts none
of it (404).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from importlib import resources

import numpy as np
from aiohttp import web

from .. import schema
from ..cameras.streams import CameraResult, CameraStream, CameraStreams, Subscription
from ..errors import LimitError, NotFoundError
from ..images import encode_jpeg
from ..repository import runtime_of
from ..serving.state import ServingState
from ..telemetry import Histogram
from .kserve import SERVER_VERSION

LOG = logging.getLogger(__name__)
PAGE, SCRIPT = "/dashboard", "/dashboard/static/dashboard.js"
PAGES = frozenset({PAGE, SCRIPT})  # served without the token: they hold no data
IDLE_S = 30.0  # the frames' subscription closes this long after the page last asked
FRAME_LONG_SIDE = 960  # frames are drawn at most this wide or high: a page, not an archive
_STATIC = resources.files(__package__) / "static"


def _ms(histogram: Histogram, q: float) -> float | None:
    seconds = histogram.quantile(q)
    return None if seconds is None else round(seconds * 1000, 1)


def _lag_ms(stream: CameraStream, q: float) -> float | None:
    """The ``q`` quantile (0..1) of the stream's lag, decoded to answered, over its latest
    answered frames (``FRAME_TIMES``: how late it is now, not since it started), in ms."""
    lags = [t.answered - t.decoded for t in stream.times]
    return round(float(np.quantile(lags, q)) * 1000, 1) if lags else None


def _resident_mb() -> float | None:
    """The process's resident memory (Linux's /proc), or None where there is none."""
    try:
        with open("/proc/self/statm") as statm:
            return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return None


def overlay_jpeg(result: CameraResult) -> bytes:
    """A camera result's frame with its masks, boxes and labels drawn (``overlay.draw``: each
    tracked object in its own colour, its id in its label), at most ``FRAME_LONG_SIDE``. The
    frame may have been reduced on decoding; the detections are at the source's size, so it
    is drawn at that size. CPU work: run in a worker thread."""
    from PIL import Image

    from ..overlay import draw

    (det,) = result.answer.detections
    rgb = result.rgb
    height, width = det.image_size
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height)))
    picture = draw(rgb, schema.predictions(det, result.answer.pipe.class_names, "rle"))
    picture.thumbnail((FRAME_LONG_SIDE, FRAME_LONG_SIDE))
    return encode_jpeg(picture)


class Dashboard:
    """The page's routes and what they read. ``started``: the server's start (epoch seconds);
    ``threads``: the split of the cores (``server.ThreadBudget``)."""

    def __init__(self, state: ServingState, cameras: CameraStreams, *, threads, started: float):
        self.state, self.cameras, self.threads, self.started = state, cameras, threads, started
        self._latest: dict[str, CameraResult] = {}  # stream id -> its latest answered result
        self._drawn: dict[str, tuple[int, bytes]] = {}  # stream id -> (frame index, its JPEG)
        self._watched = 0.0  # monotonic: when the page last asked
        self._subscription: Subscription | None = None
        self._frames_note = ""  # why there are no frames, if the subscription was refused

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(PAGE, self.page)
        r.add_get(SCRIPT, self.script)
        r.add_get("/dashboard/api/state", self.document)
        r.add_get("/dashboard/api/frames/{id}", self.frame)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=(_STATIC / "dashboard.html").read_text(), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def script(self, request: web.Request) -> web.Response:
        return web.Response(text=(_STATIC / "dashboard.js").read_text(),
                            content_type="application/javascript", headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ frames

    def _watch(self) -> None:
        """The page asked: keep (or open) the subscription that brings the frames."""
        self._watched = time.monotonic()
        if self._subscription is not None:
            return
        try:
            self._subscription = self.cameras.subscribe("", frames=True)
        except LimitError as exc:
            self._frames_note = f"no frames: {exc}"
            return
        self._frames_note = ""
        asyncio.ensure_future(self._collect(self._subscription))

    async def _collect(self, subscription: Subscription) -> None:
        """Keep each stream's latest answered result, until nobody has asked for ``IDLE_S``
        (or the server drains, which ends every subscription)."""
        try:
            async for result in subscription:
                if result.answer is not None and result.rgb is not None:
                    self._latest[result.stream_id] = result
                if time.monotonic() - self._watched > IDLE_S:
                    break
        finally:
            self.cameras.unsubscribe(subscription)
            self._subscription = None
            self._latest.clear()
            self._drawn.clear()

    async def frame(self, request: web.Request) -> web.Response:
        stream_id = request.match_info["id"]
        self.cameras.get(stream_id)  # NotFoundError (404) for a stream that is not there
        self._watch()
        result = self._latest.get(stream_id)
        if result is None:
            raise NotFoundError(self._frames_note or f"stream {stream_id!r} has no answered frame yet")
        drawn = self._drawn.get(stream_id)
        if drawn is None or drawn[0] != result.frame_index:
            drawn = (result.frame_index, await asyncio.to_thread(overlay_jpeg, result))
            self._drawn[stream_id] = drawn
        return web.Response(body=drawn[1], content_type="image/jpeg",
                            headers={"Cache-Control": "no-store", "X-Frame-Index": str(drawn[0])})

    # ------------------------------------------------------------------ the document

    async def document(self, request: web.Request) -> web.Response:
        self._watch()
        streams = self.cameras.all()
        for gone in set(self._latest) - {s.id for s in streams}:
            self._latest.pop(gone, None)
            self._drawn.pop(gone, None)
        return web.json_response({
            "server": self._server(), "requests": self._requests(), "models": self._models(),
            "streams": [self._stream(s) for s in streams], "frames_note": self._frames_note})

    def _server(self) -> dict:
        budget = self.threads
        return {"version": SERVER_VERSION, "uptime_s": round(time.time() - self.started, 1),
                "threads": threading.active_count(),
                "network_threads": budget.network if budget else None,
                "worker_threads": budget.workers if budget else None,
                "memory_mb": _resident_mb(), "draining": self.state.draining}

    def _requests(self) -> list[dict]:
        """Requests so far by way in: answered, and failed by reason (the page makes rates)."""
        by_api: dict[str, dict] = {}
        for (api, outcome), count in sorted(self.state.ledger.requests_by_api().items()):
            row = by_api.setdefault(api, {"api": api, "ok": 0, "failed": 0, "errors": {}})
            if outcome == "ok":
                row["ok"] += count
            else:
                row["failed"] += count
                row["errors"][outcome] = count
        return list(by_api.values())

    def _models(self) -> list[dict]:
        state, ledger = self.state, self.state.ledger
        rows = []
        # Not the networks inside pipelines: the index lists them NotFound, as nothing to call.
        names = set(state.pipelines) | {n for n, why in state.unavailable.items() if not isinstance(why, NotFoundError)}
        for name in sorted(names):
            pipe = state.pipelines.get(name)
            totals = ledger.totals(name)
            rows.append({
                "name": name, "state": "READY" if pipe else "UNAVAILABLE",
                "reason": None if pipe else str(state.unavailable[name]),
                "runtime": runtime_of(pipe.network_entry) if pipe else None,
                "batch_limit": pipe.batch_limit if pipe else None,
                "queued": totals.queued, "executing": totals.executing,
                "queue_p50_ms": _ms(totals.latency["queue"], 0.5),
                "queue_p99_ms": _ms(totals.latency["queue"], 0.99),
                "compute_p50_ms": _ms(totals.latency["compute_infer"], 0.5),
                "compute_p99_ms": _ms(totals.latency["compute_infer"], 0.99)})
        return rows

    def _stream(self, stream: CameraStream) -> dict:
        status = stream.status()
        latest = self._latest.get(stream.id)
        return {**{key: status.get(key) for key in (
                    "stream_id", "source", "model", "state", "error_code", "last_error", "fps_in", "fps_out",
                    "frames_dropped", "frames_out", "sinks")},
                "lag_p50_ms": _lag_ms(stream, 0.5), "lag_p99_ms": _lag_ms(stream, 0.99),
                "frame_index": None if latest is None else latest.frame_index}
