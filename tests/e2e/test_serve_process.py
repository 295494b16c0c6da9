"""``python -m pipeline serve`` as a real process: health, an inference, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as triton

from clients.demo import free_port, wait_until_serving
from pipeline.samples import sample_bytes

from ..conftest import MODEL_REPOSITORY, ROOT


def test_serve_answers_then_drains_on_sigterm():
    port, metrics = free_port(), free_port()
    env = {**os.environ, "RLE_SERVING_METRICS_PORT": str(metrics)}  # settings from env work
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(MODEL_REPOSITORY),
         "--host", "127.0.0.1", "--grpc-port", str(port), "--device", "cpu",
         "--grace-period-s", "60"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving(address, process)
        client = triton.InferenceServerClient(address)
        image = triton.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[sample_bytes("bus")]], dtype=object))
        assert client.infer("instance_segmentation", [image]).as_numpy("NUM_DETECTIONS")[0, 0] >= 4

        # A request in flight when SIGTERM lands still gets its answer.
        answer = {}
        batch = triton.InferInput("IMAGE", [4, 1], "BYTES")
        batch.set_data_from_numpy(np.array([[sample_bytes("bus")]] * 4, dtype=object))
        worker = threading.Thread(target=lambda: answer.setdefault(
            "n", client.infer("instance_segmentation", [batch]).as_numpy("NUM_DETECTIONS")))
        worker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        worker.join(120)
        assert answer["n"].shape == (4, 1)
        assert process.wait(60) == 0
        log = process.stderr.read()
        assert f"listening for gRPC on 127.0.0.1:{port}" in log
        assert "instance_segmentation is READY" in log and "draining" in log
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
