"""The protocol parsers, on their own: each transport's message read into the one typed
``InferRequest`` (KServe v2 over gRPC and REST, the video API, Roboflow's parameters), and the
KServe BYTES wire format. Pure: no server, no network."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from pipeline.errors import BadInputError, InvalidOptionError
from pipeline.frontends import grpc_kserve, grpc_video, http_kserve, http_roboflow, kserve
from pipeline.proto import video_pb2 as vpb
from pipeline.serving.request import InferRequest
from pipeline.serving.shared_memory import SharedMemory

# ------------------------------------------------------------------ KServe's BYTES tensors


def test_bytes_tensors_round_trip_and_truncation_is_refused():
    items = [b"", b"a", b"\x00" * 300]
    raw = kserve.encode_bytes_tensor(items)
    assert raw[:4] == struct.pack("<I", 0) and kserve.decode_bytes_tensor(raw) == items
    with pytest.raises(BadInputError, match="length prefix is cut off"):
        kserve.decode_bytes_tensor(raw + b"\x01\x00")
    with pytest.raises(BadInputError, match="claims 300 bytes"):
        kserve.decode_bytes_tensor(raw[:-1])


@pytest.mark.parametrize("tensor, words", [
    (kserve.InputTensor("PICTURE", "BYTES", [1, 1], values=[b"x"]), "missing input 'IMAGE'"),
    (kserve.InputTensor("IMAGE", "BYTES", [2, 1], values=[b"x"]), "promises 2 images, got 1"),
    (kserve.InputTensor("IMAGE", "BYTES", [1, 2], values=[b"x"]), "shape [B, 1]"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 4, 5, 2], raw=bytes(40)), "[B, H, W, 3]"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 4, 5, 3], raw=bytes(59)), "needs 60 bytes, got 59"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 0, 5, 3], raw=b""), "no pixels"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 2, 2, 3], values=["a"] * 12), "integers 0..255"),
    (kserve.InputTensor("IMAGE", "FP32", [1, 2, 2, 3], values=[0.0] * 12), "must be BYTES"),
])
def test_unusable_inputs_name_the_problem(tensor, words):
    with pytest.raises(BadInputError) as info:
        kserve.images_of([tensor])
    assert words in str(info.value)


def test_uint8_inputs_become_images_without_a_copy_of_the_pixels():
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8)
    raw, listed = pixels.tobytes(), pixels.tolist()
    for tensor in (kserve.InputTensor("IMAGE", "UINT8", [2, 3, 4, 3], raw=raw),
                   kserve.InputTensor("IMAGE", "UINT8", [2, 3, 4, 3], values=listed)):
        images = kserve.images_of([tensor])
        assert [i.shape for i in images] == [(3, 4, 3), (3, 4, 3)]
        assert np.array_equal(np.stack(images).reshape(-1), pixels)
    (single,) = kserve.images_of([kserve.InputTensor("IMAGE", "UINT8", [3, 4, 3], raw=raw[:36])])
    assert single.shape == (3, 4, 3)  # [H, W, 3] is one image


# ------------------------------------------------------------------ parameters, read once


def test_parameters_are_read_once_into_typed_fields():
    request = InferRequest.read("m", "1", [b"img"], {
        "confidence": "0.5", "max_detections": 3.0, "response_mask_format": "polygon",
        "timeout": 250000, "sequence_id": 7, "sequence_start": True, "timestamp": "1.5",
        "frame_rate": 10, "unrelated": "ignored"})
    assert request.options == {"confidence": 0.5, "max_detections": 3, "mask_format": "polygon"}
    assert request.timeout_s == 0.25
    tracking = request.tracking
    assert tracking.key == "sequence/m/7" and tracking.restart and not tracking.end
    assert tracking.timestamp == 1.5 and tracking.options.frame_rate == 10
    plain = InferRequest.read("m", "", [b"img"], {"sequence_id": 0})
    assert plain.options == {} and plain.timeout_s is None and plain.tracking is None


@pytest.mark.parametrize("params, key", [
    ({"confidence": "lots"}, "confidence"),
    ({"confidence": 2}, "confidence"),
    ({"iou_threshold": -0.1}, "iou_threshold"),
    ({"max_detections": 2.5}, "max_detections"),
    ({"response_mask_format": "bitmap"}, "response_mask_format"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "soon"}, "timeout"),
    ({"sequence_id": 1, "timestamp": "noon"}, "timestamp"),
    ({"sequence_id": 1, "frame_rate": 0}, "frame_rate"),
])
def test_a_bad_parameter_is_refused_by_name(params, key):
    with pytest.raises(InvalidOptionError) as info:
        InferRequest.read("m", "", [b"img"], params)
    assert info.value.key == key and key in str(info.value)


# ------------------------------------------------------------------ KServe over gRPC


def test_a_grpc_message_is_read_with_its_parameters_inputs_and_outputs():
    message = pb.ModelInferRequest(model_name="m", model_version="1", id="r1")
    message.parameters["confidence"].double_param = 0.4
    message.parameters["response_mask_format"].string_param = "polygon"
    message.parameters["sequence_id"].int64_param = 5
    message.parameters["sequence_end"].bool_param = True
    message.inputs.add(name="IMAGE", datatype="BYTES", shape=[2, 1])
    message.raw_input_contents.append(kserve.encode_bytes_tensor([b"one", b"two"]))
    message.outputs.add(name="BOXES")
    request = grpc_kserve.read_request(message, SharedMemory(), deadline=123.0)
    assert request.images == (b"one", b"two") and request.version == "1"
    assert request.options == {"confidence": pytest.approx(0.4), "mask_format": "polygon"}
    assert request.tracking.key == "sequence/m/5" and request.tracking.end
    assert request.deadline == 123.0 and request.outputs == ("BOXES",)


def test_a_grpc_message_asking_for_an_unknown_output_is_refused():
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"x")
    message.outputs.add(name="MASKS")
    with pytest.raises(BadInputError, match="unknown output"):
        grpc_kserve.read_request(message, SharedMemory())


# ------------------------------------------------------------------ KServe over REST


def rest_call(document: bytes, binary: bytes = b"", split: bool = False):
    header = str(len(document)) if split else None
    return http_kserve.InferCall("m", "", document + binary, header, SharedMemory())


def test_a_rest_body_with_binary_inputs_is_read():
    payload = kserve.encode_bytes_tensor([b"jpeg"])
    document = (b'{"id": "7", "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], '
                b'"parameters": {"binary_data_size": %d}}], "outputs": [{"name": "SCORES", '
                b'"parameters": {"binary_data": true}}], "parameters": {"max_detections": 2}}' % len(payload))
    call = rest_call(document, payload, split=True)
    request = call.read()
    assert request.images == (b"jpeg",) and request.options == {"max_detections": 2}
    assert request.outputs == ("SCORES",) and call.binary_of == {"SCORES": True}
    json_request = rest_call(b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 2, 3], '
                             b'"data": [[[[1, 2, 3], [4, 5, 6]]]]}]}').read()
    assert json_request.images[0].tolist() == [[[1, 2, 3], [4, 5, 6]]]


@pytest.mark.parametrize("body, header, words", [
    (b"{bad", None, "not valid JSON"),
    (b"[]", None, "must be a JSON object"),
    (b'{"inputs": 3}', None, "'inputs' must be a list"),
    (b'{"inputs": [], "parameters": 3}', None, "'parameters' must be an object"),
    (b'{"inputs": [{"name": "IMAGE"}]}', None, "needs a name, a datatype and an integer shape"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1]}]}', None, "neither data"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [3]}]}', None, "must be strings"),
    (b'{"inputs": []}', "99999", "does not fit the body"),
    (b'{"inputs": [], "outputs": [{"nom": 1}]}', None, "with a name"),
])
def test_an_unusable_rest_body_names_the_problem(body, header, words):
    with pytest.raises(BadInputError) as info:
        http_kserve.InferCall("m", "", body, header, SharedMemory()).read()
    assert words in str(info.value)


def test_binary_bytes_nobody_claims_are_refused():
    document = b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}'
    with pytest.raises(BadInputError, match="3 binary bytes after the inputs are unclaimed"):
        rest_call(document, b"abc", split=True).read()


# ------------------------------------------------------------------ the video API


def test_a_frame_is_read_with_its_options_and_its_place_in_a_tracked_stream():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    frame = vpb.Frame(stream_id="cam", frame_index=20, model="other",
                      raw=vpb.RawImage(height=2, width=3, rgb=rgb.tobytes()),
                      options=vpb.InferOptions(confidence=0.5, track=True, frame_rate=10))
    request = grpc_video.request_of(frame, SharedMemory())
    assert np.array_equal(request.images[0], rgb) and request.options == {"confidence": 0.5}
    assert request.tracking.key == "video/0/other/cam"
    assert request.tracking.timestamp == 2.0  # no timestamp: its index over the frame rate
    plain = grpc_video.request_of(vpb.Frame(encoded=b"jpeg", timestamp=3.0), SharedMemory())
    assert plain.images == (b"jpeg",) and plain.tracking is None and plain.options == {}


@pytest.mark.parametrize("frame, words", [
    (vpb.Frame(), "carries no image"),
    (vpb.Frame(raw=vpb.RawImage(height=2, width=2, rgb=b"abc")), "needs 12 bytes, got 3"),
    (vpb.Frame(raw=vpb.RawImage(height=0, width=2)), "no pixels"),
    (vpb.Frame(encoded=b"x", options=vpb.InferOptions(track=True, minimum_iou=2)), "minimum_iou"),
])
def test_an_unusable_frame_names_the_problem(frame, words):
    with pytest.raises(BadInputError) as info:
        grpc_video.request_of(frame, SharedMemory())
    assert words in str(info.value)


# ------------------------------------------------------------------ Roboflow's parameters


def test_roboflow_names_and_percents_become_ours():
    v0 = http_roboflow._parameters({"confidence": "50", "overlap": "30", "max_detections": "4"}, legacy=True)
    assert v0 == {"response_mask_format": "polygon", "confidence": 0.5, "iou_threshold": 0.3,
                  "max_detections": "4"}
    v1 = http_roboflow._parameters({"confidence": 0.4, "iou_threshold": 0.6,
                                    "response_mask_format": "rle"}, legacy=False)
    assert v1 == {"response_mask_format": "rle", "confidence": 0.4, "iou_threshold": 0.6}
    assert "confidence" not in http_roboflow._parameters({"confidence": "default"}, legacy=True)
    with pytest.raises(BadInputError, match="'overlap' must be a number"):
        http_roboflow._parameters({"overlap": "lots"}, legacy=True)


def test_base64_images_and_data_uris_decode_and_garbage_is_refused():
    assert http_roboflow._base64(b"aGVsbG8=\n", "the body") == b"hello"
    assert http_roboflow._base64(b"data:image/png;base64,aGVsbG8=", "the body") == b"hello"
    with pytest.raises(BadInputError, match="image 2 is not base64"):
        http_roboflow._base64(b"%%%", "image 2")


# ------------------------------------------------------------------ KServe tensor shapes (issue 25)


@pytest.mark.parametrize("tensor, words", [
    (kserve.InputTensor("IMAGE", "UINT8", [0, 10, 10, 3], raw=b""), "batch of 0 images"),
    (kserve.InputTensor("IMAGE", "UINT8", [0, 10, 10, 3], values=[]), "batch of 0 images"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 10, 0, 3], raw=b""), "no pixels"),
    (kserve.InputTensor("IMAGE", "UINT8", [10, 0, 3], raw=b""), "no pixels"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 10, 10, 0], raw=b""), "[B, H, W, 3]"),
    (kserve.InputTensor("IMAGE", "BYTES", [0, 1], values=[]), "batch of 0 images"),
    (kserve.InputTensor("IMAGE", "BYTES", [0], raw=b""), "batch of 0 images"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 1, 2, 3], values=[0, 1, 2, 3, 255, 256]), "got 0..256"),
    (kserve.InputTensor("IMAGE", "UINT8", [1, 1, 2, 3], values=[-1, 1, 2, 3, 4, 5]), "got -1..5"),
])
def test_empty_batches_and_out_of_range_pixels_are_refused(tensor, words):
    with pytest.raises(BadInputError) as info:
        kserve.images_of([tensor])
    assert words in str(info.value)


def test_a_huge_uint8_shape_names_its_true_byte_count_never_an_overflowed_one():
    tensor = kserve.InputTensor("IMAGE", "UINT8", [2**62, 1, 1, 3], raw=bytes(3))
    with pytest.raises(BadInputError) as info:
        kserve.images_of([tensor])
    assert f"needs {3 * 2**62} bytes, got 3" in str(info.value)  # np.prod wrapped to negative
    # the same through the gRPC message (int64 shape dims)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="IMAGE", datatype="UINT8", shape=[2**62, 1, 1, 3])
    message.raw_input_contents.append(bytes(3))
    with pytest.raises(BadInputError, match=f"needs {3 * 2**62} bytes"):
        grpc_kserve.read_request(message, SharedMemory())


def test_raw_input_contents_must_be_one_per_input():
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    message.raw_input_contents.append(kserve.encode_bytes_tensor([b"one"]))
    message.raw_input_contents.append(kserve.encode_bytes_tensor([b"ignored today"]))
    with pytest.raises(BadInputError, match="2 raw_input_contents for 1 inputs"):
        grpc_kserve.read_request(message, SharedMemory())
    del message.raw_input_contents[1]
    assert [t.raw for t in grpc_kserve.inputs_of(message, SharedMemory())] == [kserve.encode_bytes_tensor([b"one"])]


def test_a_grpc_message_keeps_its_raw_inputs_where_they_arrived():
    message = pb.ModelInferRequest(model_name="m", id="7")
    message.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2, 2, 3])
    message.outputs.add(name="BOXES")
    message.parameters["confidence"].double_param = 0.5
    pixels = bytes(range(12))
    message.raw_input_contents.append(pixels)
    data = message.SerializeToString()
    received = grpc_kserve.read_infer_message(data)
    assert received.message.model_name == "m" and received.message.id == "7"
    assert not received.message.raw_input_contents  # not copied into the message
    (raw,) = received.raw
    assert isinstance(raw, memoryview) and raw.obj is data and bytes(raw) == pixels  # a view
    request = grpc_kserve.read_request(received.message, SharedMemory(), raw=received.raw)
    assert request.images[0].tolist() == np.frombuffer(pixels, np.uint8).reshape(2, 2, 3).tolist()
    assert request.options == {"confidence": 0.5} and request.outputs == ("BOXES",)
    assert grpc_kserve.read_infer_message(b"") == grpc_kserve.InferMessage(pb.ModelInferRequest(), [])


@pytest.mark.parametrize("data", [b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x0b", b"\xff" * 12])
def test_a_grpc_message_that_is_not_protobuf_is_refused(data):
    with pytest.raises(ValueError):  # MessageGuard answers it INVALID_ARGUMENT
        grpc_kserve.read_infer_message(data)
