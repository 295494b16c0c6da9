"""Memory per admitted byte: large raw requests at once, and the server's peak memory.

One ``python -m pipeline serve`` (the real model); ``--requests`` clients each send one raw
UINT8 ``[1, H, W, 3]`` image of about ``--mb`` MB at the same moment, as KServe ``ModelInfer``
over gRPC or as KServe REST with the binary tensor extension, for ``--rounds`` rounds. The
server's resident memory (VmRSS) is sampled every 10 ms. Printed: the bytes admitted at once,
the peak above the server's memory before the first round, and their ratio: how many bytes of
memory each byte a request brings costs at its worst.

    python -m benchmarks.request_memory_bench --requests 12 --mb 58 --transport grpc
    python -m benchmarks.request_memory_bench --requests 12 --mb 58 --transport http
    python -m benchmarks.request_memory_bench ... --server-root ../other-checkout   # its server
"""

from __future__ import annotations

import math
import sys
import threading
import time

import numpy as np

from .camera_memory_bench import Sampler, rss_mb
from .common import add_server_root, arguments, checkout_server, out_path

MODEL = "instance_segmentation"


def send(transport: str, address: str, image: np.ndarray, go: threading.Barrier, errors: list) -> None:
    """One client: waits for the others, then one raw request."""
    if transport == "grpc":
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(address, channel_args=[
            ("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)])
    else:
        import tritonclient.http as triton

        client = triton.InferenceServerClient(address, network_timeout=300, connection_timeout=300)
    tensor = triton.InferInput("IMAGE", list(image.shape), "UINT8")
    if transport == "grpc":
        tensor.set_data_from_numpy(image)
    else:
        tensor.set_data_from_numpy(image, binary_data=True)
    go.wait()
    try:
        client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("NUM_DETECTIONS")])
    except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
        errors.append(str(exc)[:200])
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--mb", type=float, default=58.0, help="each request's image, MB")
    parser.add_argument("--transport", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--rounds", type=int, default=3)
    add_server_root(parser)
    args = parser.parse_args(argv)
    root = args.server_root.resolve()
    side = int(math.sqrt(args.mb * 2**20 / 3))
    image = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    with open(out_path("request_memory_bench_server.log"), "w") as log, \
            checkout_server(args.server_root, http=True, log=log) as server:
        address = server.address if args.transport == "grpc" else f"127.0.0.1:{server.http_port}"
        time.sleep(2)
        start = rss_mb(server.process.pid)
        sampler = Sampler(server.process.pid, interval_s=0.01)
        sampler.start()
        errors: list[str] = []
        for _ in range(args.rounds):
            go = threading.Barrier(args.requests)
            clients = [threading.Thread(target=send, args=(args.transport, address, image, go, errors))
                       for _ in range(args.requests)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
        sampler.stop.set()
        sampler.join()
    admitted = args.requests * image.nbytes / 2**20
    print(f"{args.requests} x {image.nbytes / 2**20:.0f} MB raw ({side}x{side}) over {args.transport}, "
          f"{args.rounds} rounds; server: {root}")
    print("| admitted MB | peak MB above start | peak / admitted | errors |\n|---|---|---|---|")
    print(f"| {admitted:.0f} | {sampler.peak - start:.0f} | {(sampler.peak - start) / admitted:.2f}x | {len(errors)} |")
    for error in sorted(set(errors)):
        print(f"  error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
