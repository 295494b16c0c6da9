"""What the benchmarks share: the repository's paths, the frames they send, one driver of
KServe ``ModelStreamInfer`` streams, one reader of a server's Prometheus text, CPU time and
percentiles.

The benchmarks are modules of this package, run from the repository root
(``python -m benchmarks.serve_bench ...``), so ``pipeline``, ``clients`` and ``tests`` import
as they are, with no path set by hand.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clients.cli import SEND_QUALITY
from pipeline.images import encode_jpeg
from pipeline.tools.launch import local_server
from pipeline.tools.samples import NAMES, sample_rgb

ROOT = Path(__file__).resolve().parent.parent


def out_path(name: str) -> Path:
    """``out/<name>`` under the repository (out/ made if missing): where the benchmarks leave
    their servers' logs."""
    folder = ROOT / "out"
    folder.mkdir(exist_ok=True)
    return folder / name


def arguments(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is the module's docstring: its first line, then the rest as written
    (the commands it shows)."""
    lines = doc.splitlines()
    return argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[1:]))


def add_server_root(parser: argparse.ArgumentParser) -> None:
    """``--server-root``: the checkout whose server a benchmark runs (``checkout_server``)."""
    parser.add_argument("--server-root", type=Path, default=ROOT,
                        help="the checkout whose server runs (its code and model_repository/)")


def checkout_server(root: Path, *flags: str, **options):
    """``local_server`` run from the checkout ``root``: its code first on the path and its
    model_repository/, so one benchmark measures two versions of the server alike."""
    root = root.resolve()
    return local_server("--model-repository", str(root / "model_repository"), *flags, cwd=root,
                        env={**os.environ, "PYTHONPATH": str(root)}, **options)


# ------------------------------------------------------------------------------- frames


def jpeg(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB as the JPEG a camera client sends (quality 90, as the client CLI)."""
    return encode_jpeg(rgb, quality=SEND_QUALITY)


def sixteen_by_nine(rgb: np.ndarray) -> np.ndarray:
    """A 1280x720 frame, (720, 1280, 3) uint8: the photo's central 16:9 band, resized."""
    h, w = rgb.shape[:2]
    crop_h = min(h, w * 9 // 16)
    crop_w = crop_h * 16 // 9
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    band = Image.fromarray(rgb[top : top + crop_h, left : left + crop_w])
    return np.asarray(band.resize((1280, 720), Image.BILINEAR))


def workload(name: str) -> list[bytes]:
    """JPEGs of the sample photos (bus, zidane, astronaut, coffee, chelsea): ``photos`` as they
    are, ``16:9`` their 1280x720 bands, ``photos+16:9`` both, interleaved."""
    photos = [sample_rgb(n) for n in NAMES]
    if name == "photos":
        return [jpeg(p) for p in photos]
    if name == "16:9":
        return [jpeg(sixteen_by_nine(p)) for p in photos]
    if name == "photos+16:9":
        return [jpeg(f) for p in photos for f in (p, sixteen_by_nine(p))]
    raise SystemExit(f"unknown workload {name!r}: photos, 16:9 or photos+16:9")


# ------------------------------------------------------------------------------- KServe streams


@dataclass
class Result:
    """What streams got: frames answered, errors, the seconds they took, each answered frame's
    latency in ms."""

    frames: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def encoded(images: list[bytes], offset: int = 0) -> Callable[[int], list]:
    """Request k's inputs: image ``offset + k`` (cycling) as a BYTES tensor."""
    def inputs(k: int) -> list:
        tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[images[(offset + k) % len(images)]]], dtype=object))
        return [tensor]
    return inputs


def one_stream(target: str, model: str, inputs: Callable[[int], list], window: int, stop_at: float,
               out: list, max_frames: int | None = None) -> None:
    """A video client: at most ``window`` frames in flight on one ModelStreamInfer stream,
    sending ``inputs(k)`` for k = 0, 1, ... until ``stop_at`` (time.monotonic) or ``max_frames``.
    Answers come in order, so when frame k goes out, frame k - window has been answered."""
    client = triton.InferenceServerClient(target)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((time.perf_counter(), result, error)))
    sent: dict[str, float] = {}
    latencies, errors, k, in_flight = [], 0, 0, 0
    try:
        def sending() -> bool:
            return time.monotonic() < stop_at and (max_frames is None or k < max_frames)

        while sending() or in_flight:
            while in_flight < window and sending():
                request = inputs(k)
                sent[str(k)] = time.perf_counter()
                client.async_stream_infer(model, request, request_id=str(k),
                                          parameters={"response_mask_format": "rle"})
                k += 1
                in_flight += 1
            try:
                arrived, result, error = answers.get(timeout=120)
            except queue.Empty:
                errors += in_flight
                break
            in_flight -= 1
            if error is not None:
                errors += 1
                continue
            latencies.append((arrived - sent.pop(result.get_response().id)) * 1e3)
    finally:
        client.stop_stream()
        client.close()
    out.append((latencies, errors))


def drive(target: str, model: str, stream_inputs: Callable[[int], Callable[[int], list]], streams: int,
          window: int, seconds: float, warm_up: int = 5) -> Result:
    """``streams`` streams at once for ``seconds``, stream s sending ``stream_inputs(s)(k)``,
    after ``warm_up`` frames of stream 0's alone."""
    one_stream(target, model, stream_inputs(0), 1, time.monotonic() + 300, [], max_frames=warm_up)
    out: list = []
    start = time.perf_counter()
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=one_stream, args=(target, model, stream_inputs(s), window,
                                                         stop_at, out)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies = [x for lat, _ in out for x in lat]
    return Result(len(latencies), sum(e for _, e in out), elapsed, latencies)


# ------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Scrape:
    """One read of a server's /metrics: each sample's value by its name (as prometheus_client's
    parser gives it: a counter's samples end in ``_total``) and its labels, in any order."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly these labels; 0.0 where there is none."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """Every sample named ``name`` summed, whatever its labels."""
        return sum(value for (sample, _), value in self.values.items() if sample == name)

    def __sub__(self, before: Scrape) -> Scrape:
        """What changed since ``before``: each of this scrape's samples less its value then."""
        return Scrape({key: value - before.values.get(key, 0.0) for key, value in self.values.items()})


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """Read a server's Prometheus endpoint (plain HTTP, no token)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    return Scrape({(sample.name, frozenset(sample.labels.items())): sample.value
                   for family in text_string_to_metric_families(text) for sample in family.samples})


# ------------------------------------------------------------------------------- time


def cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user + system, /proc/PID/stat; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``values``; NaN when there are none (a run that served
    nothing prints NaN rather than failing)."""
    values = list(values)
    return float(np.percentile(values, q)) if values else float("nan")
