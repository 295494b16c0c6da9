"""The KServe v2 (Triton) protocol's content, shared by its gRPC and HTTP/REST transports.

Both transports deliver a request's inputs as ``InputTensor``s and its parameters as plain
values; ``request_of`` reads them into the one ``InferRequest`` every frontend runs, and
``output_tensors`` turns an ``Answer`` into the tensors both transports send.

The pipeline model takes ``IMAGE``: BYTES [B, 1] (encoded images) or UINT8 [B, H, W, 3] (raw
RGB), and request parameters ``response_mask_format`` ("rle" or "polygon"), ``confidence``,
``iou_threshold``, ``max_detections`` and Triton's ``timeout``. It returns ``DETECTIONS``
(BYTES [B, 1], one JSON document per image) and typed tensors padded to the most detections
K in the request: NUM_DETECTIONS INT32 [B, 1], BOXES FP32 [B, K, 4] (x1, y1, x2, y2),
SCORES FP32 [B, K], CLASS_IDS INT32 [B, K], RLE_COUNTS BYTES [B, K], IMAGE_SIZE INT32 [B, 2].

Metadata, configuration, statistics and the repository index are built here as the
protobuf messages ``tritonclient`` ships; the HTTP transport renders them as JSON.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from ..errors import BadInputError
from ..images import check_image_size
from ..schema import DEFAULT_OUTPUTS, OUTPUTS, output_arrays
from ..serving.request import Answer, InferRequest
from ..serving.shared_memory import Reference, Region, SharedMemory
from ..serving.state import VERSION, ServingState

SERVER_NAME = "rle-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "parameters",
              "schedule_policy", "model_repository"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # listed when --allow-shared-memory
INPUT = "IMAGE"


def decode_bytes_tensor(raw: bytes | memoryview) -> list[bytes | memoryview]:
    """Triton's BYTES wire format: each element is a 4-byte little-endian length + bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInputError("BYTES tensor is truncated (a length prefix is cut off)")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise BadInputError(
                f"BYTES tensor is truncated (element claims {length} bytes, {len(raw) - pos} left)"
            )
        out.append(raw[pos : pos + length])
        pos += length
    return out


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@dataclass(frozen=True)
class InputTensor:
    """One input as a transport delivered it: raw bytes (binary / raw_input_contents: a view
    of the message where the transport kept it) or ``values`` (typed contents / JSON data),
    never both."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    values: Sequence[Any] | None = None


def input_tensor(name: str, datatype: str, shape: list[int], parameters: Mapping[str, Any],
                 regions: SharedMemory, raw: bytes | memoryview | None = None,
                 values: Sequence[Any] | None = None) -> InputTensor:
    """An input as a transport delivered it; one that names a shared memory region
    (``shared_memory_*`` parameters) is read from there now, so it carries raw bytes like any."""
    ref = Reference.of(parameters, f"input {name!r}")
    if ref is None:
        return InputTensor(name, datatype, shape, raw=raw, values=values)
    if raw is not None or values:
        raise BadInputError(f"input {name!r} names shared memory region {ref.region!r} and carries "
                            "data too; send one or the other")
    return InputTensor(name, datatype, shape, raw=regions.read(ref, f"input {name!r}"))


class SharedOutputs:
    """The outputs a request asked to have written to shared memory, their regions held from
    its arrival (an unregister meanwhile does not pull the memory from under it)."""

    def __init__(self, requested: Sequence[tuple[str, Mapping[str, Any]]], regions: SharedMemory):
        self.targets: dict[str, tuple[Region, Reference]] = {}
        for name, parameters in requested:
            ref = Reference.of(parameters, f"output {name!r}")
            if ref is not None:
                self.targets[name] = (regions.region(ref.region), ref)

    def place(self, name: str, array: np.ndarray) -> bool:
        """Write the output to its region if it has one (True); BadInputError if it does not fit."""
        if name not in self.targets:
            return False
        region, ref = self.targets[name]
        region.write(ref, raw_contents(array), f"output {name!r}")
        return True


def request_of(model: str, version: str, params: dict[str, Any], inputs: Sequence[InputTensor],
               outputs: Sequence[str], deadline: float | None = None) -> InferRequest:
    """A KServe v2 inference request, read once: BadInputError if anything is unusable."""
    requested_outputs(outputs)  # refuse before any work
    images = images_of(inputs)
    return InferRequest.read(model, version, images, params, deadline=deadline, outputs=outputs)


def images_of(inputs: Sequence[InputTensor]) -> list[Any]:
    """The request's images: encoded bytes or (H, W, 3) uint8 arrays; BadInputError else."""
    names = [t.name for t in inputs]
    if INPUT not in names:
        raise BadInputError(f"missing input {INPUT!r} (got {names or 'none'})")
    extra = [n for n in names if n != INPUT]
    if extra:
        raise BadInputError(f"unexpected input(s) {extra}; the model takes only {INPUT!r}")
    tensor = inputs[names.index(INPUT)]
    shape = list(tensor.shape)
    if tensor.datatype == "BYTES":
        if shape[:1] == [0]:
            raise BadInputError(f"{INPUT} shape {shape} is a batch of 0 images; send at least one")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise BadInputError(f"{INPUT} as BYTES must have shape [B, 1], got {shape}")
        items = decode_bytes_tensor(tensor.raw) if tensor.raw is not None else list(tensor.values or [])
        if len(items) != shape[0]:
            raise BadInputError(f"{INPUT} shape {shape} promises {shape[0]} images, got {len(items)}")
        images: list[Any] = items
    elif tensor.datatype == "UINT8":
        if len(shape) == 3:
            shape = [1, *shape]
        if len(shape) != 4 or shape[3] != 3 or min(shape) < 0:
            raise BadInputError(f"{INPUT} as UINT8 must have shape [B, H, W, 3], got {list(tensor.shape)}")
        if shape[0] == 0:
            raise BadInputError(f"{INPUT} shape {shape} is a batch of 0 images; send at least one")
        check_image_size(shape[1], shape[2])
        if tensor.raw is not None:
            data = tensor.raw
        else:
            try:
                values = np.asarray(tensor.values or [], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise BadInputError(f"{INPUT} as UINT8 must hold integers 0..255") from None
            if values.size and (values.min() < 0 or values.max() > 255):  # else wrapped silently
                raise BadInputError(f"{INPUT} as UINT8 must hold integers 0..255, got "
                                    f"{values.min()}..{values.max()}")
            data = values.astype(np.uint8).tobytes()
        # Python ints: np.prod is int64 and wraps (shape [2**62, 1, 1, 3] "needs" negative bytes)
        needed = math.prod(shape)
        if len(data) != needed:
            raise BadInputError(f"{INPUT} shape {shape} needs {needed} bytes, got {len(data)}")
        pixels = np.frombuffer(data, np.uint8).reshape(shape)
        images = [pixels[i] for i in range(shape[0])]
    else:
        raise BadInputError(
            f"{INPUT} must be BYTES (encoded images) or UINT8 [B, H, W, 3], got {tensor.datatype}"
        )
    return images


def requested_outputs(names: Sequence[str], tracked: bool = False) -> list[str]:
    """The outputs a request asks for (when it names none: all, TRACKER_IDS if tracked)."""
    requested = list(names) or [*DEFAULT_OUTPUTS, *(["TRACKER_IDS"] if tracked else [])]
    unknown = [n for n in requested if n not in OUTPUTS]
    if unknown:
        raise BadInputError(f"unknown output(s) {unknown}; the model offers {list(OUTPUTS)}")
    return requested


def output_tensors(answer: Answer, names: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    """(name, KServe datatype, array) of each requested output; BYTES as object arrays."""
    dets = answer.detections
    wanted = requested_outputs(names, tracked=any(d.tracker_ids is not None for d in dets))
    arrays = output_arrays(dets, wanted, answer.pipe.class_names, answer.options.mask_format)
    return [(name, OUTPUTS[name][0], array) for name, array in arrays.items()]


def raw_contents(array: np.ndarray) -> bytes:
    """An output's bytes as both transports send them (BYTES length-prefixed)."""
    if array.dtype == object:
        return encode_bytes_tensor(list(array.reshape(-1)))
    return np.ascontiguousarray(array).tobytes()


# ------------------------------------------------------------------ metadata and statistics


def server_ready(state: ServingState) -> bool:
    return bool(state.pipelines) and not state.draining


def model_ready(state: ServingState, name: str, version: str) -> bool:
    return name in state.pipelines and version in ("", VERSION) and not state.draining


def server_metadata(state: ServingState) -> pb.ServerMetadataResponse:
    extensions = EXTENSIONS + ([SHARED_MEMORY_EXTENSION] if state.shared_memory.enabled else [])
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=extensions)


def model_metadata(state: ServingState, name: str, version: str) -> pb.ModelMetadataResponse:
    pipe = state.lookup(name, version)
    response = pb.ModelMetadataResponse(name=pipe.name, versions=[VERSION], platform=pipe.entry.platform)
    response.inputs.add(name=INPUT, datatype="BYTES", shape=[-1, 1])
    for output, (datatype, dims) in OUTPUTS.items():
        response.outputs.add(name=output, datatype=datatype, shape=[-1, *dims])
    return response


def model_config(state: ServingState, name: str, version: str) -> mc.ModelConfig:
    pipe = state.lookup(name, version)
    config = mc.ModelConfig()
    config.CopyFrom(pipe.entry.config)
    declared = {o.name for o in config.output}
    for output, (datatype, dims) in OUTPUTS.items():
        if output not in declared:
            config.output.add(name=output, data_type=mc.DataType.Value(
                "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"), dims=dims)
    return config


def model_statistics(state: ServingState, name: str, version: str) -> pb.ModelStatisticsResponse:
    """Triton's statistics, read from the telemetry ledger (all models when name is '')."""
    names = [name] if name else sorted(state.pipelines)
    response = pb.ModelStatisticsResponse()
    for model in names:
        state.lookup(model, version)
        t = state.ledger.totals(model)
        s = response.model_stats.add(name=model, version=VERSION, last_inference=t.last_inference_ms,
                                     inference_count=t.images, execution_count=t.batches)
        stats = s.inference_stats
        stats.success.count, stats.success.ns = t.requests_ok, t.requests_ok_ns
        stats.fail.count, stats.fail.ns = sum(t.requests_failed.values()), t.requests_failed_ns
        stats.queue.count, stats.queue.ns = t.images, t.queue_ns
        stats.compute_input.count, stats.compute_input.ns = t.images, t.stage_ns["preprocess"]
        stats.compute_infer.count, stats.compute_infer.ns = t.images, t.compute_ns
        stats.compute_output.count, stats.compute_output.ns = t.answered_images, t.output_ns
        for size, count in sorted(t.batch_sizes.items()):
            s.batch_stats.add(batch_size=size).compute_infer.count = count
    return response


def no_overrides(parameters) -> None:
    """Triton lets a load carry a config or files to use instead of the repository's; here
    the repository is the one source (edit its config.pbtxt, then load)."""
    given = [key for key in parameters if key == "config" or key.startswith("file:")]
    if given:
        raise BadInputError(f"load parameters {given} are not supported: edit the model's "
                            "config.pbtxt and files in the repository, then load it")


def repository_index(state: ServingState, ready_only: bool) -> pb.RepositoryIndexResponse:
    response = pb.RepositoryIndexResponse()
    for name in sorted(set(state.pipelines) | set(state.unavailable)):
        if name in state.pipelines:
            response.models.add(name=name, version=VERSION, state="READY")
        elif not ready_only:
            response.models.add(name=name, version=VERSION, state="UNAVAILABLE",
                                reason=str(state.unavailable[name]))
    return response
