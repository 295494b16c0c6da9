"""Phase 1 of COCO RLE: column-major run lengths of a batch of masks, on the array's device.

Vocabulary (shared by every function here):

- A *frame* is H x W. COCO flattens a mask column-major: pixel (y, x) has index k = x*H + y.
- An *instance* is given as a *crop*: an (h, w) window of the frame whose top-left pixel is
  (top, left); every pixel of the frame outside the window is 0. A full mask is the crop
  (0, 0, H, W), so full masks and box-aware crops go through one algorithm.
- A *transition* is an index k in [0, H*W) where pixel k differs from pixel k-1 (pixel -1 is 0,
  because COCO runs always start with a zero-run). Runs are the gaps between transitions:
  counts = diff([0, *transitions, H*W]).

Finding transitions without the column-major copy pycocotools needs: walk a crop column top to
bottom with a zero row above and below it (the frame outside the crop is 0). A change between
crop rows r-1 and r (r in 0..h; rows -1 and h are the zero pads) is a transition at
k = (left + c)*H + top + r. These row-to-row changes are found reading the crop in its natural
C order. Two cases make the rule exact:

- k == H*W (the frame's last pixel is set): the final run just ends there, so it is dropped.
- a full-height crop (top == 0, h == H): column c's bottom pad and column c+1's top pad land on
  the same index k; two changes at one index cancel (1 -> 0 -> 1 is no change), so neither stays.

Sorting the transitions by k puts them in column-major order; differences give the counts.

A batch may mix frames (images of different sizes): instance i's keys are ``i * slot + k``
with slot >= every frame's H*W, so one sort orders every instance's transitions at once.

``batch_run_lengths`` is the one algorithm; it finds transitions in one of two ways:

- ``_changes_on_device``: plain array operations (one change map, one ``nonzero`` per stack),
  array-module agnostic. This is the CUDA path through CuPy; ``crop_stack_run_lengths`` runs
  it on NumPy too, so the CPU checks the GPU's logic.
- ``_changes_on_host``: the NumPy path tuned for 2-core hosts. It compares rows eight pixels
  at a time as uint64 words, so a mostly-empty mask is read once at memory speed.

``host_run_lengths`` prepares host crops for it (small crops padded into one stack, large ones
read in place, noise-like whole masks through one column-major copy each).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .arrays import to_xp_array

# Below this many pixels a crop is compared byte by byte: the word trick's fixed cost is
# larger than the saving.
_WORD_COMPARE_MIN_PIXELS = 1 << 14
# When more than one word in this many holds a change (noisy masks), expanding candidate
# words costs more than comparing every byte.
_DENSE_WORD_RATIO = 8
# Row comparisons of at least this many words (8 MiB) are split across cores.
_PARALLEL_MIN_WORDS = 1 << 20
# Whole masks whose sampled pixels change row to row more often than one in this many are
# treated as noise (see _noise_like).
_NOISE_CHANGE_RATIO = 32
# Host crops up to this many pixels are padded into one shared stack and processed together;
# larger ones are read in place (padding them would copy more than it saves).
_PADDED_CROP_MAX_PIXELS = 1 << 16


@dataclass(frozen=True)
class RunLengths:
    """Column-major run lengths of N masks that share one frame size, on the host.

    counts: (M,) int64, every mask's runs back to back; each mask starts with its zero-run
        and its runs sum to H*W.
    offsets: (N + 1,) int64; mask i's runs are ``counts[offsets[i]:offsets[i + 1]]``.
    size: (H, W) of the frame.
    """

    counts: np.ndarray
    offsets: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def runs(self, i: int) -> np.ndarray:
        return self.counts[self.offsets[i] : self.offsets[i + 1]]


class NotBinaryError(ValueError):
    """A mask holds a value other than 0 or 1 (pycocotools would silently encode garbage)."""


def check_mask_dtype(dtype: Any) -> None:
    if dtype != np.bool_ and dtype != np.uint8:
        raise ValueError(f"masks must be bool or uint8 holding 0/1, got dtype {dtype}")


def _not_binary(value: int, instance: int | None = None) -> NotBinaryError:
    which = "a mask" if instance is None else f"mask {instance}"
    return NotBinaryError(
        f"{which} holds the value {value}; masks must hold only 0 and 1 "
        "(binarise first, e.g. masks > 0)"
    )


def _cancel_coincident(xp: ModuleType, keys: Any) -> Any:
    """Drop both members of every pair of equal sorted keys: two changes at one index.

    Only a full-height crop produces equal keys (see the module docstring); for any other
    crop every key is unique, so this is safe to apply to all of them.
    """
    if keys.size < 2:
        return keys
    same = keys[1:] == keys[:-1]
    drop = xp.zeros(keys.size, dtype=bool)
    drop[1:] |= same
    drop[:-1] |= same
    return keys[~drop]


def _changes_on_device(xp: ModuleType, stack: Any) -> tuple[Any, Any, Any]:
    """(instance, row, col) of every padded-row change of an (n, h, w) stack, in C order.

    Plain array operations, so it runs on CuPy and NumPy alike: one (n, h + 1, w) change map
    and one ``nonzero`` for the whole batch.
    """
    n, h, w = stack.shape
    changes = xp.empty((n, h + 1, w), dtype=bool)
    changes[:, 0] = stack[:, 0]
    changes[:, 1:h] = stack[:, 1:] != stack[:, :-1]
    changes[:, h] = stack[:, h - 1]
    return xp.nonzero(changes)


def _changes_on_host(stack: np.ndarray, parallel: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same changes as ``_changes_on_device``, tuned for NumPy on a CPU. Their order may differ,
    but within one instance and one column they come in row order, as there."""
    n, h, w = stack.shape
    flat = np.ascontiguousarray(stack).reshape(-1).view(np.uint8)
    # Row-to-row changes over the whole stack at once; a "row 0" hit compares an instance's
    # first row with the previous instance's last and is replaced by the zero-pad rows below.
    p = _row_changes(flat, w, parallel)
    if flat.size < 2**31:  # int32 division measured 4x faster than int64
        p = p.astype(np.int32)
    inst, rest = np.divmod(p, p.dtype.type(h * w))
    row, col = np.divmod(rest, p.dtype.type(w))
    inner = row > 0
    top_inst, top_col = np.nonzero(stack[:, 0])
    bottom_inst, bottom_col = np.nonzero(stack[:, h - 1])
    # Top pads first and bottom pads last: within each instance and column, changes then come
    # in row order, which ``_sorted_keys`` relies on.
    return (
        np.concatenate([top_inst, inst[inner], bottom_inst]),
        np.concatenate([np.zeros_like(top_col), row[inner], np.full_like(bottom_col, h)]),
        np.concatenate([top_col, col[inner], bottom_col]),
    )


