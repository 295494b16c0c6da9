"""Unloading gives the memory back: a real server process loads and unloads the real model five
times (Triton's repository extension, official tritonclient), serving an image each time; after
every unload its resident memory has given back at least 80% of what that load added, and it
does not creep up from cycle to cycle.

A process's first load also initialises torch's own runtime for good (its kernels and thread
pools: about 200 MB here, kept for whatever model comes next), so one load and unload comes
first, and the cycles are measured from there."""

from __future__ import annotations

import json

import numpy as np
import tritonclient.grpc as triton

from pipeline.tools.launch import local_server
from pipeline.tools.samples import sample_bytes

from ..conftest import ROOT, copy_repository, without_batch_calibration

MODEL = "instance_segmentation"
CYCLES = 5


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_five_load_unload_cycles_give_the_memory_back(tmp_path):
    repository = copy_repository(tmp_path / "models", instance_segmentation=without_batch_calibration)
    image = triton.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[sample_bytes("bus")]], dtype=object))
    with local_server("--model-repository", str(repository), "--device", "cpu",
                      "--model-control-mode", "explicit", cwd=ROOT) as server:
        client = triton.InferenceServerClient(server.address)
        pid = server.process.pid
        client.load_model(MODEL)  # the runtime's own first-use state
        client.infer(MODEL, [image])
        client.unload_model(MODEL)
        readings = []
        for _ in range(CYCLES):
            before = rss_mb(pid)
            client.load_model(MODEL)
            doc = json.loads(client.infer(MODEL, [image]).as_numpy("DETECTIONS")[0, 0])
            assert {"person", "bus"} <= {p["class"] for p in doc["predictions"]}
            loaded = rss_mb(pid)
            client.unload_model(MODEL)
            assert not client.is_model_ready(MODEL)
            readings.append((before, loaded, rss_mb(pid)))
        client.close()
    for before, loaded, after in readings:
        added = loaded - before
        assert added > 20, readings  # a real model was loaded
        assert loaded - after >= 0.8 * added, readings
    assert readings[-1][2] <= readings[0][0] * 1.05, readings  # no creep over the cycles
