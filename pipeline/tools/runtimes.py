"""``make model``'s choice of runtime: time each form of a pipeline's network here, through the
runners that serve it, and point the pipeline at the fastest (``--choose``).

    python -m pipeline.tools.runtimes --pipeline instance_segmentation \\
        --networks yolov5s_seg yolov5s_seg_onnx yolov5s_seg_openvino --choose

Prints, per network, milliseconds per frame at batch 1 and at the batch size the server
would measure as best, for a square photo and a 16:9 frame as the network's pre-processing
places them (640x640 and 640x384 for a YOLO exported for any size; its square for a fixed
one, such as RF-DETR's), with the server's thread count (every core); the networks take
turns, round after round, each keeping its best time. Any family times: networks of one
family compare in ``--choose``.
The choice is by the mean of the batch-1 figures: measured, not assumed, so a machine whose
best runtime differs gets its own. A form has to be 5% faster than the pipeline's current
network to replace it, so noise does not flip the choice run to run.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ..repository import DEFAULT_MODEL

LOG = logging.getLogger(__name__)
FRAMES = {"square": (1080, 1080), "16:9": (720, 1280)}  # (height, width) of what is placed
MARGIN = 0.05


def measure(repository: Path, networks: list[str], rounds: int = 7) -> dict[str, dict]:
    """network -> {"batch": best batch size, "input": {frame: (h, w)}, (frame, batch): ms
    per frame}, frame one of ``FRAMES``.

    The networks take turns, round after round, and each keeps its best time: a busy moment
    of a shared machine slows one round of every network, not one network's every run."""
    import time

    import torch

    from ..repository import ModelRepository
    from ..runners import cores, load_runner

    torch.set_num_threads(cores())
    repo = ModelRepository.load(repository)
    runners = {name: load_runner(repo.get(name), "cpu") for name in networks}
    out, inputs = {}, {}
    for name, runner in runners.items():
        best = runner.info.fixed_batch or runner.best_batch_size(
            max(1, repo.get(name).config.max_batch_size))[0]
        places = {frame: runner.info.preprocess.place(*size) for frame, size in FRAMES.items()}
        out[name] = {"batch": best, "input": {f: (p.input_h, p.input_w) for f, p in places.items()}}
        inputs[name] = {(frame, b): torch.rand(b, 3, *out[name]["input"][frame])
                        for frame in FRAMES for b in sorted({1, best})}
        for images in inputs[name].values():
            runner(images)  # warm-up
    for _ in range(rounds):
        for name, runner in runners.items():
            for key, images in inputs[name].items():
                start = time.perf_counter()
                runner(images)
                ms = (time.perf_counter() - start) * 1e3 / len(images)
                out[name][key] = min(out[name].get(key, ms), ms)
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| network | runtime | input (square, 16:9) | square b1 | 16:9 b1 | best batch "
             "| square best | 16:9 best |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        b = row["batch"]
        shapes = ", ".join(f"{w}x{h}" for h, w in row["input"].values())
        lines.append(f"| {name} | {row.get('runtime', '')} | {shapes} | {row['square', 1]:.1f} "
                     f"| {row['16:9', 1]:.1f} | {b} | {row['square', b]:.1f} | {row['16:9', b]:.1f} |")
    return "\n".join(lines)


def fastest(results: dict[str, dict], current: str | None) -> str:
    """The network with the least mean batch-1 time, unless the current one is within MARGIN."""
    score = {name: (row["square", 1] + row["16:9", 1]) / 2 for name, row in results.items()}
    best = min(score, key=score.get)
    if current in score and score[best] > (1 - MARGIN) * score[current]:
        return current
    return best


def point_pipeline_at(config: Path, network: str) -> bool:
    """Set the pipeline config's ``network`` parameter; True if it changed."""
    text = config.read_text()
    new = re.sub(r'(key: "network" value: \{ string_value: ")[^"]*(")', rf"\g<1>{network}\g<2>", text)
    if new == text:
        return False
    config.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.runtimes",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--pipeline", default=DEFAULT_MODEL)
    parser.add_argument("--networks", nargs="+", help="the forms to time")
    parser.add_argument("--use", metavar="NETWORK",
                        help="point the pipeline at this network without timing (the CUDA "
                        "images: torch is the runtime that runs on the GPU there)")
    parser.add_argument("--choose", action="store_true", help="point the pipeline at the fastest")
    parser.add_argument("--rounds", type=int, default=7, help="turns each network takes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..repository import ModelRepository, runtime_of

    repo = ModelRepository.load(args.repository)
    pipeline = repo.get(args.pipeline)
    if args.use:
        repo.get(args.use)  # NotFoundError names the repository's models
        point_pipeline_at(pipeline.config_path, args.use)
        print(f"{args.pipeline}: network {args.use}")
        return 0
    if not args.networks:
        parser.error("give --networks to time, or --use")
    results = measure(args.repository, args.networks, args.rounds)
    for name, row in results.items():
        row["runtime"] = runtime_of(repo.get(name))
    print(f"# ms per frame, {args.repository}, the server's thread count")
    print(table(results))
    if args.choose:
        current = repo.network_of(pipeline).name
        chosen = fastest(results, current)
        changed = point_pipeline_at(pipeline.config_path, chosen)
        print(f"{args.pipeline}: network {chosen}" + (f" (was {current})" if changed else " (kept)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
