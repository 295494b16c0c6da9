"""Real media for the camera tests (and the camera benchmark): clips, an RTSP server, an HLS
server. Nothing here is faked: the clips are H.264 made from the bundled photos
(``pipeline.tools.samples``), the RTSP server is GStreamer's gst-rtsp-server in a process of
its own (``tests/rtsp_server.py``), the HLS playlist and segments are FFmpeg's.

- ``make_clip``: an H.264 MP4 of the photos, each shown for a while with a slow pan (so a
  tracker sees motion), cached under ``.cache/clips/`` by its parameters; ``scene_clip``: a
  clip of coloured blocks for the fake network (known detections);
- ``RtspServer``: mounts ``/NAME`` that each loop a clip forever, in real time, without
  re-encoding; ``stop()`` kills it (a camera dying) and ``start()`` brings it back on the
  same port; with ``user`` it asks for a password. ``rtsp_unavailable()`` says why it cannot
  run here, for ``pytest.skip``;
- ``HlsServer``: a clip cut by ``ffmpeg`` into a VOD playlist of ~1 s segments, served over
  HTTP (or HTTPS) on 127.0.0.1 from a thread. ``hls_unavailable()`` says why it cannot run here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from pipeline.tools.launch import free_port  # noqa: F401 - the tests' import too
from pipeline.tools.samples import NAMES

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / ".cache" / "clips"
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")
RTSP_ELEMENTS = ("multifilesrc", "h264parse", "rtph264pay")
CLIP_VERSION = 2  # bump when make_clip's pictures change, so cached clips are made again
PAN = 0.12  # how much larger than the frame a photo is scaled, the room its pan moves in




# ---------------------------------------------------------------------------------- clips


def make_clip(path: Path | None = None, *, seconds: float, fps: int = 10, size: tuple[int, int] = (1280, 720),
              photos: Sequence[str] = NAMES) -> Path:
    """An H.264 MP4 (yuv420p, a keyframe every ``fps`` frames, no B-frames) of ``seconds`` at
    ``fps``, ``size`` = (width, height): the photos in turn, each filling the frame and
    panning slowly, each for ``seconds / len(photos)`` but at least a second. Made once per
    parameters under ``.cache/clips/`` (``path``, if given, gets a copy of that)."""
    key = f"v{CLIP_VERSION}-{seconds}-{fps}-{size[0]}x{size[1]}-{','.join(photos)}"
    cached = CLIPS / f"clip-{hashlib.sha1(key.encode()).hexdigest()[:12]}.mp4"
    if not cached.exists():
        CLIPS.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a clip another session is writing is never read half made.
        with tempfile.NamedTemporaryFile(dir=CLIPS, suffix=".mp4", delete=False) as partial_file:
            temporary = Path(partial_file.name)
        try:
            _encode(temporary, seconds=seconds, fps=fps, size=size, photos=photos)
            os.chmod(temporary, 0o644)
            os.replace(temporary, cached)
        finally:
            temporary.unlink(missing_ok=True)
    if path is None:
        return cached
    shutil.copyfile(cached, path)
    return path


def _encode(path: Path, *, seconds: float, fps: int, size: tuple[int, int], photos: Sequence[str]) -> None:
    import av

    width, height = size
    count = max(1, round(seconds * fps))
    shown = max(fps, count // len(photos))  # frames per photo
    pictures = {name: _cover(name, size) for name in photos}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {
            "preset": "veryfast", "crf": "26",
            "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0:bframes=0"}
        for i in range(count):
            picture = pictures[photos[(i // shown) % len(photos)]]
            progress = (i % shown) / max(1, shown - 1)  # 0 -> 1 across the photo's time
            top, left = (_pan(picture.shape[0], height, progress), _pan(picture.shape[1], width, progress))
            crop = np.ascontiguousarray(picture[top:top + height, left:left + width])
            frame = av.VideoFrame.from_ndarray(crop, format="rgb24")
            frame.pts = i  # in 1/fps, the stream's rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def scene_clip(path: Path, *, seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (320, 192)) -> Path:
    """An H.264 clip (no B-frames) that the fake network (``tests/fakes.py``) sees: a red block
    moving right 4 px a frame, a blue one still, on grey; ``size`` = (width, height)."""
    import av

    from .fakes import COLOURS  # torch comes with it: only for the tests that use the fake network

    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"preset": "veryfast", "crf": "18", "x264-params": f"keyint={fps}:bframes=0"}
        for i in range(round(seconds * fps)):
            rgb = np.full((height, width, 3), 128, np.uint8)
            x = 16 + i * 4
            rgb[48:112, x:x + 64] = COLOURS["red"]
            rgb[120:176, 220:300] = COLOURS["blue"]
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _pan(picture: int, frame: int, progress: float) -> int:
    """Where the frame starts along one side of the picture: around the middle, moving at most
    ``PAN`` of the frame over the photo's time (a tracker's objects move, but not far)."""
    room = min(picture - frame, round(frame * PAN))
    return (picture - frame - room) // 2 + round(room * progress)


@functools.cache
def _cover(name: str, size: tuple[int, int]) -> np.ndarray:
    """The photo scaled (keeping its shape) to cover ``size`` plus the pan's room."""
    from PIL import Image

    from pipeline.tools.samples import sample_rgb

    photo = Image.fromarray(sample_rgb(name))
    scale = max(size[0] / photo.width, size[1] / photo.height) * (1 + PAN)
    scaled = photo.resize((max(size[0], round(photo.width * scale)), max(size[1], round(photo.height * scale))),
                          Image.Resampling.BILINEAR)
    return np.asarray(scaled.convert("RGB"))


