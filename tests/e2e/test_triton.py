"""The REAL NVIDIA Triton server (2.51, from the nvidia-pytriton wheel) serves our model
repository, and answers with the same bytes as our own server.

Comparing contents, not just READY, is what catches the numpy 2 trap of Triton's Python
backend (empty or corrupted BYTES tensors while the model reports READY)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from pipeline.tools.launch import PROMPT_RECONNECT, free_port
from pipeline.tools.samples import sample_bytes
from pipeline.tools.triton import command

from ..conftest import MODEL_REPOSITORY, ROOT

MODEL = "instance_segmentation"
TRITON_PYTHON = ROOT / ".venv-triton/bin/python"
PARAMETERS = [
    {"response_mask_format": "rle"},
    {"response_mask_format": "rle", "confidence": 0.5, "max_detections": 3},
    {"response_mask_format": "polygon", "confidence": 0.3},
]


@dataclass
class Triton:
    address: str
    client: triton.InferenceServerClient
    log: Path


@pytest.fixture(scope="module")
def tritonserver(tmp_path_factory):
    assert TRITON_PYTHON.exists(), "run `make triton-env` (make test does)"
    grpc_port, http_port = free_port(), free_port()
    argv, env = command(MODEL_REPOSITORY, grpc_port, http_port, TRITON_PYTHON)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    process = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}", channel_args=PROMPT_RECONNECT)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise AssertionError(f"tritonserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.is_model_ready(MODEL):
                break
        except InferenceServerException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"Triton not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    yield Triton(f"127.0.0.1:{grpc_port}", client, log)
    client.close()
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def ours(real_server):
    client = triton.InferenceServerClient(real_server.address)
    yield client
    client.close()


def ask(client, image: bytes, parameters: dict):
    tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    return client.infer(MODEL, [tensor], parameters=parameters)


def test_it_is_the_real_triton(tritonserver):
    meta = tritonserver.client.get_server_metadata()
    assert meta.name == "triton" and meta.version == "2.51.0"
    assert "successfully loaded 'instance_segmentation'" in tritonserver.log.read_text()


@pytest.mark.parametrize("name", ["bus", "zidane", "coffee", "astronaut"])
@pytest.mark.parametrize("parameters", PARAMETERS, ids=["rle", "rle-strict", "polygon"])
def test_triton_returns_our_servers_bytes(tritonserver, ours, name, parameters):
    image = sample_bytes(name)
    theirs, mine = ask(tritonserver.client, image, parameters), ask(ours, image, parameters)
    (t_doc,), (m_doc,) = ([json.loads(d[0]) for d in r.as_numpy("DETECTIONS")] for r in (theirs, mine))
    assert t_doc["image"] == m_doc["image"]
    assert t_doc["predictions"], "Triton returned no detections: BYTES corrupted?"
    strip = lambda doc: [{k: v for k, v in p.items() if k != "detection_id"} for p in doc["predictions"]]
    assert strip(t_doc) == strip(m_doc)
    for tensor in ("NUM_DETECTIONS", "BOXES", "SCORES", "CLASS_IDS", "RLE_COUNTS", "IMAGE_SIZE"):
        np.testing.assert_array_equal(theirs.as_numpy(tensor), mine.as_numpy(tensor))
    if parameters["response_mask_format"] == "rle":
        counts = [c.decode() for c in theirs.as_numpy("RLE_COUNTS")[0]]
        assert counts == [p["rle"]["counts"] for p in t_doc["predictions"]]


def test_triton_refuses_bad_input_and_keeps_serving(tritonserver):
    client = tritonserver.client
    with pytest.raises(InferenceServerException, match="not a decodable image"):
        ask(client, b"not an image", {})
    with pytest.raises(InferenceServerException, match="unknown mask format"):
        ask(client, sample_bytes("coffee"), {"response_mask_format": "bitmap"})
    doc = json.loads(ask(client, sample_bytes("coffee"), {}).as_numpy("DETECTIONS")[0, 0])
    assert "cup" in [p["class"] for p in doc["predictions"]]


def test_our_client_library_works_against_triton(tritonserver):
    from clients import SegmentationClient

    with SegmentationClient(tritonserver.address) as client:
        doc = client.infer(sample_bytes("bus"))
    assert {"person", "bus"} <= {p["class"] for p in doc["predictions"]}
