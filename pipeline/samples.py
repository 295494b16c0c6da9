"""Real photos that ship inside packages, for tests and demos (nothing made up here, nothing
downloaded from a hub): scikit-image's astronaut, coffee and chelsea, and ultralytics'
bus.jpg and zidane.jpg as vendored in the ``mobilesam-lite`` wheel (read from the wheel file;
the package itself is never installed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from .fetch import DEFAULT_CACHE, fetch_wheel

WHEEL = "mobilesam-lite==0.1.2"
IN_WHEEL = {"bus": "bus.jpg", "zidane": "zidane.jpg"}
IN_SKIMAGE = ("astronaut", "coffee", "chelsea")
NAMES = tuple(IN_WHEEL) + IN_SKIMAGE


def sample_bytes(name: str, cache: Path = DEFAULT_CACHE) -> bytes:
    """The sample as encoded image bytes (JPEG from the wheel, PNG for scikit-image's)."""
    if name in IN_WHEEL:
        with zipfile.ZipFile(fetch_wheel(WHEEL, cache)) as archive:
            return archive.read(f"mobilesam_lite/_vendor/ultralytics/assets/{IN_WHEEL[name]}")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(sample_rgb(name)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_rgb(name: str, cache: Path = DEFAULT_CACHE) -> np.ndarray:
    """The sample as (H, W, 3) uint8 RGB."""
    if name in IN_SKIMAGE:
        from skimage import data

        return np.ascontiguousarray(getattr(data, name)()[..., :3])
    if name in IN_WHEEL:
        from .images import decode_image

        return decode_image(sample_bytes(name, cache)).rgb
    raise KeyError(f"unknown sample {name!r}; have {', '.join(NAMES)}")


def write_samples(folder: Path, cache: Path = DEFAULT_CACHE) -> list[Path]:
    """Every sample as an image file in ``folder`` (JPEG as shipped, PNG for scikit-image's)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NAMES:
        path = folder / (IN_WHEEL.get(name) or f"{name}.png")
        path.write_bytes(sample_bytes(name, cache))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.samples",
                                     description="Write the real sample photos to a folder.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write them into")
    args = parser.parse_args(argv)
    for path in write_samples(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
