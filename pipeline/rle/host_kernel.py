"""Phase 1 on the host: one compiled pass over each crop (numba), the CPU's implementation of
the transition rule in ``runs`` (read its vocabulary first).

Why compiled: NumPy needs a pass per step (compare, find, divide, sort, difference), each
over memory or over every change, and on 2-core hosts those passes, not the masks' bytes,
were the cost. Here each crop is read once, in place, eight pixels per load, and only the
few words holding a change are looked at again:

1. Walk the crop's rows in C order (row 0 against the zero row above it, each inner row
   against the one above, the zero row below against the last row). Every differing byte is
   a change at (row r, column c); keep (r, c) and count it in its column.
2. Counting-sort the changes by column. Changes arrive in row order, so the stable sort puts
   them in column-major order: no comparison sort at all.
3. Turn each into its frame index k = (left + c) * H + top + r and take differences,
   applying the rule's two exact cases: k == H*W is dropped, and equal neighbours (a
   full-height crop's bottom pad meeting the next column's top pad) cancel.

Crops reach the kernel as *windows*: the address of their first pixel, a row stride and a
shape. So whole masks, box windows of masks, a stack's crops and separate arrays all go
through one call, with no copy and no padding. The kernel reads only inside each window's
rows; ``Windows`` holds the arrays, so their memory lives as long as it does.

Compiled on first use (about 2 s) and cached on disk by numba (``NUMBA_CACHE_DIR`` chooses
where; the images set it to /tmp). The kernel releases the GIL, so ``runs`` spreads large
batches over its threads. Memory: two int32 and one int64 per change of the largest crop,
plus the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

# Eight pixels per load: the inner rows are compared one block of this many bytes at a time
# (four words, which LLVM turns into one vector compare); only blocks with a change are
# expanded word by word.
_BLOCK = 32
# Gathers bit 0 of each of a word's 8 bytes into its top byte (see _byte_flags).
_GATHER = np.uint64(0x0102_0408_1020_4080)
# A byte above 1 in any word read (uint8 masks must hold 0/1; see runs.NotBinaryError).
NOT_BINARY_BITS = np.uint64(0xFEFE_FEFE_FEFE_FEFE)


def _jit(fn):
    # cache=True needs a writable directory; where none exists (a read-only install with no
    # NUMBA_CACHE_DIR) compile per process rather than fail at import.
    try:
        return njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:
        return njit(nogil=True, cache=False, boundscheck=False)(fn)


def _load(bits: int):
    @intrinsic
    def load(typingctx, address):
        """The ``bits``-bit unsigned integer at a byte address (any alignment)."""
        result = types.uint64 if bits == 64 else types.uint8

        def codegen(context, builder, signature, args):
            pointer = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            return builder.load(pointer, align=1)

        return result(types.int64), codegen

    return load


_word_at = _load(64)
_byte_at = _load(8)


@njit(inline="always")
def _byte_flags(word):
    """One bit per byte of a word whose bytes are 0 or 1: bit i is byte i. The multiply moves
    every byte's bit 0 into the top byte without carries; garbage for other bytes (only
    non-binary masks have them, and those are refused)."""
    return (word * _GATHER) >> np.uint64(56)


@njit(inline="always")
def _record(flags, row, column, rows, columns, per_column, n):
    """Record a change of ``row`` at ``column + i`` for each set bit i of ``flags``. Counts
    past the buffers' end are still counted, so the caller learns the size needed."""
    while flags:
        c = column + trailing_zeros(flags)
        if n < rows.size:
            rows[n] = row
            columns[n] = c
        per_column[c] += 1
        n += 1
        flags &= flags - np.uint64(1)
    return n


@njit(inline="always")
def _pad_row_changes(start, row, w, rows, columns, per_column, n):
    """Changes between a crop row (at address ``start``) and a zero pad row: its set pixels.
    (One loop for every row, pads compared with a row of zeros, measured 15% slower.)"""
    seen = np.uint64(0)
    c = 0
    while c + 8 <= w:
        word = _word_at(start + c)
        seen |= word
        if word:
            n = _record(_byte_flags(word), row, c, rows, columns, per_column, n)
        c += 8
    while c < w:
        byte = np.uint64(_byte_at(start + c))
        seen |= byte
        if byte:
            n = _record(np.uint64(1), row, c, rows, columns, per_column, n)
        c += 1
    return n, seen


