"""Roboflow's stream API (``/inference_pipelines``) driven by the OFFICIAL inference-sdk,
unmodified, from .venv-sdk (``sdk_pipelines_driver.py``), against an in-process server with
real parts: H.264 clips (``scene_clip``), GStreamer's RTSP server for a camera that dies, the
fake network (known detections). A pipeline is camera streams: they show in ``/v1/streams``.

What is checked: start to terminate with the SDK's own single-model workflow (outputs and
frames_metadata, masks equal to our ``/infer`` answer for the same decoded frame; status with
sources_metadata, pause, resume); v4's RLE masks; every other workflow and configuration a
400 naming what is supported; a pipeline nobody consumes ending itself; terminate of a
pipeline whose camera is gone; the token as api_key; the docs' example, run as written.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import av
import pytest
import requests

from pipeline.cameras.source_errors import CODES

from ..cameras import RtspServer, rtsp_unavailable, scene_clip
from ..conftest import ROOT, running_server
from .conftest import http as shared_http

SDK_PYTHON = ROOT / ".venv-sdk/bin/python"
DRIVER = ROOT / "tests/integration/sdk_pipelines_driver.py"
TOKEN = "pipe-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL_ID = "instance_segmentation/1"
DOCS = ROOT / "docs/inference-pipelines.md"


def workflow(version: int = 2, **step) -> dict:
    """The SDK's own single-model workflow (the one ``webrtc.stream(model_id=...)`` makes)."""
    return {"version": "1.0", "inputs": [{"type": "InferenceImage", "name": "image"}],
            "steps": [{"type": f"roboflow_core/roboflow_instance_segmentation_model@v{version}", "name": "model",
                       "images": "$inputs.image", "model_id": MODEL_ID, **step}],
            "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.model.predictions"}]}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline-clips")
    scene_clip(folder / "scene.mp4")  # 3 s at 10 fps, 320x192
    scene_clip(folder / "long.mp4", seconds=20)
    return folder


@pytest.fixture(scope="module")
def pipe_server(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), allow_stream_urls=True,
                        stream_url_allow=("127.0.0.1",), max_ingest_streams=6, token=TOKEN) as running:
        yield running


@pytest.fixture
def pipes(pipe_server):
    """The server, every pipeline terminated after each test (its streams with it)."""
    yield pipe_server
    for pipeline_id in http(pipe_server, "GET", "/inference_pipelines/list")[1]["pipelines"]:
        http(pipe_server, "POST", f"/inference_pipelines/{pipeline_id}/terminate")
    assert http(pipe_server, "GET", "/v1/streams")[1]["streams"] == []


def http(server, method: str, path: str, body=None, headers=AUTH):
    return shared_http(server, method, path, body, headers)


