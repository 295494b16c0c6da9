"""Tracks on synthetic detections: stable ids, distinct ids, gaps, classes, order, bounds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline import rle
from pipeline.errors import InvalidOptionError, OverloadedError
from pipeline.postprocess import Detections
from pipeline.tracking import TrackerOptions, Tracks


def detections(boxes, classes=None, scores=None) -> Detections:
    k = len(boxes)
    return Detections(
        boxes=np.array(boxes, np.float32).reshape(k, 4),
        scores=np.array(scores if scores is not None else [0.9] * k, np.float32),
        class_ids=np.array(classes if classes is not None else [0] * k, np.int64),
        masks=rle.RunLengths(np.zeros(k, np.int64), np.arange(k + 1, dtype=np.int64), (0, 0)),
        image_size=(480, 640),
    )


def follow(frames, options=TrackerOptions(), fps=30.0, key="cam"):
    """frames: [(frame_index, boxes, classes)] -> tracker ids per frame, in order."""

    async def main():
        tracks = Tracks()
        out = []
        for index, boxes, classes in frames:
            ticket = tracks.ticket(key, options)
            tracked = await tracks.assign(ticket, detections(boxes, classes), index / fps)
            out.append(tracked.tracker_ids.tolist())
        return out, tracks

    return asyncio.run(main())


def walker(x0, y0, dx, frame):
    x = x0 + dx * frame
    return [x, y0, x + 60, y0 + 150]


def test_moving_objects_keep_their_ids_and_distinct_objects_get_distinct_ids():
    frames = [(f, [walker(20, 50, 4, f), walker(400, 60, -5, f)], [0, 0]) for f in range(20)]
    ids, _ = follow(frames)
    assert ids[0] == [-1, -1]  # a track gets its id once confirmed
    first = ids[1]
    assert first[0] != first[1] and min(first) >= 0
    assert all(frame == first for frame in ids[1:])  # no switches while they move


def test_dropped_frames_are_gaps_in_time_not_lost_objects():
    kept = [f for f in range(30) if not 8 <= f <= 13]  # drop_oldest dropped six frames
    frames = [(f, [walker(20, 50, 6, f)], [0]) for f in kept]
    ids, _ = follow(frames)
    assert len({i[0] for i in ids[1:]}) == 1 and ids[-1][0] >= 0


def test_an_object_that_leaves_briefly_keeps_its_id_one_gone_long_gets_a_new_one():
    options = TrackerOptions(lost_s=0.5)
    frames = []
    for f in range(40):
        boxes = [walker(300, 50, 1, f)]
        if not 10 <= f < 16:  # 6 frames (0.2 s) out of view: re-associated
            boxes.append(walker(20, 200, 2, f))
        frames.append((f, boxes, [0] * len(boxes)))
    ids, _ = follow(frames, options)
    walker_ids = [frame[1] for frame in ids[1:] if len(frame) == 2]
    assert len(set(walker_ids)) == 1
    frames = [(f, [walker(20, 200, 2, f)], [0]) for f in list(range(10)) + list(range(40, 50))]
    ids, _ = follow(frames, options)  # 1 s away, over lost_track_seconds: a new object
    assert ids[5][0] != ids[-1][0] and ids[-1][0] >= 0


def test_a_track_never_changes_class():
    box = [100, 100, 200, 300]
    frames = [(f, [box], [0 if f < 5 else 56]) for f in range(10)]  # a person, then a chair there
    ids, _ = follow(frames)
    assert ids[3][0] != ids[8][0] and ids[8][0] >= 0


def test_requests_update_in_ticket_order_whatever_order_they_finish():
    async def main():
        tracks = Tracks()
        t0, t1, t2 = (tracks.ticket("cam", TrackerOptions()) for _ in range(3))
        order = []

        async def frame(ticket, delay, x):
            await asyncio.sleep(delay)  # detection finishing out of order
            tracked = await tracks.assign(ticket, detections([[x, 10, x + 50, 90]]), ticket.number / 30)
            order.append(ticket.number)
            return tracked.tracker_ids[0]

        results = await asyncio.gather(frame(t0, 0.05, 10), frame(t1, 0.0, 13), frame(t2, 0.02, 16))
        return order, results

    order, results = asyncio.run(main())
    assert order == [0, 1, 2] and results[1] == results[2] >= 0


def test_a_failed_request_passes_its_turn():
    async def main():
        tracks = Tracks()
        t0, t1, t2 = (tracks.ticket("cam", TrackerOptions()) for _ in range(3))
        later = asyncio.create_task(tracks.assign(t2, detections([[10, 10, 60, 90]]), 2 / 30))
        await asyncio.sleep(0.01)
        tracks.skip(t1)  # e.g. its image failed to decode
        await tracks.assign(t0, detections([[10, 10, 60, 90]]), 0.0)
        return await asyncio.wait_for(later, 2)

    assert asyncio.run(main()).tracker_ids.tolist() in ([0], [-1])


def update(tracks, key, client=""):
    """One frame of ``key`` through its tracker (made on this first update)."""
    ticket = tracks.ticket(key, TrackerOptions(), client)
    return asyncio.run(tracks.assign(ticket, detections([[10, 10, 60, 90]]), 0.0))


def test_trackers_are_bounded_freed_at_the_end_and_when_idle():
    tracks = Tracks(max_tracks=2, idle_s=10)
    update(tracks, "a")
    update(tracks, "b")
    with pytest.raises(OverloadedError, match="2 tracked streams are live"):
        update(tracks, "c")
    assert "c" not in tracks._tracks  # the refused request left nothing behind
    tracks.end("a")
    update(tracks, "c")
    assert len(tracks) == 2
    assert tracks.sweep(now=float("inf")) == 2 and len(tracks) == 0


def test_one_client_cannot_fill_the_table():
    tracks = Tracks(max_tracks=4, max_per_client=2)
    update(tracks, ("10.0.0.1", "s1"), "10.0.0.1")
    update(tracks, ("10.0.0.1", "s2"), "10.0.0.1")
    with pytest.raises(OverloadedError, match="this client has 2 tracked streams live"):
        update(tracks, ("10.0.0.1", "s3"), "10.0.0.1")
    update(tracks, ("10.0.0.2", "s1"), "10.0.0.2")  # others still get theirs
    assert len(tracks) == 3


def test_requests_that_fail_before_their_update_hold_no_tracker():
    """Garbage images with distinct sequence ids: tickets are taken, every request fails
    and skips, and the table is as empty as before (no lock-out of other clients)."""
    tracks = Tracks(max_tracks=2)
    for i in range(300):
        tracks.skip(tracks.ticket(f"garbage-{i}", TrackerOptions()))
    assert len(tracks) == 0 and not tracks._tracks
    update(tracks, "real")
    assert len(tracks) == 1


def test_a_restarted_key_answers_the_old_tickets_instead_of_leaving_them_waiting():
    """A sequence restarted (or a stream ended) while frames of the old tracker wait for
    their turn: they are answered without ids at once, and the new tracker's frames do not
    wait for them."""
    async def main():
        tracks = Tracks()
        old0, old1 = (tracks.ticket("seq", TrackerOptions()) for _ in range(2))
        waiting = asyncio.create_task(tracks.assign(old1, detections([[10, 10, 60, 90]]), 0.1))
        await asyncio.sleep(0.01)  # old1 waits for old0's turn, which never comes
        tracks.end("seq")  # sequence_start of a new sequence with the same id
        new0 = tracks.ticket("seq", TrackerOptions())
        fresh = await asyncio.wait_for(tracks.assign(new0, detections([[10, 10, 60, 90]]), 0.0), 2)
        stale = await asyncio.wait_for(waiting, 2)
        late = await asyncio.wait_for(tracks.assign(old0, detections([[10, 10, 60, 90]]), 0.0), 2)
        return fresh, stale, late

    fresh, stale, late = asyncio.run(main())
    assert fresh.tracker_ids is not None
    assert stale.tracker_ids is None and late.tracker_ids is None


def test_per_frame_work_follows_the_objects_in_view_not_the_stream_length():
    # 300 frames, a new object every 10 frames that leaves 10 frames later.
    frames = [(f, [walker(20 + 70 * ((f // 10) % 5), 50, 0, f)], [0]) for f in range(300)]
    ids, tracks = follow(frames, TrackerOptions(lost_s=0.2))
    assert len(tracks._tracks["cam"].tracker) <= 5  # held: the objects in view or just lost
    assert max(i for frame in ids for i in frame) >= 19  # yet every newcomer got a new id


@pytest.mark.parametrize("params, key", [
    ({"track_activation_threshold": 2}, "track_activation_threshold"),
    ({"lost_track_seconds": "soon"}, "lost_track_seconds"),
    ({"minimum_consecutive_frames": 0}, "minimum_consecutive_frames"),
    ({"frame_rate": 0}, "frame_rate"),
    ({"minimum_consecutive_frames": float("nan")}, "minimum_consecutive_frames"),
    ({"minimum_consecutive_frames": "inf"}, "minimum_consecutive_frames"),
    ({"lost_track_seconds": float("-inf")}, "lost_track_seconds"),
])
def test_bad_tracker_knobs_name_the_key(params, key):
    with pytest.raises(InvalidOptionError) as info:
        TrackerOptions.from_params(params)
    assert info.value.key == key


def test_updates_run_off_the_event_loop_one_at_a_time_even_when_a_request_is_cancelled(monkeypatch):
    import threading

    from pipeline import tracking

    class Blocking:
        """A tracker whose update waits to be released, noting its thread and overlap."""

        def __init__(self, options):
            self.release, self.entered = threading.Event(), threading.Event()
            self.threads, self.active, self.overlapped = [], 0, False

        def update(self, det, timestamp):
            self.active += 1
            self.overlapped |= self.active > 1
            self.threads.append(threading.get_ident())
            self.entered.set()
            self.release.wait(10)
            self.active -= 1
            return np.zeros(len(det), np.int64)

    monkeypatch.setattr(tracking, "_ClassAware", Blocking)

    async def main():
        tracks = Tracks()
        t0, t1 = (tracks.ticket("cam", TrackerOptions()) for _ in range(2))
        first = asyncio.create_task(tracks.assign(t0, detections([[10, 10, 60, 90]]), 0.0))
        await asyncio.sleep(0.01)
        tracker = tracks._tracks["cam"].tracker  # made on the first update
        await asyncio.to_thread(tracker.entered.wait, 10)  # the first update is running
        first.cancel()  # its caller leaves mid-update ...
        second = asyncio.create_task(tracks.assign(t1, detections([[12, 10, 62, 90]]), 0.1))
        await asyncio.sleep(0)  # ... the second waits for the turn, not for the caller
        assert len(tracker.threads) == 1
        tracker.release.set()
        await asyncio.wait_for(second, 10)
        return tracker, threading.get_ident()

    tracker, loop_thread = asyncio.run(main())
    assert len(tracker.threads) == 2 and loop_thread not in tracker.threads
    assert not tracker.overlapped


def test_a_sequences_last_request_failing_early_leaves_the_frames_before_it_their_ids():
    """sequence_end on a request that fails before its turn (refused, a bad image): the
    tracker is freed once the turn passes it, not at once, so earlier frames still get ids."""
    async def main():
        tracks = Tracks()
        await tracks.assign(tracks.ticket("seq", TrackerOptions()), detections([[10, 10, 60, 90]]), 0.0)
        t0, last = (tracks.ticket("seq", TrackerOptions()) for _ in range(2))
        tracks.skip(last)  # the last request failed early ...
        tracks.end_after(last)  # ... and ends the sequence after its turn
        assert "seq" in tracks._tracks
        earlier = await asyncio.wait_for(tracks.assign(t0, detections([[12, 10, 62, 90]]), 0.1), 2)
        return earlier, tracks

    earlier, tracks = asyncio.run(main())
    assert earlier.tracker_ids is not None
    assert "seq" not in tracks._tracks and len(tracks) == 0
