"""Command line: ``python -m pipeline <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import json
import sys


def _predict(args: argparse.Namespace) -> int:
    """Run the model on image files; print one JSON document per image."""
    from pathlib import Path

    from .engine import Pipeline
    from .errors import PipelineError
    from .images import as_rgb_array

    pipe = Pipeline.from_repository(args.model_repository, model=args.model, device=args.device)
    overlays = _overlay_paths(args.overlay, len(args.images))
    status = 0
    for i, path in enumerate(args.images):
        try:
            rgb = as_rgb_array(Path(path))
            (doc,) = pipe.infer([rgb], mask_format=args.mask_format, confidence=args.confidence,
                                iou_threshold=args.iou_threshold,
                                max_detections=args.max_detections)
        except (PipelineError, OSError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(doc, indent=args.indent), flush=True)
        if overlays:
            from .overlay import draw

            draw(rgb, doc["predictions"]).save(overlays[i])
            print(f"{path}: overlay written to {overlays[i]}", file=sys.stderr)
    return status


def _overlay_paths(target: str | None, count: int) -> list[str]:
    """One output file per image: the name itself for one image, name-<i>.png for several."""
    if not target:
        return []
    if count == 1:
        return [target]
    stem, dot, ext = target.rpartition(".")
    stem, ext = (stem, ext) if dot else (target, "png")
    return [f"{stem}-{i}.{ext}" for i in range(count)]


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .frontends.config import ServerConfig

    config = ServerConfig.from_flags(args)  # checked before loading
    from .frontends.server import serve

    logging.getLogger().setLevel(logging.INFO)
    return asyncio.run(serve(config))


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the server's grpc.health.v1 says SERVING (for Docker HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    from .frontends.config import add_flags
    from .repository import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Instance segmentation serving with exact COCO RLE masks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict", help="segment images; print one JSON document per image",
        description="Segment images with a model from the repository and print, per image, "
        '{"image": {"width", "height"}, "predictions": [...]} (Roboflow-compatible schema).',
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    predict.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"model in the repository (default: {DEFAULT_MODEL})")
    predict.add_argument("--model-repository", default="model_repository",
                         help="Triton-layout model repository (default: model_repository)")
    predict.add_argument("--mask-format", choices=["rle", "polygon"], default="rle",
                         help="rle: exact COCO RLE (default); polygon: outer contour points")
    predict.add_argument("--confidence", type=float, default=None,
                         help="minimum score, 0..1 (default: the model's, 0.25)")
    predict.add_argument("--iou-threshold", type=float, default=None,
                         help="NMS IoU threshold (default: the model's, 0.45)")
    predict.add_argument("--max-detections", type=int, default=None,
                         help="most detections per image (default: the model's, 300)")
    predict.add_argument("--device", choices=["cpu", "cuda"], default=None,
                         help="override the model's instance_group kind")
    predict.add_argument("--overlay", metavar="OUT.png",
                         help="also draw the decoded masks over the image into this PNG "
                         "(several images: OUT-0.png, OUT-1.png, ...)")
    predict.add_argument("--indent", type=int, default=None, help="pretty-print the JSON")
    predict.set_defaults(func=_predict)

    serve = commands.add_parser(
        "serve", help="serve the repository over gRPC and HTTP (KServe v2, video, Roboflow API)",
        description="Serve the model repository over gRPC: Triton/KServe v2 protocol "
        "(tritonclient works), the typed video streaming API, grpc.health.v1, reflection; over "
        "HTTP: Roboflow's inference API (inference-sdk works) and KServe v2 REST; and "
        "Prometheus metrics. Every flag can also be set as RLE_SERVING_<FLAG> in the "
        "environment (e.g. RLE_SERVING_GRPC_PORT=8001). SIGTERM drains, then exits 0.",
    )
    add_flags(serve)  # one per ServerConfig field
    serve.set_defaults(func=_serve)

    health = commands.add_parser("health", help="check a server's gRPC health (exit 0 if SERVING)")
    health.add_argument("--address", default="localhost:8001")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_health)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # a clean message for start-up errors, not a traceback
        from .errors import PipelineError

        if isinstance(exc, PipelineError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
