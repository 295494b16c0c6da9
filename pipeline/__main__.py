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
    import dataclasses
    import logging

    from .frontends.config import ServerConfig

    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
              if getattr(args, f.name, None) is not None}
    if "load_model" in chosen:
        chosen["load_model"] = tuple(chosen["load_model"])
    config = ServerConfig(**{**ServerConfig.env_defaults(), **chosen})  # checked before loading
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
    predict.add_argument("--model", default="instance_segmentation",
                         help="model in the repository (default: instance_segmentation)")
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
    serve.add_argument("--model-repository", help="Triton-layout repository (default: model_repository)")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001, Triton's; 0 = any free)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; 0 = any free)")
    serve.add_argument("--device", choices=["cpu", "cuda"], help="override instance_group kind")
    serve.add_argument("--stream-window", type=int,
                       help="frames a stream may have in flight (default 8)")
    serve.add_argument("--stream-policy", choices=["wait", "drop_oldest"],
                       help="when a stream sends too fast: wait (backpressure, default) or "
                       "drop_oldest (drop waiting frames and report them)")
    serve.add_argument("--max-message-mb", type=int, help="largest gRPC message, MB (default 64)")
    serve.add_argument("--grace-period-s", type=float,
                       help="on SIGTERM, how long in-flight work may finish (default 30)")
    serve.add_argument("--grpc-keepalive-s", type=float,
                       help="ping a gRPC connection idle this long, drop it if the ping is not "
                       "answered within as long again; clients may ping every half of it "
                       "(default 20)")
    serve.add_argument("--grpc-max-connection-age-s", type=float,
                       help="after this (+-10%%) a gRPC connection is asked to go (GOAWAY): clients "
                       "reconnect and re-resolve, so replicas that joined get their share "
                       "(default 300)")
    serve.add_argument("--grpc-max-connection-age-grace-s", type=float,
                       help="how long calls on a connection past its age may still run before it "
                       "is closed; the client library re-sends a cut stream's unanswered frames "
                       "(default 30)")
    serve.add_argument("--tls-cert", help="server certificate (PEM); enables TLS with --tls-key")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--token", help="require 'authorization: Bearer <token>' metadata "
                       "(health checks stay open for probes); prefer RLE_SERVING_TOKEN")
    serve.add_argument("--network-threads", type=int,
                       help="threads the network (and the RLE codec) may use (default: every core)")
    serve.add_argument("--worker-threads", type=int,
                       help="threads for decoding images and building responses (default 2)")
    serve.add_argument("--max-streams-per-client", type=int,
                       help="streams one client (one address, however many connections: a camera "
                       "gateway's streams share it) may keep open (default 128)")
    serve.add_argument("--max-in-flight-per-client", type=int,
                       help="requests one client (one address) may have in flight (default 512)")
    serve.add_argument("--max-bytes-in-flight-mb", type=int,
                       help="the server's budget for the images of requests in flight, MB; beyond "
                       "it requests are refused with RESOURCE_EXHAUSTED / 503 (default 1024)")
    serve.add_argument("--http-port", type=int,
                       help="HTTP port: Roboflow inference API and KServe v2 REST (default 8000, "
                       "Triton's; 0 = any free; -1 = no HTTP)")
    serve.add_argument("--http-header-timeout-s", type=float,
                       help="a new HTTP connection that has not sent its request headers within "
                       "this is closed (default 10)")
    serve.add_argument("--http-idle-timeout-s", type=float,
                       help="an idle keep-alive HTTP connection is closed after this (default 30)")
    serve.add_argument("--max-http-connections", type=int,
                       help="HTTP connections open at once; beyond it new ones are closed at once "
                       "(default 1000, lowered to fit the open-file limit)")
    serve.add_argument("--metrics-token-required", action="store_true", default=None,
                       help="require the --token bearer token on /metrics too (default: open, "
                       "as Prometheus scrapes without one; served over TLS when TLS is set)")
    serve.add_argument("--max-tracked-streams", type=int,
                       help="tracked streams and sequences alive at once (default 256)")
    serve.add_argument("--max-tracked-streams-per-client", type=int,
                       help="tracked streams and sequences one client (one address) may have "
                       "alive at once (default 64)")
    serve.add_argument("--tracker-idle-s", type=float,
                       help="a tracker unused this long is freed (default 60)")
    serve.add_argument("--allow-image-urls", action="store_true", default=None,
                       help="let HTTP requests name images by URL, fetched by the server "
                       "(off by default: server-side fetches are an SSRF risk)")
    serve.add_argument("--image-url-allow", action="append", metavar="CIDR_OR_HOST",
                       help="with --allow-image-urls, a network (10.0.0.0/8, 127.0.0.1) or host "
                       "name whose loopback, private or link-local addresses may be fetched all "
                       "the same (repeat for more; refused by default)")
    serve.add_argument("--allow-shared-memory", action="store_true", default=None,
                       help="offer Triton's system shared-memory extension to clients on this "
                       "host: a frame is read from memory the client names, not sent (off by "
                       "default: a client names memory on the server's host)")
    serve.add_argument("--max-shared-memory-regions", type=int,
                       help="shared memory regions registered at once (default 64)")
    serve.add_argument("--shared-memory-key-prefix",
                       help="with --allow-shared-memory, the prefix every shared memory key must "
                       "have (e.g. rle_), so clients can name only objects made for this server "
                       "(default: any key)")
    serve.add_argument("--stream-source-dir", metavar="DIR",
                       help="cameras on the server: let streams play video files from DIR (a "
                       "relative source path is inside it; off by default)")
    serve.add_argument("--allow-stream-urls", action="store_true", default=None,
                       help="cameras on the server: let streams pull rtsp://, rtsps:// and http(s):// "
                       "(HLS) sources (off by default: the server connects where a client says)")
    serve.add_argument("--stream-url-allow", action="append", metavar="CIDR_OR_HOST",
                       help="with --allow-stream-urls, a network (192.168.0.0/16) or host whose "
                       "loopback, private or link-local addresses a stream may pull from (repeat "
                       "for more; refused by default, as most cameras sit on private networks, "
                       "list theirs)")
    serve.add_argument("--max-ingest-streams", type=int,
                       help="camera streams at once, stopped ones included until removed; beyond "
                       "it adding one is refused RESOURCE_EXHAUSTED / 429 (default 16; 0: none)")
    serve.add_argument("--sink-buffer", type=int,
                       help="results each sink holds while its target is away; beyond it the "
                       "oldest are dropped and counted (a file with realtime false waits "
                       "instead; default 1000)")
    serve.add_argument("--sink-ca-file", metavar="PEM",
                       help="CA certificates that https://, mqtts:// and rediss:// sinks trust "
                       "besides the system's (for brokers with a private CA)")
    serve.add_argument("--model-control-mode", choices=["none", "explicit"],
                       help="none (default): every pipeline model is loaded at start, for good; "
                       "explicit: the --load-model ones, and the rest loaded and unloaded at run "
                       "time (Triton's RepositoryModelLoad/Unload, /v2/repository/models/NAME/load)")
    serve.add_argument("--load-model", action="append", metavar="NAME",
                       help="with --model-control-mode explicit: a model to load at start "
                       "(repeatable; RLE_SERVING_LOAD_MODEL=a,b)")
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
