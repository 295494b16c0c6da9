"""Hostile camera sources against a real server in-process (the fake network), with real files
made by ffmpeg: a file source plays one video file inside ``--stream-source-dir`` and reads
nothing else, and a source the system cannot use, or one of 20 MB, is a short 400 /
INVALID_ARGUMENT that names no folder of the server's and leaves no traceback in the log.

The folder: ``clips/`` is the source folder, ``outside.mp4`` lies beside it. The playlists in
``clips/`` name ``outside.mp4`` as an absolute path, as ``../outside.mp4`` and as a ``file:``
URL; FFmpeg's HLS demuxer would follow each (it did: they ran and were inferred).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from clients.client import ClientError, SegmentationClient

from ..cameras import hls_unavailable, scene_clip
from ..conftest import wait_until
from .conftest import http, remove_streams, running_server

FRAMES = 30  # scene_clip's 3 s at 10 fps
LONG = 20 * 1024 * 1024  # a 20 MB source, well under the 64 MB body limit
SHORT = 400  # what an error may take: its words and a bounded prefix of what was sent

HLS_VOD = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:3
#EXT-X-PLAYLIST-TYPE:VOD
#EXTINF:3.0,
{entry}
#EXT-X-ENDLIST
"""
# The same clip in each container a file source plays: ffmpeg's arguments for each file.
CONTAINERS = {"scene.mkv": ["-c", "copy"], "scene.avi": ["-c", "copy"], "scene.ts": ["-c", "copy"],
              "scene.mov": ["-c", "copy"], "scene.flv": ["-c", "copy"], "scene.h264": ["-c", "copy", "-f", "h264"],
              "scene.hevc": ["-c:v", "libx265", "-x265-params", "log-level=error", "-f", "hevc"]}


def ffmpeg(*arguments: str) -> None:
    done = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *arguments],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    reason = hls_unavailable()  # ffmpeg on PATH
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("hostile-sources")
    clips = base / "clips"
    clips.mkdir()
    outside = scene_clip(base / "outside.mp4")
    scene_clip(clips / "scene.mp4")
    for name, arguments in CONTAINERS.items():
        ffmpeg("-i", str(clips / "scene.mp4"), *arguments, str(clips / name))
    for name, entry in (("absolute.m3u8", str(outside)), ("parent.m3u8", "../outside.mp4"),
                        ("file-url.m3u8", f"file:{outside}")):
        (clips / name).write_text(HLS_VOD.format(entry=entry))
    (clips / "list.ffconcat").write_text("ffconcat version 1.0\nfile scene.mp4\n")  # safe, and refused all the same
    (clips / "loop.mp4").symlink_to("loop.mp4")
    (clips / "ping.mp4").symlink_to("pong.mp4")
    (clips / "pong.mp4").symlink_to("ping.mp4")
    return base


@pytest.fixture(scope="module")
def cam_server(fake_root, base):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(base / "clips"),
                        allow_stream_urls=True, stream_url_allow=("127.0.0.1",)) as running:
        yield running


@pytest.fixture
def cams(cam_server):
    """The server, its streams removed after each test, however it ended."""
    yield cam_server
    remove_streams(cam_server)




def ended(server, stream_id: str, frames: int = 0, timeout_s: float = 30.0) -> dict:
    """The stream's status once it is failed or stopped, with ``frames`` results out."""
    def final():
        status = http(server, "GET", f"/v1/streams/{stream_id}")[1]
        return status if status["state"] in ("failed", "stopped") and status["frames_out"] >= frames else None
    return wait_until(final, timeout_s)


# -------------------------------------------------------------- what a file source may open


@pytest.mark.parametrize("playlist", ["absolute.m3u8", "parent.m3u8", "file-url.m3u8", "list.ffconcat"])
def test_a_playlist_in_the_folder_plays_nothing(cams, playlist):
    code, added = http(cams, "POST", "/v1/streams", {"source": playlist, "stream_id": "list", "realtime": False})
    assert code == 201, added
    status = ended(cams, "list")
    assert status["state"] == "failed" and "never a playlist" in status["last_error"], status
    assert (status["frames_decoded"], status["frames_out"]) == (0, 0)  # never running, nothing inferred


@pytest.mark.parametrize("name", ["scene.mp4", *CONTAINERS])
def test_a_video_file_in_the_folder_still_plays_to_its_end(cams, name):
    code, added = http(cams, "POST", "/v1/streams", {"source": name, "stream_id": "file", "realtime": False})
    assert code == 201, added
    status = ended(cams, "file", frames=FRAMES)
    assert (status["state"], status["last_error"]) == ("stopped", None), status
    assert status["frames_decoded"] == status["frames_out"] == FRAMES


# ------------------------------------------------------------------ sources the system refuses


PATHS = {
    "a name over NAME_MAX": "a" * 256 + ".mp4",
    "a path over PATH_MAX": "/".join(["é" * 120] * 20) + "/x.mp4",  # 4800 bytes in 2425 characters
    "a link to itself": "loop.mp4",
    "two links to each other": "ping.mp4",
    "a NUL byte after a long name": "n" * 1000 + "\x00.mp4",
}


def clean(message: str, base: Path) -> bool:
    """A short error that names no folder of the server's."""
    return len(message) < SHORT and str(base) not in message and "clips" not in message


@pytest.mark.parametrize("source", list(PATHS.values()), ids=list(PATHS))
def test_a_path_the_system_cannot_use_is_a_short_400_naming_no_folder(cams, base, caplog, source):
    with caplog.at_level(logging.INFO):
        code, body = http(cams, "POST", "/v1/streams", {"source": source})
        with SegmentationClient(cams.address) as client, pytest.raises(ClientError) as refused:
            client.add_stream(source)
    assert code == 400 and "is not a usable path" in body["error"] and clean(body["error"], base), body
    assert refused.value.code == "INVALID_ARGUMENT" and clean(refused.value.message, base), refused.value
    assert not [r for r in caplog.records if r.exc_info or len(r.getMessage()) > SHORT]
    assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}


@pytest.mark.parametrize("source", ["a" * LONG, "rtsp://127.0.0.1:9/" + "a" * LONG], ids=["file", "url"])
def test_a_20_mb_source_gets_a_short_answer_and_a_short_log_line(cams, base, caplog, source):
    with caplog.at_level(logging.INFO):
        code, body = http(cams, "POST", "/v1/streams", {"source": source})
        with SegmentationClient(cams.address) as client, pytest.raises(ClientError) as refused:
            client.add_stream(source)
    assert code == 400 and "at most 4096" in body["error"] and clean(body["error"], base), body["error"][:SHORT]
    assert refused.value.code == "INVALID_ARGUMENT" and clean(refused.value.message, base), refused.value.message[:SHORT]
    assert not [r for r in caplog.records if r.exc_info or len(r.getMessage()) > SHORT]
    assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}
