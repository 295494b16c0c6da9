"""Cameras inside the server's memory budget (issue 35): a frame far larger than the model needs
is converted straight to a reduced size by FFmpeg's scaler (never a full-size RGB copy) and
answered at its full size; a camera reserves what its frames hold from the bytes budget
(``--max-bytes-in-flight-mb``), one that does not fit fails saying so, and a stream gives its
bytes back when it stops. Real H.264 clips made here, the fake network (scale 320)."""

from __future__ import annotations

import asyncio

import pytest

from clients.client import SegmentationClient
from pipeline.cameras.source_errors import SourceError
from pipeline.cameras.sources import FrameQueue, Source

from ..cameras import scene_clip
from ..conftest import running_server, wait_until

LARGE = (1280, 768)  # (width, height): four times the fake network's 320, so reduced by 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory-clips")
    scene_clip(folder / "large.mp4", seconds=20, size=LARGE)
    scene_clip(folder / "small.mp4", seconds=20)
    return folder


async def decoded(path: str, **options) -> tuple[list, list]:
    """The frames and the states a file source delivers, to its end."""
    frames, states = [], []
    queue = FrameQueue(4, drop_oldest=False, on_drop=lambda frame: None)
    source = Source(path, network=False, max_fps=None, realtime=False, queue=queue, name="t",
                    on_state=lambda state, error: states.append((state, error)), **options)
    source.start()
    async for frame in queue:
        frames.append(frame)
        if len(frames) == 3:
            source.stop()
    return frames, states


def test_a_large_frame_is_reduced_as_it_is_converted_and_keeps_its_full_size(clips):
    frames, _ = asyncio.run(decoded(str(clips / "large.mp4"), long_side=320))
    assert frames[0].rgb.shape == (192, 320, 3) and frames[0].size == (768, 1280)
    assert frames[0].picture.size == (768, 1280) and frames[0].picture.nbytes == 192 * 320 * 3
    small, _ = asyncio.run(decoded(str(clips / "small.mp4"), long_side=320))
    assert small[0].rgb.shape == (192, 320, 3) and small[0].size is None  # under twice: whole


def test_frames_the_source_may_not_hold_fail_it_before_any_is_delivered(clips):
    asked = []

    def admit(height, width):
        asked.append((height, width))
        return "no room"

    frames, states = asyncio.run(decoded(str(clips / "large.mp4"), admit=admit))
    assert frames == [] and asked == [(768, 1280)] and states[-1] == ("failed", SourceError("no room", None))


def test_a_camera_answers_at_its_frames_full_size(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips)) as server, \
            SegmentationClient(server.address) as client:
        client.add_stream("large.mp4", stream_id="large", max_fps=5)
        first = next(client.subscribe("large"))
        client.remove_stream("large")
    assert (first.width, first.height) == LARGE and not first.error
    assert {d.class_name for d in first.detections} >= {"red", "blue"}
    assert all(list(d.rle.size) == [768, 1280] for d in first.detections)


def test_a_camera_whose_frames_do_not_fit_the_budget_fails_and_a_stream_gives_its_bytes_back(fake_root, clips):
    # 8 MB: a 1280x768 camera needs ~8.1 MB (its decoder's frames and its queue), a 320x192 one 0.6.
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), max_message_mb=8,
                        max_bytes_in_flight_mb=8) as server, SegmentationClient(server.address) as client:
        limits = server.server.state.limits
        client.add_stream("small.mp4", stream_id="small", max_fps=5)
        wait_until(lambda: client.get_stream("small")["frames_out"] > 0, 20)
        held_by_small = limits.bytes_held
        assert 0.5 * 2**20 < held_by_small < 2**20
        client.add_stream("large.mp4", stream_id="large", max_fps=5)
        large = wait_until(lambda: (s := client.get_stream("large"))["state"] == "failed" and s, 20)
        assert "memory budget" in large["last_error"] and "1280x768" in large["last_error"]
        assert large["frames_out"] == 0 and client.get_stream("small")["state"] == "running"
        client.remove_stream("large")
        client.remove_stream("small")
        wait_until(lambda: limits.bytes_held == 0, 10)
