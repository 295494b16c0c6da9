"""Frame sources for the CLI: a video file, a folder of images, an RTSP/HTTP stream URL, or a
webcam index. Video is decoded with PyAV (FFmpeg); frames come out as (H, W, 3) uint8 RGB."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass(frozen=True)
class SourceFrame:
    index: int
    timestamp: float  # seconds from the start of the source
    rgb: np.ndarray   # (H, W, 3) uint8


def describe(spec: str) -> str:
    if spec.isdigit():
        return f"webcam {spec}"
    if spec.startswith(STREAM_SCHEMES):
        return f"stream {spec}"
    return f"folder {spec}" if Path(spec).is_dir() else f"video {spec}"


def frames(spec: str, max_frames: int | None = None) -> Iterator[SourceFrame]:
    """Frames of ``spec`` in order; raises FileNotFoundError / ValueError with the reason."""
    produced = 0
    for frame in _frames(spec):
        if max_frames is not None and produced >= max_frames:
            return
        produced += 1
        yield frame


def frame_rate(spec: str) -> float:
    """Frames per second of a video source (for writing annotated video); 10 if unknown."""
    if spec.isdigit() or Path(spec).is_dir():
        return 10.0
    import av

    try:
        with av.open(spec) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else 10.0
    except Exception:  # noqa: BLE001 - only a hint for the writer
        return 10.0


def check(spec: str) -> None:
    """Fail early, before any connection, for a local source that cannot work."""
    if spec.isdigit() or spec.startswith(STREAM_SCHEMES):
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder")
    if path.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        raise ValueError(folder_hint(path))


def folder_hint(path: Path) -> str:
    return f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})"


def _frames(spec: str) -> Iterator[SourceFrame]:
    check(spec)
    if Path(spec).is_dir():
        yield from _folder(Path(spec))
    else:
        yield from _video(spec)


def _folder(folder: Path) -> Iterator[SourceFrame]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(folder_hint(folder))
    for i, path in enumerate(files):
        with Image.open(path) as img:
            yield SourceFrame(i, float(i), np.array(img.convert("RGB")))


def _video(spec: str) -> Iterator[SourceFrame]:
    import av

    options = {}
    kwargs = {}
    if spec.isdigit():
        kwargs = {"format": "v4l2"}
        spec = f"/dev/video{spec}"
    elif spec.startswith(("rtsp://", "rtsps://")):
        options = {"rtsp_transport": "tcp"}
    try:
        container = av.open(spec, options=options, **kwargs)
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot open {spec}: {exc}") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{spec} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            timestamp = float(frame.time) if frame.time is not None else float(i)
            yield SourceFrame(i, timestamp, frame.to_ndarray(format="rgb24"))


class VideoWriter:
    """Annotated frames to an H.264 file (PyAV / libx264)."""

    def __init__(self, path: Path, fps: float):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=max(1, round(fps)))
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}
        self._sized = False

    def write(self, rgb: np.ndarray) -> None:
        import av

        if not self._sized:
            # H.264 with 4:2:0 chroma needs even sides.
            self.stream.height, self.stream.width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
            self._sized = True
        rgb = rgb[: self.stream.height, : self.stream.width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