# ------------------------------------------------------------------------------------ RTSP


@functools.cache
def rtsp_unavailable() -> str | None:
    """None when ``RtspServer`` can run here, else why not (for ``pytest.skip``)."""
    if not Path(SYSTEM_PYTHON).is_file():
        return f"no {SYSTEM_PYTHON} to run GStreamer's RTSP server"
    check = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             f"print(' '.join(e for e in {RTSP_ELEMENTS!r} if Gst.ElementFactory.find(e) is None))")
    try:
        found = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} could not check GStreamer: {exc}"
    if found.returncode != 0:
        return (f"{SYSTEM_PYTHON} has no GStreamer RTSP server (python3-gi, gir1.2-gst-rtsp-server-1.0): "
                f"{found.stderr.strip().splitlines()[-1:]}")
    if found.stdout.strip():
        return f"GStreamer lacks the elements {found.stdout.strip()} (gstreamer1.0-plugins-good / -bad)"
    return None


def annex_b(clip: Path) -> Path:
    """The clip's H.264 as an Annex-B elementary stream (``.h264`` beside it), copied, not
    re-encoded: what the RTSP server loops."""
    import av

    target = clip.with_suffix(".h264")
    if target.exists() and target.stat().st_mtime >= clip.stat().st_mtime:
        return target
    with tempfile.NamedTemporaryFile(dir=clip.parent, suffix=".h264", delete=False) as partial_file:
        temporary = Path(partial_file.name)
    try:
        # FFmpeg's raw h264 muxer turns MP4's length-prefixed units into start codes itself.
        with av.open(str(clip)) as source, av.open(str(temporary), "w", format="h264") as target_file:
            video = source.streams.video[0]
            copied = target_file.add_stream_from_template(video)
            for packet in source.demux(video):
                if packet.dts is not None:  # the demuxer's empty packet at the end
                    packet.stream = copied
                    target_file.mux(packet)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def frame_rate(clip: Path) -> int:
    import av

    with av.open(str(clip)) as container:
        return round(container.streams.video[0].average_rate)


