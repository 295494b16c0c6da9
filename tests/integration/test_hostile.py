"""Hostile input over all five transports: gRPC KServe, the gRPC video API, Roboflow's HTTP
API, KServe REST and raw HTTP. Each case asserts its status (never INTERNAL / 500, never a
hang: every call is bounded), and that a normal request is still served after it. The
server runs with a token, a 2 MB message cap and the fake network (``tests/fakes.py``)."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import socket
import struct
import zlib

import grpc
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import png, scene
from .conftest import running_server

MODEL = "instance_segmentation"
TOKEN = "h0stile"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT_S = 20  # no call of this suite may hang
GOOD = png(scene(240, 320, red=(20, 20, 120, 120)))
GOOD_B64 = base64.b64encode(GOOD).decode()


@pytest.fixture(scope="module")
def hostile(fake_root):
    with running_server(model_repository=str(fake_root), token=TOKEN, max_message_mb=2,
                        max_bytes_in_flight_mb=8) as running:
        with grpc.insecure_channel(running.address) as channel:
            running.channel = channel
            yield running


# ----------------------------------------------------------------------------- the means


def kserve(server, *, metadata=AUTH, **fields):
    """A ModelInferRequest with an IMAGE input (BYTES [1, 1] of GOOD unless told otherwise);
    returns the status code name."""
    fields.setdefault("model_name", MODEL)
    if "inputs" not in fields:
        fields["inputs"] = [pb.ModelInferRequest.InferInputTensor(
            name="IMAGE", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(bytes_contents=[GOOD]))]
    params = fields.pop("params", {})
    request = pb.ModelInferRequest(**fields)
    for key, value in params.items():
        target = request.parameters[key]
        if isinstance(value, bool):
            target.bool_param = value
        elif isinstance(value, int):
            target.int64_param = value
        elif isinstance(value, float):
            target.double_param = value
        else:
            target.string_param = value
    stub = service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    try:
        stub.ModelInfer(request, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        assert error.details() and "Traceback" not in error.details()
        return error.code().name
    return "OK"


def raw_call(server, method: str, payload: bytes, metadata=AUTH) -> str:
    call = server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def uint8(shape, data: bytes | None = None, extra_raw: int = 0):
    tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="UINT8", shape=shape)
    size = 1
    for n in shape:
        size *= n
    raw = data if data is not None else bytes(min(size, 1 << 20))
    return {"inputs": [tensor], "raw_input_contents": [raw] * (1 + extra_raw)}


def image(data: bytes):
    return {"inputs": [pb.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(bytes_contents=[data]))]}


def video(server, *frames, metadata=AUTH) -> str:
    """The stream's first in-stream error's status (or the call's, or OK)."""
    stub = video_pb2_grpc.VideoSegmentationStub(server.channel)
    try:
        results = list(stub.StreamFrames(iter(frames), metadata=metadata, timeout=TIMEOUT_S))
    except grpc.RpcError as error:
        return error.code().name
    assert len(results) == len(frames)  # one answer per frame, whatever went wrong
    errors = [r.error.split(":")[0] for r in results if r.error]
    return errors[0] if errors else "OK"


def frame(**fields):
    fields.setdefault("stream_id", "cam")
    if "raw" not in fields:
        fields.setdefault("encoded", GOOD)
    return vpb.Frame(**fields)


def web_call(server, method: str, path: str, body: bytes | str = b"", headers=None, token=True) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=TIMEOUT_S)
    headers = dict(headers or {})
    if token:
        headers.setdefault("Authorization", f"Bearer {TOKEN}")
    connection.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=headers)
    response = connection.getresponse()
    text = response.read()
    connection.close()
    assert b"Traceback" not in text
    if response.status != 200 and path != "/" and not path.startswith("/v2/health"):
        assert json.loads(text), text  # errors are JSON with a message
    return response.status


def raw_http(server, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/") else 0


def nested(depth: int = 50_000) -> str:
    return "[" * depth + "]" * depth


def big_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's announcement)."""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@functools.cache
def black_png(width: int, height: int) -> bytes:
    """A whole, valid grey PNG of width x height, a few KB that decode to width x height."""
    rows = zlib.compress((b"\0" * (width + 1)) * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ppm() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PPM")
    return buffer.getvalue()


def multipart(body: bytes, boundary: str | None) -> dict:
    kind = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"Content-Type": kind}


V1 = "/infer/instance_segmentation"


def v1(**fields) -> str:
    return json.dumps({"model_id": f"{MODEL}/1", "image": {"type": "base64", "value": GOOD_B64}, **fields})


def rest_infer(**fields) -> str:
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [GOOD_B64]}]}
    body.update(fields)
    return json.dumps(body)


