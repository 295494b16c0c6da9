"""Raw frames to a server on this host through shared memory (Triton's system shared-memory
extension; the server needs ``--allow-shared-memory``), for ``SegmentationClient.stream``.

A ``FrameRing`` is one POSIX shared memory object of ``slots`` frame-sized slots, registered
with the server as one region when the first frame comes (its size sets the slots'). Frame
``i`` goes to slot ``i % slots``, so it may be written once frame ``i - slots`` is answered:
results come in order, and a slot is never rewritten while the server may still read it (a
reconnect's replayed frames still find theirs). A frame larger than a slot is sent in the
message as before.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np

from pipeline.proto import video_pb2 as vpb


class FrameRing:
    """``slots`` frame slots shared with the server as region ``name``."""

    def __init__(self, slots: int, register: Callable[[str, str, int], None],
                 unregister: Callable[[str], None]):
        """register(name, key, byte_size) / unregister(name): the server's calls (KServe's
        SystemSharedMemoryRegister / Unregister)."""
        if slots < 1:
            raise ValueError(f"a frame ring needs at least one slot, got {slots}")
        self.slots = slots
        self.name = f"rle_frames_{uuid.uuid4().hex[:12]}"
        self._register, self._unregister = register, unregister
        self._memory: shared_memory.SharedMemory | None = None
        self.slot_bytes = 0
        self._answered = 0  # frames answered so far (results come in order)
        self._turn = threading.Condition()

    def wait_turn(self, index: int, call_over: threading.Event) -> bool:
        """Wait until frame ``index``'s slot is free (True), or ``call_over`` is set (False:
        the stream's call ended; its frames are replayed on the next one)."""
        with self._turn:
            while self._answered <= index - self.slots:
                if call_over.is_set():
                    return False
                self._turn.wait(0.1)
        return True

    def place(self, rgb: np.ndarray, index: int) -> vpb.SharedImage | None:
        """Write frame ``index`` (its turn waited for) to its slot; None if it does not fit
        one (send it in the message)."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if self._memory is None:
            self._open(rgb.nbytes)
        if rgb.nbytes > self.slot_bytes:
            return None
        offset = (index % self.slots) * self.slot_bytes
        self._memory.buf[offset : offset + rgb.nbytes] = rgb.reshape(-1)
        height, width = rgb.shape[:2]
        return vpb.SharedImage(region=self.name, offset=offset, height=height, width=width)

    def answered(self, count: int) -> None:
        """``count`` frames of the stream have their results: their slots are free."""
        with self._turn:
            self._answered = max(self._answered, count)
            self._turn.notify_all()

    def _open(self, slot_bytes: int) -> None:
        memory = shared_memory.SharedMemory(self.name, create=True, size=self.slots * slot_bytes)
        try:
            self._register(self.name, f"/{self.name}", self.slots * slot_bytes)
        except BaseException:
            memory.close()
            memory.unlink()
            raise
        self._memory, self.slot_bytes = memory, slot_bytes

    def close(self) -> None:
        """Unregister and free the memory (the server unmaps it when its last reader is done)."""
        if self._memory is None:
            return
        memory, self._memory = self._memory, None
        try:
            self._unregister(self.name)
        finally:
            memory.close()
            memory.unlink()