class RtspServer:
    """GStreamer's RTSP server in a process of its own, serving ``rtsp://127.0.0.1:PORT/NAME``
    for each ``clips[NAME]`` (an H.264 MP4 without B-frames, as ``make_clip`` makes them),
    looped forever in real time; every client of a mount watches one shared media. ``stop()`` kills the process (SIGKILL: a camera losing
    power, no RTSP goodbye); ``start()`` again serves on the same port. ``user``: (name,
    password) every client must give, as a camera with a password asks (``url(name, user=...)``
    puts them in the URL)."""

    def __init__(self, clips: dict[str, Path], port: int | None = None, user: tuple[str, str] | None = None):
        self.clips = dict(clips)
        self.port = port
        self.user = user
        self._process: subprocess.Popen | None = None
        self._log = None

    def url(self, name: str, user: tuple[str, str] | None = None) -> str:
        """The mount's URL, with ``user`` (name, password) in it when given."""
        if name not in self.clips:
            raise KeyError(f"no mount {name!r}; have {', '.join(self.clips)}")
        if self.port is None:
            raise RuntimeError("the RTSP server has not started yet: its port is not known")
        credentials = f"{user[0]}:{user[1]}@" if user else ""
        return f"rtsp://{credentials}127.0.0.1:{self.port}/{name}"

    def start(self, timeout_s: float = 20.0) -> RtspServer:
        """Start serving and return once the server listens (its port then known)."""
        if self._process is not None:
            raise RuntimeError("the RTSP server is running already")
        mounts = [f"{name}={annex_b(clip)}@{frame_rate(clip)}" for name, clip in self.clips.items()]
        # GStreamer's warnings go to a file: a pipe nobody reads would fill and stall the server.
        self._log = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_SCRIPT), "--port", str(self.port or 0),
             *(["--user", ":".join(self.user)] if self.user else []), *mounts],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})  # not the venv's
        listening = _first_line(self._process, timeout_s)
        if not listening.startswith("listening "):
            self._process.kill()
            self._process.wait()
            self._log.seek(0)
            log = self._log.read()[-2000:]
            self.stop()
            raise RuntimeError(f"the RTSP server did not start: {listening!r} {log}")
        self.port = int(listening.split()[1])
        return self

    def stop(self) -> None:
        """Kill the server at once (SIGKILL), as a camera dies: no RTSP TEARDOWN, no goodbye."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._log.close()
        self._process = None

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The process's first line of stdout, or "" when it exits or ``timeout_s`` passes first."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0].strip() if lines else ""


# ------------------------------------------------------------------------------------- HLS


@functools.cache
def hls_unavailable() -> str | None:
    """None when ``HlsServer`` can run here, else why not (for ``pytest.skip``)."""
    if shutil.which("ffmpeg") is None:
        return "no ffmpeg on PATH to cut the HLS segments (apt-get install ffmpeg)"
    return None


class HlsServer:
    """A clip as an HLS VOD playlist (``index.m3u8``, ~1 s MPEG-TS segments cut at the clip's
    keyframes by ``ffmpeg -c copy``: no re-encoding), served over HTTP on 127.0.0.1 from a
    thread of this process (over HTTPS with ``tls``: the (certificate, key) PEM files it
    shows). The playlist ends (``#EXT-X-ENDLIST``): a reader plays it once."""

    def __init__(self, clip: Path, folder: Path | None = None, tls: tuple[Path, Path] | None = None):
        self.clip = clip
        self.tls = tls
        self._owned = folder is None  # a folder of its own is removed on stop
        self.folder = Path(tempfile.mkdtemp(prefix="hls-")) if folder is None else folder
        self._http: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the HLS server has not started")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._http.server_address[1]}/index.m3u8"

    def start(self) -> HlsServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cut = subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(self.clip), "-c", "copy", "-f", "hls",
             "-hls_time", "1", "-hls_playlist_type", "vod",
             "-hls_segment_filename", str(self.folder / "segment%03d.ts"), str(self.folder / "index.m3u8")],
            capture_output=True, text=True, timeout=60)
        if cut.returncode != 0:
            raise RuntimeError(f"ffmpeg could not cut {self.clip} into HLS: {cut.stderr[-2000:]}")
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(self.folder)))
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        threading.Thread(target=self._http.serve_forever, name="hls-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> HlsServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the standard library's name
        pass