@dataclass(frozen=True)
class Tiles:
    """Same-shape crops of some instances of a batch, all on one device.

    stack: (n, h, w) bool or uint8 0/1 (NumPy, CuPy or torch). origins: (n, 2) host int64, each
    crop's (top, left) in its instance's frame; the crop must lie inside that frame.
    ids: (n,) host int64, the instances (0..N-1 of the batch) these crops belong to.
    """

    stack: Any
    origins: np.ndarray
    ids: np.ndarray


def transition_keys(
    xp: ModuleType, stack: Any, origins: Any, ids: Any, heights: Any, areas: Any, slot: int,
    portable: bool = False, parallel: bool = True,
) -> tuple[Any, Any, Any]:
    """Unsorted transition keys ``id * slot + k`` of an (n, h, w) stack of crops, with each
    key's instance and frame column (for ``_sorted_keys``).

    origins: (n, 2) (top, left) of each crop, ids: (n,) instance numbers; heights and areas:
    (N,) each instance's frame H and H*W; slot: at least the largest area. All int64 arrays
    on the stack's device. portable: find changes with the device code even on NumPy.
    parallel: the host may split its comparison across cores (not when already in a thread).
    """
    if xp is np and not portable:
        inst, row, col = _changes_on_host(stack, parallel)
    else:
        inst, row, col = _changes_on_device(xp, stack)
    # Per-crop constants first, so each change needs one gather per term.
    tops, lefts = origins[:, 0].copy(), origins[:, 1].copy()
    frame_heights, frame_areas = heights[ids], areas[ids]
    column = lefts[inst] + col
    k = column * frame_heights[inst] + tops[inst] + row
    instance = ids[inst]
    keep = k < frame_areas[inst]  # a set last pixel of the frame: its run just ends at H*W
    if xp is not np or not keep.all():  # (no sync on a device)
        instance, column, k = instance[keep], column[keep], k[keep]
    return instance * slot + k, instance, column


