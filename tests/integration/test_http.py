"""HTTP on the same server: Roboflow's inference API driven by the OFFICIAL inference-sdk
(unmodified, from .venv-sdk), KServe v2 REST by the official tritonclient.http, bad input on
every route, token auth. Answers equal gRPC's for the same images. The fake network's
synthetic scenes (``tests/fakes.py``) stand in for photos."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
import tritonclient.http as http_client
from pycocotools import mask as coco_mask
from tritonclient.utils import InferenceServerException

from ..conftest import ROOT
from ..fakes import png, scene
from .conftest import running_server

MODEL = "instance_segmentation"
SDK_PYTHON = ROOT / ".venv-sdk/bin/python"
DRIVER = ROOT / "tests/integration/sdk_driver.py"


SCENES = {  # name -> (H, W, 3) RGB: a few saturated rectangles the fake network finds
    "bus": scene(480, 640, red=(40, 60, 200, 400), green=(300, 100, 420, 220), blue=(500, 300, 620, 460)),
    "coffee": scene(300, 400, green=(100, 60, 260, 220)),
}


def sample_bytes(name: str) -> bytes:
    return png(SCENES[name])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in SCENES:
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(sample_bytes(name))
    return paths


def http_url(server, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def grpc_documents(server, image: bytes, parameters: dict) -> dict:
    client = grpc_client.InferenceServerClient(server.address)
    tensor = grpc_client.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    doc = json.loads(client.infer(MODEL, [tensor], parameters=parameters).as_numpy("DETECTIONS")[0, 0])
    client.close()
    return doc


def without_ids(predictions: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "detection_id"} for p in predictions]


# ------------------------------------------------------------------ the official inference-sdk


@pytest.fixture(scope="module")
def sdk(server, photos) -> dict[tuple[str, str], list[dict]]:
    """(mode, mask format) -> the SDK's results: both photos with RLE, coffee by default."""
    assert SDK_PYTHON.exists(), "run `make sdk-env` (make test does)"
    jobs = {(mode, "rle"): [photos["bus"], photos["coffee"]] for mode in ("v0", "v1")}
    jobs.update({(mode, "default"): [photos["coffee"]] for mode in ("v0", "v1")})
    run = subprocess.run([str(SDK_PYTHON), str(DRIVER), http_url(server),
                          *(",".join([mode, fmt, *map(str, images)]) for (mode, fmt), images in jobs.items())],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert all("results" in job for job in out), out
    return {key: job["results"] for key, job in zip(jobs, out)}


@pytest.mark.parametrize("mode", ["v0", "v1"])
def test_the_sdk_with_rle_gets_grpcs_masks_byte_for_byte(server, sdk, mode):
    (bus, coffee) = sdk[mode, "rle"]
    for doc, name in ((bus, "bus"), (coffee, "coffee")):
        assert {"inference_id", "time", "image", "predictions"} <= set(doc)
        expected = grpc_documents(server, sample_bytes(name), {"response_mask_format": "rle"})
        assert doc["image"] == expected["image"]
        assert without_ids(doc["predictions"]) == without_ids(expected["predictions"])
        H, W = doc["image"]["height"], doc["image"]["width"]
        for p in doc["predictions"]:
            assert p["mask_format"] == "rle" and p["rle"]["size"] == [H, W]
            mask = coco_mask.decode({"size": [H, W], "counts": p["rle"]["counts"].encode()})
            ys, xs = np.nonzero(mask)
            assert len(ys) and xs.min() >= np.floor(p["x"] - p["width"] / 2)
            assert xs.max() < np.ceil(p["x"] + p["width"] / 2)
            assert ys.min() >= np.floor(p["y"] - p["height"] / 2)
            assert ys.max() < np.ceil(p["y"] + p["height"] / 2)
    assert {p["class"] for p in bus["predictions"]} == {"red", "green", "blue"}


@pytest.mark.parametrize("mode", ["v0", "v1"])
def test_the_sdk_without_a_mask_format_gets_roboflows_polygons(server, sdk, mode):
    (doc,) = sdk[mode, "default"]
    expected = grpc_documents(server, sample_bytes("coffee"), {"response_mask_format": "polygon"})
    assert doc["predictions"] and all(p["mask_format"] == "polygon" and len(p["points"]) >= 3
                                      for p in doc["predictions"])
    assert without_ids(doc["predictions"]) == without_ids(expected["predictions"])


# ------------------------------------------------------------------ KServe v2 REST (tritonclient.http)


@pytest.fixture(scope="module")
def rest(server):
    client = http_client.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    yield client
    client.close()


def test_rest_health_metadata_config_statistics(rest):
    assert rest.is_server_live() and rest.is_server_ready() and rest.is_model_ready(MODEL)
    assert not rest.is_model_ready("fake_seg")
    assert rest.get_server_metadata()["name"] == "rle-serving"
    meta = rest.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {"DETECTIONS", "RLE_COUNTS", "BOXES"} <= {o["name"] for o in meta["outputs"]}
    config = rest.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] == 2000000
    index = {m["name"]: m["state"] for m in rest.get_model_repository_index()}
    assert index == {MODEL: "READY", "fake_seg": "UNAVAILABLE"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rest_infer_equals_grpc(server, rest, binary):
    bus = sample_bytes("bus")
    tensor = http_client.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[bus]], dtype=object), binary_data=True)
    outputs = [http_client.InferRequestedOutput(n, binary_data=binary)
               for n in ("DETECTIONS", "RLE_COUNTS", "BOXES", "NUM_DETECTIONS")]
    result = rest.infer(MODEL, [tensor], outputs=outputs, parameters={"response_mask_format": "rle"})
    doc = json.loads(result.as_numpy("DETECTIONS")[0, 0])
    expected = grpc_documents(server, bus, {"response_mask_format": "rle"})
    assert without_ids(doc["predictions"]) == without_ids(expected["predictions"])
    counts = [c.decode() if isinstance(c, bytes) else c for c in result.as_numpy("RLE_COUNTS")[0]]
    assert counts == [p["rle"]["counts"] for p in expected["predictions"]]
    assert result.as_numpy("BOXES").shape == (1, len(counts), 4)
    assert int(result.as_numpy("NUM_DETECTIONS")[0, 0]) == len(counts)
    stats = rest.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["inference_count"] >= 1 and stats["inference_stats"]["success"]["count"] >= 1


