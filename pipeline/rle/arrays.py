"""Array-module plumbing: which library holds an array, and zero-copy moves between them.

The kernels in this package are written once against an array module ``xp`` (NumPy on the
host, CuPy on a CUDA device). torch tensors are accepted at the boundary and crossed over
without copies: CPU tensors via ``Tensor.numpy()``, CUDA tensors via DLPack into CuPy.
CuPy is imported lazily so a CPU-only install never needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np


def cupy_or_none() -> ModuleType | None:
    """CuPy if it is installed and importable, else None (never raises)."""
    try:
        return importlib.import_module("cupy")
    except Exception:  # ImportError, or a CuPy built for a CUDA this machine lacks
        return None


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def to_xp_array(x: Any) -> tuple[ModuleType, Any]:
    """Return ``(xp, array)``: NumPy for host data, CuPy for CUDA data; no copies.

    Accepts NumPy arrays, CuPy arrays, torch tensors (CPU or CUDA) and anything
    ``np.asarray`` understands.
    """
    if is_torch_tensor(x):
        if x.device.type == "cuda":
            cp = cupy_or_none()
            if cp is None:
                raise RuntimeError(
                    "masks are a CUDA torch tensor but CuPy is not installed: "
                    "install the 'gpu' extra (cupy-cuda12x / cupy-cuda13x)"
                )
            import torch  # already imported by whoever made the tensor

            # DLPack bool support varies across versions; a uint8 view of a bool tensor is free.
            if x.dtype == torch.bool:
                x = x.view(torch.uint8)
            return cp, cp.from_dlpack(x.detach())
        return np, x.detach().numpy()
    if type(x).__module__.startswith("cupy"):
        return importlib.import_module("cupy"), x
    return np, np.asarray(x)


def to_host(x: Any) -> np.ndarray:
    """A host NumPy copy (or view) of any array this package accepts."""
    xp, arr = to_xp_array(x)
    return arr if xp is np else xp.asnumpy(arr)