# ----------------------------------------------------------------------------- the cases

SEQUENCE = {"sequence_id": 31, "sequence_start": True}
CASES = {
    # gRPC KServe
    "grpc/garbage protobuf": (lambda s: raw_call(s, "/inference.GRPCInferenceService/ModelInfer", b"\xff\xff\xff\x0f!"), "INVALID_ARGUMENT"),
    "grpc/unimplemented method": (lambda s: raw_call(s, "/inference.GRPCInferenceService/TraceSetting", b""), "UNIMPLEMENTED"),
    "grpc/no token": (lambda s: kserve(s, metadata=()), "UNAUTHENTICATED"),
    "grpc/wrong token": (lambda s: kserve(s, metadata=(("authorization", "Bearer nope"),)), "UNAUTHENTICATED"),
    "grpc/unknown model": (lambda s: kserve(s, model_name="nope"), "NOT_FOUND"),
    "grpc/unknown version": (lambda s: kserve(s, model_version="7"), "NOT_FOUND"),
    "grpc/no input": (lambda s: kserve(s, inputs=[]), "INVALID_ARGUMENT"),
    "grpc/an extra input": (lambda s: kserve(s, inputs=[*image(GOOD)["inputs"], pb.ModelInferRequest.InferInputTensor(name="X", datatype="BYTES", shape=[1, 1])]), "INVALID_ARGUMENT"),
    "grpc/FP32 input": (lambda s: kserve(s, inputs=[pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="FP32", shape=[1, 2, 2, 3])]), "INVALID_ARGUMENT"),
    "grpc/garbage image": (lambda s: kserve(s, **image(b"garbage")), "INVALID_ARGUMENT"),
    "grpc/empty image": (lambda s: kserve(s, **image(b"")), "INVALID_ARGUMENT"),
    "grpc/truncated PNG": (lambda s: kserve(s, **image(GOOD[: len(GOOD) // 2])), "INVALID_ARGUMENT"),
    "grpc/a PPM (format not accepted)": (lambda s: kserve(s, **image(ppm())), "INVALID_ARGUMENT"),
    "grpc/bomb header 20000x20000": (lambda s: kserve(s, **image(big_png_header(20000, 20000))), "INVALID_ARGUMENT"),
    "grpc/two 6000x6000 images in one request": (lambda s: kserve(s, inputs=[pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[2, 1], contents=pb.InferTensorContents(bytes_contents=[black_png(6000, 6000)] * 2))]), "INVALID_ARGUMENT"),
    "grpc/UINT8 batch of 0": (lambda s: kserve(s, **uint8([0, 10, 10, 3], b"")), "INVALID_ARGUMENT"),
    "grpc/UINT8 shape 2**62": (lambda s: kserve(s, **uint8([2**62, 1, 1, 3], b"\0\0\0")), "INVALID_ARGUMENT"),
    "grpc/UINT8 short of bytes": (lambda s: kserve(s, **uint8([1, 10, 10, 3], b"\0" * 10)), "INVALID_ARGUMENT"),
    "grpc/UINT8 four channels": (lambda s: kserve(s, **uint8([1, 10, 10, 4])), "INVALID_ARGUMENT"),
    "grpc/two raw contents for one input": (lambda s: kserve(s, **uint8([1, 10, 10, 3], extra_raw=1)), "INVALID_ARGUMENT"),
    "grpc/BYTES shape [1, 2]": (lambda s: kserve(s, inputs=[pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 2], contents=pb.InferTensorContents(bytes_contents=[GOOD, GOOD]))]), "INVALID_ARGUMENT"),
    "grpc/unknown output": (lambda s: kserve(s, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="NOPE")]), "INVALID_ARGUMENT"),
    "grpc/confidence not a number": (lambda s: kserve(s, params={"confidence": "high"}), "INVALID_ARGUMENT"),
    "grpc/confidence nan": (lambda s: kserve(s, params={"confidence": float("nan")}), "INVALID_ARGUMENT"),
    "grpc/max_detections -1": (lambda s: kserve(s, params={"max_detections": -1}), "INVALID_ARGUMENT"),
    "grpc/mask format unknown": (lambda s: kserve(s, params={"response_mask_format": "bitmap"}), "INVALID_ARGUMENT"),
    "grpc/timeout negative": (lambda s: kserve(s, params={"timeout": -5}), "INVALID_ARGUMENT"),
    "grpc/minimum_consecutive_frames nan": (lambda s: kserve(s, params={**SEQUENCE, "minimum_consecutive_frames": float("nan")}), "INVALID_ARGUMENT"),
    "grpc/minimum_consecutive_frames inf": (lambda s: kserve(s, params={**SEQUENCE, "minimum_consecutive_frames": float("inf")}), "INVALID_ARGUMENT"),
    "grpc/timestamp nan": (lambda s: kserve(s, params={**SEQUENCE, "timestamp": float("nan")}), "INVALID_ARGUMENT"),
    "grpc/tracked batch of two": (lambda s: kserve(s, params=SEQUENCE, inputs=[pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[2, 1], contents=pb.InferTensorContents(bytes_contents=[GOOD, GOOD]))]), "INVALID_ARGUMENT"),
    "grpc/message over the cap": (lambda s: kserve(s, **image(b"\0" * (3 << 20))), "RESOURCE_EXHAUSTED"),
    "grpc/load in mode none": (lambda s: raw_call(s, "/inference.GRPCInferenceService/RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="nope").SerializeToString()), "FAILED_PRECONDITION"),
    # gRPC video
    "video/no token": (lambda s: video(s, frame(), metadata=()), "UNAUTHENTICATED"),
    "video/frame without image": (lambda s: video(s, vpb.Frame(stream_id="cam")), "INVALID_ARGUMENT"),
    "video/garbage frame": (lambda s: video(s, frame(encoded=b"garbage")), "INVALID_ARGUMENT"),
    "video/raw short of bytes": (lambda s: video(s, frame(raw=vpb.RawImage(height=10, width=10, rgb=b"\0" * 10))), "INVALID_ARGUMENT"),
    "video/raw 0x0": (lambda s: video(s, frame(raw=vpb.RawImage(height=0, width=0, rgb=b""))), "INVALID_ARGUMENT"),
    "video/raw over the pixel cap": (lambda s: video(s, frame(raw=vpb.RawImage(height=100000, width=100000, rgb=b""))), "INVALID_ARGUMENT"),
    "video/unknown model": (lambda s: video(s, frame(model="nope")), "NOT_FOUND"),
    "video/confidence 2": (lambda s: video(s, frame(options=vpb.InferOptions(confidence=2))), "INVALID_ARGUMENT"),
    "video/tracked, timestamp nan": (lambda s: video(s, frame(timestamp=float("nan"), options=vpb.InferOptions(track=True))), "INVALID_ARGUMENT"),
    "video/tracked, frame rate inf": (lambda s: video(s, frame(options=vpb.InferOptions(track=True, frame_rate=float("inf")))), "INVALID_ARGUMENT"),
    "video/tracked, 1000 confirm frames": (lambda s: video(s, frame(options=vpb.InferOptions(track=True, minimum_consecutive_frames=1000))), "INVALID_ARGUMENT"),
    "video/garbage protobuf": (lambda s: video_garbage(s), "INVALID_ARGUMENT"),
    # Roboflow's HTTP API
    "roboflow/v1 no token": (lambda s: web_call(s, "POST", V1, v1(), token=False), 401),
    "roboflow/v1 wrong api_key": (lambda s: web_call(s, "POST", V1, v1(api_key="nope"), token=False), 401),
    "roboflow/v1 body not JSON": (lambda s: web_call(s, "POST", V1, "{not json"), 400),
    "roboflow/v1 nested 50k deep": (lambda s: web_call(s, "POST", V1, nested()), 400),
    "roboflow/v1 body a list": (lambda s: web_call(s, "POST", V1, "[1, 2]"), 400),
    "roboflow/v1 no image": (lambda s: web_call(s, "POST", V1, json.dumps({"model_id": f"{MODEL}/1"})), 400),
    "roboflow/v1 image not base64": (lambda s: web_call(s, "POST", V1, v1(image={"type": "base64", "value": "%%%"})), 400),
    "roboflow/v1 image as numpy": (lambda s: web_call(s, "POST", V1, v1(image={"type": "numpy", "value": "x"})), 400),
    "roboflow/v1 image by URL, not allowed": (lambda s: web_call(s, "POST", V1, v1(image={"type": "url", "value": "http://169.254.169.254/"})), 400),
    "roboflow/v1 unknown model": (lambda s: web_call(s, "POST", V1, v1(model_id="nope/1")), 404),
    "roboflow/v1 model_id malformed": (lambda s: web_call(s, "POST", V1, v1(model_id="a/b/c")), 400),
    "roboflow/v1 confidence nan": (lambda s: web_call(s, "POST", V1, v1(confidence="nan")), 400),
    "roboflow/add nested 50k deep": (lambda s: web_call(s, "POST", "/model/add", nested()), 400),
    "roboflow/v0 empty body": (lambda s: web_call(s, "POST", f"/{MODEL}/1"), 400),
    "roboflow/v0 garbage base64": (lambda s: web_call(s, "POST", f"/{MODEL}/1", "not an image"), 400),
    "roboflow/v0 multipart, no boundary": (lambda s: web_call(s, "POST", f"/{MODEL}/1", b"--x\r\n\r\n", multipart(b"", None)), 400),
    "roboflow/v0 multipart, broken part": (lambda s: web_call(s, "POST", f"/{MODEL}/1", b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc", multipart(b"", "xyz")), 400),
    "roboflow/v0 format xml": (lambda s: web_call(s, "POST", f"/{MODEL}/1?format=xml", GOOD_B64), 400),
    "roboflow/v0 confidence text": (lambda s: web_call(s, "POST", f"/{MODEL}/1?confidence=high", GOOD_B64), 400),
    "roboflow/body over the cap": (lambda s: web_call(s, "POST", V1, b"x" * (3 << 20)), 413),
    # KServe REST
    "rest/no token": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", rest_infer(), token=False), 401),
    "rest/infer body not JSON": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", "{"), 400),
    "rest/infer nested 50k deep": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", nested()), 400),
    "rest/infer unknown model": (lambda s: web_call(s, "POST", "/v2/models/nope/infer", rest_infer()), 404),
    "rest/infer inputs not a list": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", rest_infer(inputs=7)), 400),
    "rest/infer data not base64": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", rest_infer(inputs=[{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [5]}])), 400),
    "rest/infer header length past the body": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", rest_infer(), {"Inference-Header-Content-Length": "999999"}), 400),
    "rest/infer tracked, confirm frames nan": (lambda s: web_call(s, "POST", f"/v2/models/{MODEL}/infer", rest_infer(parameters={"sequence_id": 3, "minimum_consecutive_frames": "nan"})), 400),
    "rest/index body a list": (lambda s: web_call(s, "POST", "/v2/repository/index", "[]"), 400),
    "rest/index body a string": (lambda s: web_call(s, "POST", "/v2/repository/index", '"x"'), 400),
    "rest/index nested 50k deep": (lambda s: web_call(s, "POST", "/v2/repository/index", nested()), 400),
    "rest/load in mode none": (lambda s: web_call(s, "POST", "/v2/repository/models/nope/load"), 400),
    # raw HTTP
    "raw/garbage request line": (lambda s: raw_http(s, b"\x16\x03\x01garbage\r\n\r\n"), 400),
    "raw/header line too long": (lambda s: raw_http(s, b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"), 400),
    "raw/unknown path": (lambda s: web_call(s, "GET", "/no/such/path/here"), 404),
    "raw/wrong method": (lambda s: web_call(s, "DELETE", "/v2/repository/index"), 405),
}


def video_garbage(server) -> str:
    call = server.channel.stream_stream("/rleserving.v1.VideoSegmentation/StreamFrames",
                                        request_serializer=None, response_deserializer=None)
    try:
        list(call(iter([b"\xff\xff\xff\x0f!"]), metadata=AUTH, timeout=TIMEOUT_S))
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def test_the_suite_is_large_enough():
    transports = {name.split("/")[0] for name in CASES}
    assert len(CASES) >= 60 and transports == {"grpc", "video", "roboflow", "rest", "raw"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_gets_its_status_and_the_server_keeps_serving(hostile, case):
    attempt, expected = CASES[case]
    assert attempt(hostile) == expected
    assert kserve(hostile) == "OK"  # a normal request right after


def test_no_client_error_leaves_a_traceback_in_the_log(hostile, caplog):
    with caplog.at_level("INFO"):
        for case in ("grpc/garbage protobuf", "grpc/unimplemented method", "raw/garbage request line",
                     "roboflow/v1 nested 50k deep", "rest/index body a list", "grpc/garbage image"):
            CASES[case][0](hostile)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_a_request_past_its_pixel_budget_is_refused_before_decoding(hostile):
    """Two 6000 x 6000 images (each under the per-image cap) hold more pixels together than
    one request may ask the server to decode."""
    bomb = black_png(6000, 6000)
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="BYTES", shape=[2, 1], contents=pb.InferTensorContents(bytes_contents=[bomb, bomb]))])
    with pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(hostile.channel).ModelInfer(request, metadata=AUTH, timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels together" in info.value.details()


def test_the_guard_keeps_every_kind_of_call_working(hostile):
    """The MessageGuard wraps every method: health's Check (unary) and Watch (a server stream
    whose handler writes its answers itself) and reflection (a bidirectional stream) still
    answer, without the token, as probes need."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(hostile.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == serving
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert next(watch).status == serving
    watch.cancel()
    reflection = reflection_pb2_grpc.ServerReflectionStub(hostile.channel)
    (answer,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S)
    names = {s.name for s in answer.list_services_response.service}
    assert "inference.GRPCInferenceService" in names