def _sorted_keys(xp: ModuleType, keys: Any, instance: Any, column: Any, n: int,
                 width: int) -> Any:
    """The keys in ascending order.

    Within one instance and one column, keys are generated in row order, so on the host a
    stable sort by (instance, column) sorts them: two radix passes over 16-bit values
    (NumPy's stable sort of small integers), measured ~3x faster than sorting the keys on
    this project's CPUs, where NumPy's sort is not vectorised. Otherwise a plain sort.
    """
    if xp is np and keys.size and width <= 1 << 16 and n <= 1 << 16:
        order = np.argsort(column.astype(np.uint16), kind="stable")
        if n > 1:  # one radix pass on 8 bits where instances allow it
            narrow = np.uint8 if n <= 1 << 8 else np.uint16
            order = order[np.argsort(instance[order].astype(narrow), kind="stable")]
        return keys[order]
    return xp.sort(keys)


def _run_lengths_from_keys(
    xp: ModuleType, keys: Any, areas: Any, slot: int, largest: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cancel coincident pairs of sorted keys, take differences; ONE device-to-host copy.

    keys: ascending int64. areas: (N,) int64 on the device, each instance's H*W (its runs
    close there). largest: optional device scalar, the maximum of uint8 input, checked once
    it is home. Returns host (counts, offsets) for the N instances.
    """
    n = int(areas.shape[0])
    keys = _cancel_coincident(xp, keys)
    instance = keys // slot
    per_instance = xp.bincount(instance, minlength=n) if keys.size else xp.zeros(n, xp.int64)
    offsets = xp.zeros(n + 1, xp.int64)
    offsets[1:] = xp.cumsum(per_instance + 1)
    # Run ends: each transition k, then H*W closing every mask; counts are their differences.
    ends = xp.empty(int(keys.size) + n, xp.int64)
    ends[xp.arange(keys.size, dtype=xp.int64) + instance] = keys - instance * slot
    ends[offsets[1:] - 1] = areas
    starts = xp.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[offsets[:-1]] = 0
    parts = [offsets, ends - starts]
    if largest is not None:
        parts.insert(0, largest.astype(xp.int64).reshape(1))
    flat = xp.concatenate(parts)
    host = flat if xp is np else xp.asnumpy(flat)  # the batch's one device-to-host copy
    if largest is not None:
        if host[0] > 1:
            raise _not_binary(int(host[0]))
        host = host[1:]
    return host[n + 1 :], host[: n + 1]


def batch_run_lengths(
    tiles: Sequence[Tiles], frames: Sequence[tuple[int, int]], frame_of: np.ndarray,
    portable: bool = False,
) -> list[RunLengths]:
    """Run lengths of every instance of a batch, whatever frame each lives in: ONE call.

    tiles: the instances' crops as same-shape stacks (any number of stacks, one device).
    frames: (H, W) of each frame (image) of the batch. frame_of: (N,) host ints, the frame
    of each instance, non-decreasing (instances are numbered frame by frame). Every instance
    without a crop is empty. Returns one RunLengths per frame, its instances in id order.
    On a device the stacks' transitions are found one stack at a time with no host copy,
    then sorted together; the whole batch's runs come home in one copy. portable: use the
    device's change finder on NumPy too (how the tests check the GPU's logic on a CPU).
    """
    frame_of = np.asarray(frame_of, np.int64).reshape(-1)
    sizes = np.asarray(frames, np.int64).reshape(-1, 2)
    n = len(frame_of)
    if n and (np.any(np.diff(frame_of) < 0) or frame_of[0] < 0 or frame_of[-1] >= len(sizes)):
        raise ValueError("frame_of must be non-decreasing frame indices")
    heights_host, areas_host = sizes[frame_of, 0], sizes[frame_of, 0] * sizes[frame_of, 1]
    slot = max(int(areas_host.max()) if n else 0, 1)
    stacks = [(to_xp_array(t.stack), t) for t in tiles]
    live = [(xp, stack, t) for (xp, stack), t in stacks if stack.size]
    if len({xp.__name__ for xp, _, _ in live}) > 1:
        raise ValueError("a batch's crops must all live on the host or all on one CUDA device")
    xp = live[0][0] if live else np
    heights, areas = xp.asarray(heights_host), xp.asarray(areas_host)
    width = int(sizes[:, 1].max()) if len(sizes) else 0
    largest = None
    for _, stack, t in live:
        check_mask_dtype(stack.dtype)
        if xp is np:
            _check_binary_on_host(stack, t.ids)
        elif stack.dtype == xp.uint8:  # checked once the batch is home: no sync here
            top = stack.max()
            largest = top if largest is None else xp.maximum(largest, top)

    def keys_of(stack: Any, t: Tiles, parallel: bool) -> tuple[Any, Any, Any]:
        origins = xp.asarray(np.asarray(t.origins, np.int64).reshape(-1, 2))
        ids = xp.asarray(np.asarray(t.ids, np.int64).reshape(-1))
        return transition_keys(xp, stack, origins, ids, heights, areas, slot, portable, parallel)

    workers, _ = _compare_pool()
    in_order = _tiles_in_id_order([t for _, _, t in live])
    if (xp is np and workers is not None and in_order is not None and len(live) > 1
            and sum(stack.size for _, stack, _ in live) >= 8 * _PARALLEL_MIN_WORDS):
        # Tiles holding disjoint, ascending id ranges: each is found and sorted in a thread of
        # its own (the host's cores), and their keys concatenated are sorted.
        stacks = {id(t): stack for _, stack, t in live}
        parts = workers.map(
            lambda t: _sorted_keys(np, *keys_of(stacks[id(t)], t, False), n, width), in_order)
        all_keys = np.concatenate(list(parts))
    elif live:
        found = [keys_of(stack, t, True) for _, stack, t in live]
        keys, instance, column = (xp.concatenate(part) for part in zip(*found))
        all_keys = _sorted_keys(xp, keys, instance, column, n, width)
    else:
        all_keys = xp.empty(0, xp.int64)
    counts, offsets = _run_lengths_from_keys(xp, all_keys, areas, slot, largest)
    bounds = np.searchsorted(frame_of, np.arange(len(sizes) + 1))
    out = []
    for f, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        first, last = offsets[start], offsets[stop]
        out.append(RunLengths(counts[first:last], offsets[start : stop + 1] - first,
                              (int(sizes[f, 0]), int(sizes[f, 1]))))
    return out


def _tiles_in_id_order(tiles: Sequence[Tiles]) -> list[Tiles] | None:
    """The tiles by first instance id if their id ranges do not interleave, else None."""
    spans = sorted((int(np.min(t.ids)), int(np.max(t.ids)), i) for i, t in enumerate(tiles))
    if any(prev[1] >= cur[0] for prev, cur in zip(spans, spans[1:])):
        return None
    return [tiles[i] for _, _, i in spans]


def crop_stack_run_lengths(
    xp: ModuleType, stack: Any, origins: Any, size: tuple[int, int]
) -> RunLengths:
    """Run lengths of N same-shape crops of one frame, on whichever device holds ``stack``.

    stack: (N, h, w) bool or uint8 0/1 (NumPy or CuPy). origins: (N, 2) ints (top, left),
    each crop inside the frame. size: (H, W). The batched, array-module agnostic path:
    the CUDA path, and on NumPy the CPU's check of the GPU's logic.
    """
    n = int(stack.shape[0])
    check_mask_dtype(stack.dtype)
    origins = np.asarray(origins if xp is np else xp.asnumpy(xp.asarray(origins)), np.int64)
    tiles = [Tiles(stack, origins.reshape(n, 2), np.arange(n))]
    return batch_run_lengths(tiles, [size], np.zeros(n, np.int64), portable=True)[0]


# ----------------------------------------------------------------------------- host path

def _row_changes(flat: np.ndarray, w: int, parallel: bool = True) -> np.ndarray:
    """Indices p >= w of ``flat`` (C-order rows of width w) where flat[p] != flat[p - w]."""
    span = flat.size - w
    if span <= 0:
        return np.empty(0, np.int64)
    if flat.size < _WORD_COMPARE_MIN_PIXELS:
        return np.flatnonzero(flat[w:] != flat[:-w]) + w
    # Compare 8 pixels at a time: word j covers positions w + 8j .. w + 8j + 7. Unaligned
    # uint64 views of one buffer are fine on the hosts NumPy supports.
    n_words = span // 8
    below = np.frombuffer(flat, np.uint64, count=n_words, offset=w)
    above = np.frombuffer(flat, np.uint64, count=n_words)
    words = _changed_words(below, above, parallel)
    if words.size * _DENSE_WORD_RATIO > n_words:
        return np.flatnonzero(flat[w:] != flat[:-w]) + w
    tail = np.flatnonzero(flat[w + 8 * n_words :] != flat[8 * n_words : span]) + w + 8 * n_words
    # Which of the 8 bytes differ: look only at the changed words. (flatnonzero of a 1-D
    # boolean is NumPy's fast path: measured 10x faster than np.nonzero of the (n, 8) bytes.)
    # The XORed bytes are 0 or 1 (masks hold only 0 and 1): a valid boolean view.
    differing = np.flatnonzero((below[words] ^ above[words]).view(np.bool_))
    hits = w + 8 * words[differing >> 3] + (differing & 7)
    return np.concatenate([hits, tail]) if tail.size else hits


def _changed_words(below: np.ndarray, above: np.ndarray, parallel: bool = True) -> np.ndarray:
    """Indices where two equal-length uint64 arrays differ; large inputs use every core.

    The comparison streams both arrays once (memory speed; NumPy releases the GIL in it, so
    big inputs are split into one slice per core). Its booleans are then scanned eight at a
    time as uint64 words, so only the few eight-word blocks holding a change are expanded.
    """
    n = below.size
    changed = np.empty(n, bool)
    workers, count = _compare_pool()
    if n < _PARALLEL_MIN_WORDS or workers is None or not parallel:
        np.not_equal(below, above, out=changed)
    else:
        bounds = np.linspace(0, n, count + 1).astype(np.int64)
        list(workers.map(lambda s, e: np.not_equal(below[s:e], above[s:e], out=changed[s:e]),
                         bounds[:-1], bounds[1:]))
    whole = n - n % 8
    packed = changed[:whole].view(np.uint64)
    blocks = np.flatnonzero(packed != 0)
    inside = np.flatnonzero(packed[blocks].view(np.uint8) != 0)  # the blocks' bytes, in order
    words = 8 * blocks[inside >> 3] + (inside & 7)
    rest = np.flatnonzero(changed[whole:]) + whole
    return np.concatenate([words, rest]) if rest.size else words


_POOL: ThreadPoolExecutor | None = None
_THREADS: int | None = None  # None: one per core, at most 4


def set_threads(count: int | None) -> None:
    """How many threads the host path may use for large masks (None: one per core, <= 4).
    Servers set it from their thread budget so the codec never oversubscribes the cores."""
    global _POOL, _THREADS
    if count is not None and count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    _THREADS, pool, _POOL = count, _POOL, None
    if pool is not None:
        pool.shutdown(wait=False)


def _compare_pool() -> tuple[ThreadPoolExecutor | None, int]:
    """The shared pool for large comparisons and its size; None when one thread is allowed."""
    global _POOL
    if _THREADS is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        count = min(cores or 1, 4)
    else:
        count = _THREADS
    if count < 2:
        return None, 1
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=count, thread_name_prefix="rle-compare")
    return _POOL, count


def _largest_value(flat: np.ndarray) -> int:
    if flat.size % 8 == 0:
        words = np.bitwise_or.reduce(flat.view(np.uint64))
        if words & 0xFEFEFEFEFEFEFEFE == 0:
            return int(words != 0)
    return int(flat.max()) if flat.size else 0


def _noise_like(stack: np.ndarray) -> bool:
    """Whether changes are so dense (noise, dithering) that per-change index arithmetic costs
    more than a column-major copy: judged on one row pair in 64 (~3% of the pixels).
    A performance choice only; both paths give the same runs."""
    h = stack.shape[1]
    if h < 128 or stack.size < _WORD_COMPARE_MIN_PIXELS:
        return False
    sample = stack[:, 1::64] != stack[:, 0:-1:64]
    return np.count_nonzero(sample) * _NOISE_CHANGE_RATIO > sample.size


def _column_major_run_lengths(stack: np.ndarray) -> RunLengths:
    """Runs of whole-frame masks via one column-major copy per mask (never of the stack):
    the transitions then come out in order, with no sort and no index arithmetic."""
    n, H, W = stack.shape
    pieces, offsets = [], np.zeros(n + 1, np.int64)
    for i in range(n):
        column_major = np.ascontiguousarray(stack[i].T).reshape(-1).view(np.uint8)
        changes = np.flatnonzero(column_major[1:] != column_major[:-1]) + 1
        if column_major[0]:
            changes = np.concatenate([[0], changes])
        pieces.append(np.diff(changes, prepend=0, append=H * W))
        offsets[i + 1] = offsets[i] + pieces[-1].size
    return RunLengths(np.concatenate(pieces).astype(np.int64), offsets, (H, W))


def pad_crops(
    xp: ModuleType, crops: Sequence[Any], origins: np.ndarray, size: tuple[int, int]
) -> tuple[Any, np.ndarray]:
    """One zero-padded (N, h, w) tile stack for ragged crops, and each tile's origin.

    A tile is shifted up/left where needed to stay inside the frame; the crop keeps its place
    in the frame, and the tile's extra pixels are zeros, as the frame is there. On a device
    this is one copy kernel per crop and no sync.
    """
    H, W = size
    n = len(crops)
    h = min(max([1] + [int(c.shape[0]) for c in crops]), max(H, 1))
    w = min(max([1] + [int(c.shape[1]) for c in crops]), max(W, 1))
    tiles = np.stack([np.minimum(origins[:, 0], H - h), np.minimum(origins[:, 1], W - w)], 1)
    dtype = crops[0].dtype if n else xp.bool_
    stack = xp.zeros((n, h, w), dtype=dtype)
    for i, crop in enumerate(crops):
        dy, dx = (int(v) for v in origins[i] - tiles[i])
        stack[i, dy : dy + crop.shape[0], dx : dx + crop.shape[1]] = crop
    return stack, tiles.astype(np.int64)


def host_run_lengths(crops: Any, origins: Any, size: tuple[int, int]) -> RunLengths:
    """Run lengths on the host of an (N, h, w) stack or a sequence of (h_i, w_i) crops.

    crops: bool or uint8 0/1 NumPy arrays; origins: (N, 2) (top, left) of each in the frame.
    Small crops share one padded stack (one vectorised pass for all of them, no per-crop
    overhead); large ones are read in place, eight pixels at a time.
    """
    H, W = size
    n = len(crops)
    origins = np.asarray(origins, dtype=np.int64).reshape(n, 2)
    if isinstance(crops, np.ndarray):
        if n and crops.shape[1:] == (H, W) and not origins.any() and _noise_like(crops):
            _check_binary_on_host(crops, np.arange(n))
            return _column_major_run_lengths(crops)
        # Contiguous groups of instances, so a big stack can use every core.
        _, count = _compare_pool()
        bounds = np.linspace(0, n, min(count, n) + 1).astype(np.int64) if n else np.zeros(1, int)
        tiles = [Tiles(crops[a:b], origins[a:b], np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        small = [i for i, c in enumerate(crops) if 0 < c.size <= _PADDED_CROP_MAX_PIXELS]
        large = [i for i, c in enumerate(crops) if c.size > _PADDED_CROP_MAX_PIXELS]
        tiles = [Tiles(crops[i][None], origins[i : i + 1], np.array([i])) for i in large]
        if small:
            stack, corners = pad_crops(np, [crops[i] for i in small], origins[small], size)
            tiles.append(Tiles(stack, corners, np.array(small)))
    return batch_run_lengths(tiles, [size], np.zeros(n, np.int64))[0]


def _check_binary_on_host(stack: np.ndarray, ids: np.ndarray) -> None:
    """Refuse uint8 crops holding values besides 0 and 1, naming the instance."""
    if stack.dtype != np.uint8:
        return
    for crop, instance in zip(stack, ids):
        if crop.size:
            largest = _largest_value(np.ascontiguousarray(crop).reshape(-1))
            if largest > 1:
                raise _not_binary(largest, int(instance))