def sdk(server, plan: list, api_key: str = TOKEN) -> list[dict]:
    """The SDK's answers to ``plan`` (see the driver)."""
    assert SDK_PYTHON.exists(), "run `make sdk-env` (make test does)"
    run = subprocess.run([str(SDK_PYTHON), str(DRIVER), f"http://127.0.0.1:{server.server.http_port}", api_key,
                          json.dumps(plan)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def start(video_reference, spec: dict | None = None, **kwargs) -> list:
    return ["start_inference_pipeline_with_workflow",
            {"video_reference": video_reference, "workflow_specification": spec or workflow(), **kwargs}]


def frame_of(path: Path, index: int) -> bytes:
    """Frame ``index`` of a clip, decoded as the server decodes it, as PNG."""
    import io

    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                out = io.BytesIO()
                frame.to_image().save(out, format="PNG")
                return out.getvalue()
    raise IndexError(index)


def ours(server, image: bytes, **params) -> dict:
    """Our own Roboflow v1 answer for an image."""
    import base64

    code, body = http(server, "POST", "/infer/instance_segmentation",
                      {"model_id": MODEL_ID, "image": {"type": "base64", "value": base64.b64encode(image).decode()},
                       "api_key": TOKEN, **params})
    assert code == 200, body
    return body


def without_ids(predictions: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in ("detection_id", "mask_format", "rle")} for p in predictions]


def test_the_sdk_runs_a_pipeline_from_start_to_terminate(pipes, clips):
    answers = sdk(pipes, [
        start("long.mp4", max_fps=5),                                      # 0
        ["list_inference_pipelines", {}],                                  # 1
        ["wait_state", {"state": "RUNNING", "timeout_s": 20}],              # 2
        ["consume_frames", {"frames": 3, "timeout_s": 30}],                # 3
        ["pause_inference_pipeline", {"pipeline_id": "$pipeline_id"}],     # 4
        ["wait_state", {"state": "MUTED", "timeout_s": 5}],                # 5
        ["resume_inference_pipeline", {"pipeline_id": "$pipeline_id"}],    # 6
        ["get_inference_pipeline_status", {"pipeline_id": "$pipeline_id"}],  # 7
        ["terminate_inference_pipeline", {"pipeline_id": "$pipeline_id"}],  # 8
        ["list_inference_pipelines", {}],                                  # 9
        ["get_inference_pipeline_status", {"pipeline_id": "$pipeline_id"}],  # 10
    ])
    assert all("result" in a for a in answers[:10]), answers
    started = answers[0]["result"]
    assert started["status"] == "success" and set(started["context"]) == {"request_id", "pipeline_id"}
    pipeline_id = started["context"]["pipeline_id"]
    assert answers[1]["result"]["pipelines"] == [pipeline_id]

    report = answers[2]["result"]["report"]
    (source,) = report["sources_metadata"]
    assert source["state"] == "RUNNING" and source["source_id"] == 0 and source["source_reference"] == "long.mp4"
    assert source["source_properties"] == {"width": 320, "height": 192, "total_frames": 200, "is_file": True,
                                           "fps": 10.0, "is_reconnectable": False}
    assert source["buffer_filling_strategy"] == "DROP_OLDEST" and source["buffer_consumption_strategy"] == "EAGER"
    assert [u["payload"]["new_state"] for u in report["video_source_status_updates"]][:2] == ["INITIALISING",
                                                                                            "RUNNING"]

    consumed = answers[3]["result"]
    outputs = [o for result in consumed for o in result["outputs"]]
    frames = [f for result in consumed for f in result["frames_metadata"]]
    assert len(outputs) >= 3 and len(frames) == len(outputs)
    ids = [f["frame_id"] for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and all(f["source_id"] == 0 for f in frames)
    # max_fps 5 of a 10 fps file: every other frame, counted from 1 as Roboflow counts
    assert all(b - a >= 2 for a, b in zip(ids, ids[1:])), ids
    for output, frame in zip(outputs, frames):
        assert set(output) == {"predictions"}
        assert re.match(r"\d{4}-\d\d-\d\dT", frame["frame_timestamp"])
        detections = output["predictions"]
        assert detections["image"] == {"width": 320, "height": 192}
        # the same decoded frame through our own /infer: the SDK's v2 block gives polygons
        expected = ours(pipes, frame_of(clips / "long.mp4", frame["frame_id"] - 1), confidence=0.4,
                        iou_threshold=0.3)["predictions"]
        assert {p["class"] for p in detections["predictions"]} == {"red", "blue"}
        assert without_ids(detections["predictions"]) == without_ids(expected)
        assert all(len(p["points"]) >= 4 for p in detections["predictions"])

    assert answers[5]["result"]["report"]["sources_metadata"][0]["state"] == "MUTED"
    updates = answers[7]["result"]["report"]["video_source_status_updates"]
    assert "MUTED" in [u["payload"]["new_state"] for u in updates]
    latency = answers[7]["result"]["report"]["latency_reports"][0]
    assert latency["source_id"] == 0 and 0 < latency["inference_latency"] <= latency["e2e_latency"]
    assert answers[8]["result"]["context"]["pipeline_id"] == pipeline_id
    assert answers[9]["result"]["pipelines"] == []
    assert answers[10]["error"]["status_code"] == 404


def test_a_pipeline_is_a_camera_stream_with_a_memory_sink(pipes):
    (started,) = sdk(pipes, [start(["scene.mp4", "long.mp4"], source_buffer_filling_strategy="WAIT",
                                   source_buffer_consumption_strategy="LAZY", results_buffer_size=5)])
    pipeline_id = started["result"]["context"]["pipeline_id"]
    streams = {s["stream_id"]: s for s in http(pipes, "GET", "/v1/streams")[1]["streams"]}
    assert set(streams) == {f"{pipeline_id}.0", f"{pipeline_id}.1"}
    first = streams[f"{pipeline_id}.0"]
    assert first["source"] == "scene.mp4" and first["realtime"] is False
    assert first["parameters"] == {"confidence": 0.4, "iou_threshold": 0.3, "max_detections": 300}
    assert [s["kind"] for s in first["sinks"]] == ["memory"]

    def buffered() -> list[int]:
        return [http(pipes, "GET", f"/v1/streams/{pipeline_id}.{i}")[1]["sinks"][0]["buffered"] for i in (0, 1)]

    # WAIT + LAZY: each file stops at its 5 unconsumed results (nothing dropped) ...
    deadline = time.monotonic() + 20
    while buffered() != [5, 5] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert buffered() == [5, 5]
    time.sleep(0.5)
    assert [http(pipes, "GET", f"/v1/streams/{pipeline_id}.{i}")[1]["frames_out"] for i in (0, 1)] == [5, 5]
    # ... and a consume takes the oldest of every source at once
    code, body = http(pipes, "GET", f"/inference_pipelines/{pipeline_id}/consume")
    assert code == 200 and [f["frame_id"] for f in body["frames_metadata"]] == [1, 1]
    assert [f["source_id"] for f in body["frames_metadata"]] == [0, 1]
    code, body = http(pipes, "GET", f"/inference_pipelines/{pipeline_id}/consume",
                      {"excluded_fields": ["predictions"]})
    assert code == 200 and body["outputs"] == [{}, {}] and [f["frame_id"] for f in body["frames_metadata"]] == [2, 2]


def test_v4_gives_the_exact_masks_as_rle(pipes, clips):
    spec = workflow(4, confidence_mode="custom", custom_confidence=0.5)
    spec["outputs"] = [{"type": "JsonField", "name": "everything", "selector": "$steps.model.*"}]
    answers = sdk(pipes, [start("long.mp4", spec, max_fps=2), ["consume_frames", {"frames": 1, "timeout_s": 30}]])
    (result,) = answers[1]["result"][:1]
    (output,), (frame,) = result["outputs"][:1], result["frames_metadata"][:1]
    everything = output["everything"]
    assert set(everything) == {"inference_id", "predictions", "model_id"} and everything["model_id"] == MODEL_ID
    expected = ours(pipes, frame_of(clips / "long.mp4", frame["frame_id"] - 1), confidence=0.5,
                    iou_threshold=0.3, response_mask_format="rle")["predictions"]
    got = everything["predictions"]["predictions"]
    assert [p["rle_mask"] for p in got] == [p["rle"] for p in expected]
    assert [{k: v for k, v in p.items() if k not in ("rle_mask", "detection_id")} for p in got] == without_ids(expected)


BAD_WORKFLOWS = {
    "two steps": ({**workflow(), "steps": workflow()["steps"] * 2}, "has 2 steps"),
    "object detection": ({**workflow(), "steps": [{**workflow()["steps"][0],
                                                    "type": "roboflow_core/roboflow_object_detection_model@v2"}]},
                         "roboflow_instance_segmentation_model@v1..v4"),
    "another output": ({**workflow(), "outputs": [{"type": "JsonField", "name": "x",
                                                   "selector": "$steps.model.image"}]}, ".predictions"),
    "an unknown model": (workflow(model_id="yolov8n-seg-640/1"), "yolov8n-seg-640"),
    "a knob we lack": (workflow(class_agnostic_nms=True), "class_agnostic_nms"),
}


def test_every_other_workflow_gets_a_400_that_names_what_is_supported(pipes):
    bad = BAD_WORKFLOWS
    answers = sdk(pipes, [start("scene.mp4", spec) for spec, _ in bad.values()]
                  + [start("scene.mp4", source_buffer_filling_strategy="DROP_LATEST"),
                     start(0), start("../outside.mp4"),
                     ["start_inference_pipeline_with_workflow", {"video_reference": "scene.mp4",
                                                                 "workspace_name": "w", "workflow_id": "f"}]])
    words = [w for _, w in bad.values()] + ["DROP_OLDEST + EAGER", "no camera indexes", "outside", "fetches no"]
    for (name, answer), word in zip(zip([*bad, "strategy", "camera index", "path", "named"], answers), words):
        assert "error" in answer, (name, answer)
        error = answer["error"]
        assert error["status_code"] == (404 if name == "an unknown model" else 400), (name, error)
        assert word in error["message"], (name, error)
    assert http(pipes, "GET", "/inference_pipelines/list")[1]["pipelines"] == []  # nothing half started
    assert http(pipes, "GET", "/v1/streams")[1]["streams"] == []


def test_a_pipeline_nobody_consumes_ends_itself(pipes):
    def initialise(timeout_s: float) -> str:
        code, body = http(pipes, "POST", "/inference_pipelines/initialise", {
            "video_configuration": {"type": "VideoConfiguration", "video_reference": "long.mp4"},
            "processing_configuration": {"type": "WorkflowConfiguration", "workflow_specification": workflow()},
            "consumption_timeout": timeout_s})
        assert code == 200, body
        return body["context"]["pipeline_id"]

    idle, consumed = initialise(1.0), initialise(1.0)
    for _ in range(12):  # 3 s: the consumed one stays, the idle one ends after its second
        assert http(pipes, "GET", f"/inference_pipelines/{consumed}/consume")[0] == 200
        time.sleep(0.25)
    assert http(pipes, "GET", "/inference_pipelines/list")[1]["pipelines"] == [consumed]
    assert [s["stream_id"] for s in http(pipes, "GET", "/v1/streams")[1]["streams"]] == [f"{consumed}.0"]
    assert http(pipes, "GET", f"/inference_pipelines/{idle}/status")[0] == 404


def test_terminate_ends_a_pipeline_whose_camera_is_gone(pipes, clips):
    reason = rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    camera = RtspServer({"cam": clips / "long.mp4"}).start()
    try:
        answers = sdk(pipes, [start(camera.url("cam")), ["wait_state", {"state": "RUNNING", "timeout_s": 30}]])
        assert answers[1]["result"]["report"]["sources_metadata"][0]["state"] == "RUNNING", answers
        properties = answers[1]["result"]["report"]["sources_metadata"][0]["source_properties"]
        assert properties["is_file"] is False and properties["is_reconnectable"] is True
        assert properties["width"] == 320 and properties["height"] == 192
    finally:
        camera.stop()  # the camera dies (SIGKILL: no goodbye)
    pipeline_id = answers[0]["result"]["context"]["pipeline_id"]
    (lost,) = sdk(pipes, [["wait_state", {"state": "RESTARTING", "timeout_s": 30, "pipeline": pipeline_id}]])
    (source,) = lost["result"]["report"]["sources_metadata"]
    assert source["state"] == "RESTARTING" and source["error_code"] in CODES, source
    errors = [u for u in lost["result"]["report"]["video_source_status_updates"] if u["event_type"] == "SOURCE_ERROR"]
    assert errors and errors[-1]["payload"]["error_code"] == source["error_code"]
    began = time.monotonic()
    answers = sdk(pipes, [["terminate_inference_pipeline", {"pipeline_id": pipeline_id}],
                          ["list_inference_pipelines", {}]])
    assert answers[0]["result"]["status"] == "success" and answers[1]["result"]["pipelines"] == []
    assert time.monotonic() - began < 20
    assert http(pipes, "GET", "/v1/streams")[1]["streams"] == []


def test_the_token_is_the_api_key(pipes):
    (refused,) = sdk(pipes, [start("scene.mp4")], api_key="wrong")
    assert refused["error"]["status_code"] == 401
    url = f"http://127.0.0.1:{pipes.server.http_port}/inference_pipelines/list"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, params={"api_key": TOKEN}, timeout=10).status_code == 200
    assert requests.get(url, json={"api_key": TOKEN}, timeout=10).status_code == 200
    assert requests.get(url, json={"api_key": "wrong"}, timeout=10).status_code == 401


def test_the_docs_example_runs(pipes, clips):
    (snippet,) = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    (clips / "clip.mp4").write_bytes((clips / "scene.mp4").read_bytes())
    code = (snippet.replace("localhost:8000", f"127.0.0.1:{pipes.server.http_port}")
            .replace('api_key="my-token"', f'api_key="{TOKEN}"'))
    run = subprocess.run([str(SDK_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("1 ") and "'red'" in lines[0] and "'blue'" in lines[0], lines
    assert lines[-1] in ("RUNNING", "ENDED"), lines
