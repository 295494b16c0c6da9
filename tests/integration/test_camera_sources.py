"""``pipeline.cameras.sources`` on real media: H.264 clips of the sample photos, a
real RTSP server (GStreamer's, a process that is killed and brought back), a real HLS
playlist served over HTTP (``tests/cameras.py``). No model: what a source decodes, samples,
paces, queues and tells."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from pipeline.cameras.source_errors import CODEC_UNSUPPORTED, CONNECTION_FAILED, NOT_FOUND, SourceError
from pipeline.cameras.sources import CapturedFrame, FrameQueue, Source

from ..cameras import HlsServer, RtspServer, free_port, hls_unavailable, make_clip, rtsp_unavailable
from ..conftest import until

FPS = 10
SIZE = (320, 240)  # small: the machine that runs these has few cores and other work


class Watched:
    """A source, its queue and a consumer task on the running loop: the frames it delivered
    (with when they arrived) and the states it told, in order."""

    def __init__(self, location: str, *, network: bool = False, max_fps: float | None = None,
                 realtime: bool = False, size: int = 4, drop_oldest: bool = False, **options):
        self.frames: list[CapturedFrame] = []
        self.arrived: list[float] = []
        self.states: list[tuple[str, str | None]] = []
        self.drops = 0
        self.queue = FrameQueue(size, drop_oldest=drop_oldest, on_drop=self._dropped)
        self.source = Source(location, network=network, max_fps=max_fps, realtime=realtime, queue=self.queue,
                             on_state=lambda state, error: self.states.append((state, error)), name="test",
                             **options)
        self._task: asyncio.Task | None = None

    def _dropped(self, frame) -> None:
        self.drops += 1

    @property
    def state(self) -> str | None:
        return self.states[-1][0] if self.states else None

    @property
    def names(self) -> list[str]:
        return [state for state, _ in self.states]

    def start(self) -> Watched:
        self._task = asyncio.create_task(self._consume())
        self.source.start()
        return self

    async def _consume(self) -> None:
        async for frame in self.queue:
            self.frames.append(frame)
            self.arrived.append(time.monotonic())

    async def ended(self, timeout_s: float = 15.0) -> None:
        """Until the queue has ended (the source stopped or failed) and was read to its end."""
        await asyncio.wait_for(self._task, timeout_s)

    async def stop(self) -> None:
        await asyncio.to_thread(self.source.stop)
        await self.ended()


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def clip():
    """3 s at 10 fps: 30 frames, times 0.0 .. 2.9."""
    return make_clip(seconds=3, fps=FPS, size=SIZE)


@pytest.fixture(scope="module")
def rtsp_pair(clip):
    """Two RTSP servers (two cameras), each serving the clip at /cam, looped."""
    reason = rtsp_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with RtspServer({"cam": clip}) as first, RtspServer({"cam": clip}) as second:
        yield first, second


def rate(watched: Watched, since: float) -> float:
    arrived = [t for t in watched.arrived if t >= since]
    return len(arrived) / (time.monotonic() - since)


# ------------------------------------------------------------------------------------ files


def test_a_file_sampled_at_2_fps_gives_every_fifth_frame_in_order(clip):
    async def main():
        watched = Watched(str(clip), max_fps=2).start()
        await watched.ended()
        return watched

    watched = run(main())
    assert [f.index for f in watched.frames] == [0, 5, 10, 15, 20, 25]
    assert [f.media_s for f in watched.frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert watched.frames[0].rgb.shape == (SIZE[1], SIZE[0], 3) and watched.frames[0].rgb.dtype.name == "uint8"
    assert watched.frames[0].rgb.std() > 10  # a photo, not a blank frame
    assert watched.source.frames_decoded == 30
    assert watched.names == ["starting", "running", "stopped"] and watched.drops == 0


def test_sampling_holds_the_rate_when_the_source_rate_is_no_multiple_of_it():
    clip_25 = make_clip(seconds=2, fps=25, size=SIZE)

    async def main():
        watched = Watched(str(clip_25), max_fps=10).start()
        await watched.ended()
        return watched

    times = [f.media_s for f in run(main()).frames]
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 20 and set(gaps) == {0.08, 0.12}  # 2 s at 10 fps, each frame the first due


def test_realtime_paces_a_file_at_its_own_rate_and_not_realtime_runs_ahead_losing_nothing(clip):
    async def main(realtime: bool):
        started = time.monotonic()
        watched = Watched(str(clip), realtime=realtime, size=1).start()
        await watched.ended()
        return watched, time.monotonic() - started

    paced, paced_s = run(main(True))
    assert 2.7 < paced_s < 4.0  # 30 frames at 10 fps: 2.9 s from the first to the last
    gaps = [b - a for a, b in zip(paced.arrived, paced.arrived[1:], strict=False)]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.03)  # each frame in its turn
    fast, fast_s = run(main(False))
    assert fast_s < 1.5
    assert [f.index for f in fast.frames] == list(range(30)) and fast.drops == 0  # a queue of 1 that waits


def test_a_file_that_is_not_a_video_fails_and_a_missing_one_too(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)

    async def main(location):
        watched = Watched(location).start()
        await watched.ended()
        return watched

    for location, reason, code in ((text, "Invalid data", CODEC_UNSUPPORTED),
                                   (tmp_path / "absent.mp4", "No such file", NOT_FOUND)):
        watched = run(main(str(location)))
        assert watched.names == ["starting", "failed"] and watched.frames == []
        told = watched.states[-1][1]
        assert reason in told.text and str(tmp_path) not in told.text and told.code == code


def test_drop_oldest_keeps_the_newest_and_counts_every_drop(clip):
    told = threading.Event()
    queue = FrameQueue(2, drop_oldest=True, on_drop=lambda frame: drops.append(1))
    drops: list[int] = []
    source = Source(str(clip), network=False, max_fps=None, realtime=False, queue=queue,
                    on_state=lambda state, error: state == "stopped" and told.set())
    source.start()  # nobody reads until the file has ended
    assert told.wait(10)

    async def rest():
        return [frame.index async for frame in queue]

    assert run(rest()) == [28, 29]
    assert len(drops) == 28 and source.frames_decoded == 30


def test_stop_is_prompt_while_blocked_on_a_full_queue_that_waits(clip):
    async def main():
        watched = Watched(str(clip), size=1)
        watched.source.start()  # no consumer: the second frame blocks
        await until(lambda: watched.source.frames_decoded >= 2)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        watched.source.stop()
        return watched, time.monotonic() - started

    watched, stop_s = run(main())
    assert stop_s < 0.5
    assert not watched.source._thread.is_alive()
    assert watched.names == ["starting", "running", "stopped"]


def test_pause_holds_a_file_where_it_is_and_resume_goes_on_from_there(clip):
    async def main():
        watched = Watched(str(clip), realtime=True, size=2).start()
        await until(lambda: len(watched.frames) >= 8)
        watched.source.pause()
        await asyncio.sleep(0.2)  # a frame already due may still arrive
        held = len(watched.frames)
        await asyncio.sleep(1.0)
        assert len(watched.frames) == held
        watched.source.resume()
        resumed = time.monotonic()
        await watched.ended()
        return watched, held, resumed

    watched, held, resumed = run(main())
    assert [f.index for f in watched.frames] == list(range(30))  # nothing skipped, nothing twice
    assert watched.arrived[held] - watched.arrived[held - 1] > 1.1
    # Paced again from the resume, not rushed to catch up: the rest take their own time.
    assert watched.arrived[-1] - resumed > (30 - held - 1) * 0.1 - 0.2
    assert watched.names == ["starting", "running", "stopped"]


# ------------------------------------------------------------------------------------ network


def test_rtsp_reconnects_when_its_camera_dies_and_another_camera_keeps_its_rate(rtsp_pair):
    dying, healthy = rtsp_pair

    async def main():
        options = dict(network=True, backoff_s=(0.2, 0.5), timeout_s=2.0, drop_oldest=True)
        a = Watched(dying.url("cam"), **options).start()
        b = Watched(healthy.url("cam"), **options).start()
        await until(lambda: len(a.frames) >= 5 and len(b.frames) >= 5, 15)
        assert a.state == "running" and b.state == "running"
        dying.stop()  # SIGKILL: no RTSP goodbye
        await until(lambda: a.state == "reconnecting", 5)
        outage = time.monotonic()
        await until(lambda: a.source.reconnects >= 2, 5)  # tried again, and failed again
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - outage)))
        b_rate = rate(b, outage)
        frames_in_outage = len(a.frames)
        dying.start()  # the camera comes back on the same port
        await until(lambda: len(a.frames) >= frames_in_outage + 10 and a.state == "running", 15)
        await a.stop()
        await b.stop()
        return a, b, b_rate

    a, b, b_rate = run(main(), 60)
    # ~10 fps through the other camera's outage: not slowed by it. (No upper bound: over two
    # seconds the RTSP server's own bursts reach 13 on a busy machine; that is not ours.)
    assert b_rate >= 8
    errors = [error for state, error in a.states if state == "reconnecting"]
    # The kernel closes a killed server's socket: an end of stream, or a reset when the
    # server had unread bytes (FFmpeg's RTCP reports).
    assert errors[0].text == "the stream ended" or errors[0].text.startswith("cannot decode")
    assert any("Connection refused" in error.text for error in errors)
    assert {error.code for error in errors} == {CONNECTION_FAILED}
    assert a.names[:3] == ["starting", "running", "reconnecting"]
    assert a.names[-2:] == ["running", "stopped"] and "reconnecting" not in b.names
    indices = [f.index for f in a.frames]
    times = [f.media_s for f in a.frames]
    assert indices == sorted(set(indices)) and times == sorted(times)  # numbered on across the reconnect
    assert all(f.captured == pytest.approx(time.time(), abs=60) for f in a.frames)


def test_rtsp_pause_closes_the_connection_and_resume_opens_a_fresh_one(rtsp_pair):
    server = rtsp_pair[1]

    async def main():
        watched = Watched(server.url("cam"), network=True, drop_oldest=True, timeout_s=2.0).start()
        await until(lambda: len(watched.frames) >= 3, 15)
        assert connections_to(server.port) == 1
        watched.source.pause()
        await until(lambda: connections_to(server.port) == 0, 3)
        decoded = watched.source.frames_decoded
        await asyncio.sleep(0.5)
        assert watched.source.frames_decoded == decoded
        watched.source.resume()
        # Frames decoded after the resume (those queued before the pause may arrive first).
        await until(lambda: watched.frames[-1].index > decoded and connections_to(server.port) == 1, 15)
        await watched.stop()
        return watched, decoded

    watched, decoded = run(main())
    assert watched.frames[-1].index > decoded and watched.source.reconnects == 0
    assert "reconnecting" not in watched.names and watched.names[-1] == "stopped"


def test_a_camera_that_refuses_keeps_retrying_and_stops_at_once():
    async def main():
        watched = Watched(f"rtsp://127.0.0.1:{free_port()}/cam", network=True, backoff_s=(0.05, 0.1)).start()
        await until(lambda: watched.source.reconnects >= 3, 5)
        started = time.monotonic()
        await asyncio.to_thread(watched.source.stop)
        stop_s = time.monotonic() - started
        await watched.ended()
        return watched, stop_s

    watched, stop_s = run(main())
    assert stop_s < 0.5
    assert watched.names[:2] == ["starting", "reconnecting"] and watched.names[-1] == "stopped"
    assert watched.states[1][1] == SourceError("cannot open: Connection refused", CONNECTION_FAILED)
    assert watched.frames == []


def test_an_open_that_hangs_ends_within_the_timeout_once_stopped():
    with silent_port() as port:
        async def main():
            watched = Watched(f"rtsp://127.0.0.1:{port}/cam", network=True, timeout_s=1.0).start()
            await until(lambda: watched.state == "starting")
            await asyncio.sleep(0.2)  # inside av.open now
            started = time.monotonic()
            await asyncio.to_thread(watched.source.stop)
            stop_s = time.monotonic() - started
            await watched.ended()
            return watched, stop_s

        watched, stop_s = run(main())
    assert stop_s < 1.5 and not watched.source._thread.is_alive()
    assert watched.names == ["starting", "stopped"]


def test_an_hls_vod_playlist_plays_in_real_time_to_its_end_then_stops(clip, tmp_path):
    reason = hls_unavailable()
    if reason is not None:
        pytest.skip(reason)

    async def main(url):
        started = time.monotonic()
        watched = Watched(url, network=True, timeout_s=2.0).start()
        await watched.ended()
        return watched, time.monotonic() - started

    with HlsServer(clip, tmp_path / "hls") as hls:
        watched, took_s = run(main(hls.url))
    # A VOD playlist has a duration: a recording, played at its own rate to its end, then
    # "stopped" (a live playlist would be reconnected instead).
    assert [f.index for f in watched.frames] == list(range(30))
    assert 2.7 < took_s < 5.0
    times = [f.media_s for f in watched.frames]
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == pytest.approx([0.1] * 29)
    assert watched.names == ["starting", "running", "stopped"]


# ------------------------------------------------------------------------------------ helpers


def connections_to(port: int) -> int:
    """Established TCP connections from this machine to 127.0.0.1:``port`` (Linux)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


@contextmanager
def silent_port():
    """A TCP port that accepts connections and never says a word (a camera that hangs)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        yield listening.getsockname()[1]
