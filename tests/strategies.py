"""Hypothesis strategies shared by the codec's tests (host, GPU and client helpers)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def mask_stacks(draw, max_side=24):
    n = draw(st.integers(0, 4))
    h = draw(st.integers(0, max_side))
    w = draw(st.integers(0, max_side))
    style = draw(st.sampled_from(["noise", "blobs", "rows", "full-or-empty"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if style == "noise":
        m = rng.random((n, h, w)) < draw(st.floats(0, 1))
    elif style == "blobs":
        yy, xx = np.mgrid[:h, :w]
        m = np.zeros((n, h, w), bool)
        for i in range(n):
            cy, cx, r = rng.uniform(-3, h + 3), rng.uniform(-3, w + 3), rng.uniform(0, max_side)
            m[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    elif style == "rows":
        m = np.repeat(rng.random((n, h, 1)) < 0.5, w, axis=2)
    else:
        m = np.repeat(rng.random((n, 1, 1)) < 0.5, h, axis=1).repeat(w, axis=2)
    return m.astype(draw(st.sampled_from([bool, np.uint8])))
