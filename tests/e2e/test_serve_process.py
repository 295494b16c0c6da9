"""``python -m pipeline serve`` as a real process: health, an inference, SIGTERM drain."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as triton

from clients.demo import free_port, wait_until_serving
from pipeline.samples import sample_bytes

from ..conftest import MODEL_REPOSITORY, ROOT


def test_serve_answers_then_drains_on_sigterm():
    port, metrics, http = free_port(), free_port(), free_port()
    env = {**os.environ, "RLE_SERVING_METRICS_PORT": str(metrics)}  # settings from env work
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(MODEL_REPOSITORY),
         "--host", "127.0.0.1", "--grpc-port", str(port), "--device", "cpu",
         "--grace-period-s", "60", "--http-port", str(http)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving(address, process)
        client = triton.InferenceServerClient(address)
        image = triton.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[sample_bytes("bus")]], dtype=object))
        assert client.infer("instance_segmentation", [image]).as_numpy("NUM_DETECTIONS")[0, 0] >= 4

        # Requests in flight when SIGTERM lands, over gRPC and over HTTP, still get answers.
        answer = {}
        batch = triton.InferInput("IMAGE", [4, 1], "BYTES")
        batch.set_data_from_numpy(np.array([[sample_bytes("bus")]] * 4, dtype=object))
        body = json.dumps({"model_id": "instance_segmentation/1", "image": [
            {"type": "base64", "value": base64.b64encode(sample_bytes("coffee")).decode()}] * 2}).encode()

        def over_http():
            request = urllib.request.Request(f"http://127.0.0.1:{http}/infer/instance_segmentation",
                                             data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer["http"] = (response.status, json.loads(response.read()))

        workers = [threading.Thread(target=lambda: answer.setdefault(
            "n", client.infer("instance_segmentation", [batch]).as_numpy("NUM_DETECTIONS"))),
            threading.Thread(target=over_http)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.join(120)
        assert answer["n"].shape == (4, 1)
        status, docs = answer["http"]
        assert status == 200 and len(docs) == 2 and all("cup" in [p["class"] for p in d["predictions"]] for d in docs)
        assert process.wait(60) == 0
        log = process.stderr.read()
        assert f"listening for gRPC on 127.0.0.1:{port}" in log
        assert f"listening for HTTP on 127.0.0.1:{http}" in log
        assert "instance_segmentation is READY" in log and "draining" in log
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