@njit(inline="always")
def _crop_changes(start, row_stride, h, w, rows, columns, per_column):
    """All changes of one (h, w) crop whose row r starts at address ``start + r * row_stride``,
    in row order. Returns (count, OR of every word read)."""
    n, seen = _pad_row_changes(start, 0, w, rows, columns, per_column, 0)
    for r in range(1, h):
        below = start + r * row_stride
        above = below - row_stride
        c = 0
        while c + _BLOCK <= w:
            diff = np.uint64(0)
            for k in range(0, _BLOCK, 8):
                word = _word_at(below + c + k)
                seen |= word
                diff |= word ^ _word_at(above + c + k)
            if diff:  # rare: gather the block's changed bytes into one bit mask, then record
                flags = np.uint64(0)
                for k in range(0, _BLOCK, 8):
                    word_diff = _word_at(below + c + k) ^ _word_at(above + c + k)
                    flags |= _byte_flags(word_diff) << np.uint64(k)
                n = _record(flags, r, c, rows, columns, per_column, n)
            c += _BLOCK
        while c + 8 <= w:
            word = _word_at(below + c)
            seen |= word
            word_diff = word ^ _word_at(above + c)
            if word_diff:
                n = _record(_byte_flags(word_diff), r, c, rows, columns, per_column, n)
            c += 8
        while c < w:
            byte = np.uint64(_byte_at(below + c))
            seen |= byte
            if byte != np.uint64(_byte_at(above + c)):
                n = _record(np.uint64(1), r, c, rows, columns, per_column, n)
            c += 1
    n, _ = _pad_row_changes(start + (h - 1) * row_stride, h, w, rows, columns, per_column, n)
    return n, seen


@_jit
def _window_run_lengths(addresses, row_strides, shapes, tops, lefts, heights, areas, first,
                        rows, columns, keys, counts, offsets):
    """Runs of windows ``first``.. written to ``counts[offsets[i]:offsets[i + 1]]``.

    Window i is an (h, w) = shapes[i] crop whose row r starts at byte address
    addresses[i] + r * row_strides[i]; tops, lefts, heights, areas: its origin and its
    frame's H and H*W. rows, columns, keys: scratch for one window's changes; counts: the
    output. Returns (next window, changes it needs, OR of every word read). next < n when a
    buffer was too short for window ``next`` (the caller grows them and resumes there) or
    when a byte above 1 was read (the caller raises).
    """
    n_windows = addresses.size
    per_column = np.empty(max(shapes[:, 1].max(), 1), np.int64)
    seen = np.uint64(0)
    for i in range(first, n_windows):
        h, w = shapes[i, 0], shapes[i, 1]
        per_column[:w] = 0
        n, window_seen = 0, np.uint64(0)
        if h > 0 and w > 0:  # an empty window holds no change: its mask is one zero-run
            n, window_seen = _crop_changes(addresses[i], row_strides[i], h, w, rows, columns,
                                           per_column)
        seen |= window_seen
        m = offsets[i]
        if seen & NOT_BINARY_BITS or n > rows.size or m + n + 1 > counts.size:
            return i, n, seen
        # Counting sort by column: per_column becomes each column's next free slot.
        slot = 0
        for c in range(w):
            in_column = per_column[c]
            per_column[c] = slot
            slot += in_column
        H, left, top = heights[i], lefts[i], tops[i]
        for j in range(n):
            c = columns[j]
            keys[per_column[c]] = (left + c) * H + top + rows[j]
            per_column[c] += 1
        area = areas[i]
        end = 0  # the previous run's end
        q = m
        for j in range(n):
            k = keys[j]
            if k >= area:  # the frame's last pixel is set: the final run just ends there
                continue
            if q > m and k == end:  # two changes at one index cancel
                q -= 1
                end -= counts[q]
                continue
            counts[q] = k - end
            end = k
            q += 1
        counts[q] = area - end
        offsets[i + 1] = q + 1
    return n_windows, 0, seen


