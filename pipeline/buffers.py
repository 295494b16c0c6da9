"""``DropOldest``: the one bounded buffer of the house, for whatever must never block its writer
(a camera's decoded frames, a subscriber's results, a sink's messages): once it holds ``size``
items, adding one drops the oldest, and the drop is counted.

Not thread-safe and never waits: an owner that shares it between threads locks around it
(``cameras.sources.FrameQueue``), one that waits for items pairs it with an event
(``cameras.streams.Subscription``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldest(Generic[T]):
    """First in, first out, at most ``size`` waiting. ``dropped`` counts the items pushed out."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a buffer holds at least one item, not {size}")
        self.size = size
        self.dropped = 0
        self._items: deque[T] = deque()

    def push(self, item: T) -> T | None:
        """Add ``item`` last; returns the oldest item, dropped to make room, or None when
        nothing had to go (so None is no item)."""
        oldest = None
        if len(self._items) >= self.size:
            oldest = self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        return oldest

    def pop(self) -> T:
        """The oldest item, taken out; IndexError when empty."""
        return self._items.popleft()

    def peek(self) -> T:
        """The oldest item, left in; IndexError when empty."""
        return self._items[0]

    def put_back(self, items: Iterable[T]) -> None:
        """Items taken out and not used (a batch that failed), first in line again, in their
        order. They may fill the buffer beyond ``size``: they were in it already."""
        self._items.extendleft(reversed(list(items)))

    def clear(self) -> int:
        """Empty it; returns how many items were waiting (not counted as dropped: the owner
        says what became of them)."""
        count = len(self._items)
        self._items.clear()
        return count

    @property
    def full(self) -> bool:
        """The next ``push`` drops the oldest."""
        return len(self._items) >= self.size

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """The items waiting, oldest first, left in (a history read, not consumed)."""
        return iter(list(self._items))