def test_rest_raw_uint8_pixels(rest):
    rgb = SCENES["coffee"]
    tensor = http_client.InferInput("IMAGE", [1, *rgb.shape], "UINT8")
    tensor.set_data_from_numpy(rgb[None])
    doc = json.loads(rest.infer(MODEL, [tensor]).as_numpy("DETECTIONS")[0, 0])
    assert [p["class"] for p in doc["predictions"]] == ["green"]


# ------------------------------------------------------------------ bad input, still serving


def still_serves(server):
    status, doc = post(http_url(server, f"/{MODEL}/1"), base64.b64encode(sample_bytes("coffee")))
    assert status == 200 and doc["predictions"]


B64 = base64.b64encode(b"not an image at all")


@pytest.mark.parametrize("path, body, status, key, words", [
    (f"/{MODEL}/1", b"", 400, "message", "body is empty"),
    (f"/{MODEL}/1", b"%%% not base64 %%%", 400, "message", "not base64"),
    (f"/{MODEL}/1", B64, 400, "message", "not a decodable image"),
    (f"/{MODEL}/1?confidence=lots", B64, 400, "message", "'confidence' must be a number"),
    (f"/{MODEL}/1?max_detections=-4", B64, 400, "message", "max_detections must be in"),
    (f"/{MODEL}/1?response_mask_format=bitmap", B64, 400, "message", "unknown mask format"),
    (f"/{MODEL}/1?format=svg", B64, 400, "message", "format must be"),
    (f"/{MODEL}/1?image=http://169.254.169.254/latest", b"", 400, "message", "images by URL are refused"),
    (f"/{MODEL}/7", B64, 404, "message", "no version '7'"),
    ("/nope/1", B64, 404, "message", "unknown model 'nope'"),
    ("/infer/instance_segmentation", b"{not json", 400, "message", "not valid JSON"),
    ("/infer/instance_segmentation", b'{"model_id": "instance_segmentation/1"}', 400, "message", "'image' is required"),
    ("/infer/instance_segmentation", b'{"model_id": "x", "image": {"value": "AA=="}}', 400, "message", "model_id must be"),
    ("/infer/instance_segmentation", b'{"model_id": "nope/1", "image": {"value": "AA=="}}', 404, "message", "unknown model"),
    ("/infer/instance_segmentation", b'{"model_id": "instance_segmentation/1", "image": {"type": "url", "value": "http://10.0.0.1/x.jpg"}}', 400, "message", "images by URL are refused"),
    ("/infer/instance_segmentation", b'{"model_id": "instance_segmentation/1", "image": {"type": "numpy", "value": "AA=="}}', 400, "message", "type 'numpy' is not accepted"),
    ("/infer/instance_segmentation", b'{"model_id": "instance_segmentation/1", "image": {"value": "AA=="}, "confidence": 7}', 400, "message", "confidence must be in [0, 1]"),
    ("/model/add", b'{"model_id": "fake_seg/1"}', 404, "message", "not served directly"),
    ("/model/add", b"[]", 400, "message", "JSON object"),
    (f"/v2/models/{MODEL}/infer", b"{bad", 400, "error", "not valid JSON"),
    (f"/v2/models/{MODEL}/infer", b'{"inputs": 3}', 400, "error", "'inputs' must be a list"),
    (f"/v2/models/{MODEL}/infer", b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}', 400, "error", "not a decodable image"),
    (f"/v2/models/{MODEL}/infer", b'{"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', 400, "error", "must be BYTES"),
    (f"/v2/models/{MODEL}/infer", b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 99}}]}', 400, "error", "does not fit"),
    (f"/v2/models/{MODEL}/infer", b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}], "outputs": [{"name": "MASKS"}]}', 400, "error", "unknown output"),
    ("/v2/models/nope/infer", b'{"inputs": []}', 404, "error", "unknown model"),
])
def test_bad_requests_get_a_status_and_a_message_and_the_server_keeps_serving(server, path, body, status, key, words):
    got, doc = post(http_url(server, path), body)
    assert got == status and words in doc[key], (got, doc)
    still_serves(server)


