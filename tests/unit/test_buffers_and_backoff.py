"""The house's one bounded buffer (``buffers.DropOldest``) and one back-off (``backoff.Backoff``),
which frames, subscribers, sinks and the client all use."""

from __future__ import annotations

import itertools

import pytest

from pipeline.backoff import Backoff
from pipeline.buffers import DropOldest


def test_a_full_buffer_drops_its_oldest_and_counts_it():
    buffer: DropOldest[int] = DropOldest(3)
    assert [buffer.push(i) for i in range(3)] == [None, None, None] and buffer.full
    assert buffer.push(3) == 0 and buffer.push(4) == 1  # the oldest make room, handed back
    assert buffer.dropped == 2 and len(buffer) == 3
    assert [buffer.pop() for _ in range(3)] == [2, 3, 4]
    with pytest.raises(IndexError):
        buffer.pop()


def test_items_put_back_are_first_in_line_in_their_order_and_clear_says_how_many_waited():
    buffer: DropOldest[str] = DropOldest(2)
    buffer.push("c")
    buffer.push("d")
    buffer.put_back(["a", "b"])  # a failed batch: may exceed the size, it was in it already
    assert len(buffer) == 4 and buffer.peek() == "a" and buffer.dropped == 0
    assert buffer.push("e") == "a" and buffer.dropped == 1
    assert buffer.clear() == 4 and len(buffer) == 0 and buffer.dropped == 1


def test_a_buffer_holds_one_item_at_least():
    with pytest.raises(ValueError, match="at least one"):
        DropOldest(0)


def test_backoff_doubles_up_to_its_most_and_stops_after_its_attempts():
    assert list(Backoff(0.2, 5.0, attempts=8).delays()) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert list(Backoff(attempts=1).delays()) == [] and list(Backoff(attempts=0).delays()) == []
    endless = Backoff(0.5, 1.0, attempts=None).delays()
    assert list(itertools.islice(endless, 100))[-3:] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("first, most, attempts", [(0, 1, 3), (2, 1, 3), (float("nan"), 1, 3), (0.1, 1, -1)])
def test_a_backoff_that_cannot_work_is_refused(first, most, attempts):
    with pytest.raises(ValueError):
        Backoff(first, most, attempts)
