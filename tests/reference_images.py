"""Write the images the exported models' reference predictions are made on, so the exporters
(in their own environments) and our server's tests read the same bytes:

    .venv/bin/python -m tests.reference_images OUT_FOLDER

OUT_FOLDER gets the five sample photos as shipped (pipeline.tools.samples: bus.jpg, zidane.jpg,
astronaut.png, coffee.png, chelsea.png) and two 1280x720 frames made the way the benchmarks make
them (benchmarks.common.sixteen_by_nine), as PNG so no second JPEG pass changes their pixels:
bus-16x9.png (a crop of a portrait photo) and astronaut-16x9.png (a square photo, upscaled)."""

import sys
from pathlib import Path

from PIL import Image

from benchmarks.common import sixteen_by_nine
from pipeline.tools.samples import sample_rgb, write_samples

FRAMES = ("bus", "astronaut")  # the 16:9 frames: one portrait and one square source


def main(out: Path) -> None:
    written = write_samples(out)
    for name in FRAMES:
        path = out / f"{name}-16x9.png"
        Image.fromarray(sixteen_by_nine(sample_rgb(name))).save(path)
        written.append(path)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