def test_an_oversized_body_is_refused_before_it_is_read(fake_root):
    with running_server(model_repository=str(fake_root), max_message_mb=1) as small:
        got, doc = post(http_url(small, f"/{MODEL}/1"), b"A" * (2 * 1024 * 1024))
        assert got == 413 and "exceeds the 1048576-byte limit" in doc["message"]
        still_serves(small)


def test_token_is_required_as_bearer_or_api_key_and_health_stays_open(fake_root):
    body = base64.b64encode(sample_bytes("coffee"))
    with running_server(model_repository=str(fake_root), token="s3cret") as guarded:
        assert urllib.request.urlopen(http_url(guarded, "/v2/health/live"), timeout=10).status == 200
        got, doc = post(http_url(guarded, f"/{MODEL}/1"), body)
        assert got == 401 and "token" in doc["message"]
        assert post(http_url(guarded, f"/{MODEL}/1?api_key=wrong"), body)[0] == 401
        assert post(http_url(guarded, f"/{MODEL}/1?api_key=s3cret"), body)[0] == 200
        assert post(http_url(guarded, f"/{MODEL}/1"), body, {"Authorization": "Bearer s3cret"})[0] == 200
        v1 = json.dumps({"model_id": f"{MODEL}/1", "api_key": "s3cret",
                         "image": {"type": "base64", "value": body.decode()}}).encode()
        assert post(http_url(guarded, "/infer/instance_segmentation"), v1)[0] == 200
        rest = http_client.InferenceServerClient(f"127.0.0.1:{guarded.server.http_port}")
        with pytest.raises(InferenceServerException, match="token"):
            rest.get_model_metadata(MODEL)
        assert rest.get_model_metadata(MODEL, headers={"Authorization": "Bearer s3cret"})["name"] == MODEL
        rest.close()


def test_format_image_returns_a_picture_and_http_is_counted_in_metrics(server):
    request = urllib.request.Request(http_url(server, f"/{MODEL}/1?format=image"),
                                     data=base64.b64encode(sample_bytes("bus")), method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        picture = response.read()
    assert picture[:2] == b"\xff\xd8" and len(picture) > 10000
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("nv_inference_request_success{"))
    assert float(line.split()[-1]) >= 3


def test_while_draining_inference_is_503_and_readiness_400(fake_root):
    with running_server(model_repository=str(fake_root)) as draining:
        draining.server.state.draining = True  # what drain() sets first
        got, doc = post(http_url(draining, f"/{MODEL}/1"), base64.b64encode(sample_bytes("coffee")))
        assert got == 503 and "shutting down" in doc["message"]  # the SDK retries 503
        request = urllib.request.Request(http_url(draining, "/v2/health/ready"))
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 400


def test_image_urls_are_fetched_only_when_allowed(tmp_path, fake_root):
    import http.server
    import threading
    from functools import partial

    (tmp_path / "coffee.jpg").write_bytes(sample_bytes("coffee"))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    body = json.dumps({"model_id": f"{MODEL}/1", "image": {"type": "url", "value": f"{url}/coffee.jpg"}}).encode()
    try:
        with running_server(model_repository=str(fake_root), allow_image_urls=True,
                            image_url_allow=("127.0.0.1",)) as allowed:  # a loopback image server
            got, doc = post(http_url(allowed, "/infer/instance_segmentation"), body)
            assert got == 200 and [p["class"] for p in doc["predictions"]] == ["green"]
            missing = body.replace(b"coffee.jpg", b"missing.jpg")
            got, doc = post(http_url(allowed, "/infer/instance_segmentation"), missing)
            assert got == 400 and "could not be fetched" in doc["message"] and "404" not in doc["message"]
    finally:
        files.shutdown()