@dataclass(frozen=True)
class Windows:
    """Host crops as the kernel reads them, in place.

    crops: the (h, w) bool or uint8 arrays themselves (each row's pixels contiguous); they
    keep the memory the addresses point into alive. addresses: (n,) int64 address of each
    crop's first pixel; row_strides, shapes: (n,), (n, 2) int64. origins: (n, 2) each crop's
    (top, left) in its frame; ids: (n,) its instance in the batch.
    """

    crops: list[np.ndarray]
    addresses: np.ndarray
    row_strides: np.ndarray
    shapes: np.ndarray
    origins: np.ndarray
    ids: np.ndarray

    @classmethod
    def of(cls, crops: list[np.ndarray], origins: np.ndarray, ids: np.ndarray) -> Windows:
        """Windows over 2-D crops, read where they lie (a crop whose pixels are not
        contiguous within a row, or whose rows run backwards, is copied first)."""
        crops = [c if c.strides[1] == 1 and c.strides[0] >= 0 else np.ascontiguousarray(c)
                 for c in crops]
        return cls(crops,
                   np.array([c.__array_interface__["data"][0] for c in crops], np.int64),
                   np.array([c.strides[0] for c in crops], np.int64),
                   np.array([c.shape for c in crops], np.int64).reshape(-1, 2),
                   np.asarray(origins, np.int64).reshape(-1, 2), np.asarray(ids, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def pixels(self) -> int:
        return int(np.prod(self.shapes, axis=1).sum())

    def take(self, a: int, b: int) -> Windows:
        """Windows a..b-1."""
        return Windows(self.crops[a:b], self.addresses[a:b], self.row_strides[a:b],
                       self.shapes[a:b], self.origins[a:b], self.ids[a:b])


def initial_capacity(h: int, w: int) -> int:
    """Changes per crop the buffers first hold: smooth masks change a few times per row and
    column; noise grows them (once per crop that needs more)."""
    return max(1024, 16 * (h + w))


def run_lengths(windows: Windows, heights: np.ndarray,
                areas: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Run lengths of every window, back to back: (counts, offsets, bits).

    heights, areas: (n,) each window's frame H and H*W. bits is the OR of the words read: it
    holds a bit of ``NOT_BINARY_BITS`` if and only if a pixel is > 1, and then the runs are
    not valid (the caller raises).
    """
    n = len(windows)
    offsets = np.zeros(n + 1, np.int64)
    if n == 0:
        return np.zeros(0, np.int64), offsets, 0
    capacity = initial_capacity(*(int(v) for v in windows.shapes.max(axis=0)))
    rows, columns = np.empty(capacity, np.int32), np.empty(capacity, np.int32)
    keys = np.empty(capacity, np.int64)
    counts = np.empty(n * (capacity + 1), np.int64)
    tops, lefts = windows.origins[:, 0].copy(), windows.origins[:, 1].copy()
    heights, areas = np.asarray(heights, np.int64), np.asarray(areas, np.int64)
    first, bits = 0, 0
    while True:
        first, needed, seen = _window_run_lengths(
            windows.addresses, windows.row_strides, windows.shapes, tops, lefts, heights, areas,
            first, rows, columns, keys, counts, offsets)
        bits |= int(seen)
        if first == n or bits & int(NOT_BINARY_BITS):
            return counts[: offsets[first]], offsets, bits
        if needed > rows.size:
            rows, columns = np.empty(2 * needed, np.int32), np.empty(2 * needed, np.int32)
            keys = np.empty(2 * needed, np.int64)
        used = int(offsets[first])
        if used + needed + 1 > counts.size:
            grown = np.empty(2 * (used + needed + 1) + (n - first) * capacity, np.int64)
            grown[:used] = counts[:used]
            counts = grown


def warm_up() -> None:
    """Compile the kernel now rather than on the first request (or load it from the cache),
    and check it on a mask whose runs are known: row 1 of a 3 x 40 frame, columns 2..29."""
    mask = np.zeros((3, 40), bool)
    mask[1, 2:30] = True
    counts, _, _ = run_lengths(Windows.of([mask], np.zeros((1, 2)), np.zeros(1)),
                               np.array([3]), np.array([120]))
    if counts.tolist() != [7] + [1, 2] * 27 + [1, 31]:
        raise RuntimeError(f"the host RLE kernel is wrong on this machine: {counts.tolist()}")
