"""``python -m pipeline serve`` as a real process: health, an inference, SIGTERM drain."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as triton

from pipeline.tools.launch import local_server
from pipeline.tools.samples import sample_bytes

from ..conftest import MODEL_REPOSITORY, ROOT


def test_serve_answers_then_drains_on_sigterm(tmp_path):
    # Settings from the environment work, a list among them; only the default pipeline loads.
    env = {**os.environ, "RLE_SERVING_GRACE_PERIOD_S": "60", "RLE_SERVING_MODEL_CONTROL_MODE": "explicit",
           "RLE_SERVING_LOAD_MODEL": "instance_segmentation"}
    log = tmp_path / "server.log"
    with local_server("--model-repository", str(MODEL_REPOSITORY), "--device", "cpu", http=True,
                      env=env, log=log.open("w"), cwd=ROOT) as server:
        address, port, http, process = server.address, server.port, server.http_port, server.process
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
        client.close()
    text = log.read_text()
    assert f"listening for gRPC on 127.0.0.1:{port}" in text
    assert f"listening for HTTP on 127.0.0.1:{http}" in text
    assert "instance_segmentation is READY" in text and "draining (grace 60 s)" in text
    assert "instance_segmentation_int8 is READY" not in text  # explicit: only what was named
