"""KServe v2 REST, as ``tritonclient.http`` calls it: an aiohttp app mounted at ``/v2``.

Health, metadata, config, statistics, the repository index and ``POST
/v2/models/{m}[/versions/{v}]/infer`` with JSON tensors or the binary tensor extension. The
protocol's content is ``kserve``'s, shared with gRPC: a body is read once into an
``InferRequest`` (``kserve.request_of``), run by ``inference.run``, and its ``Answer`` written
as a JSON header plus binary outputs. Errors: ``{"error": ...}``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor

from ..errors import BadInputError, NotFoundError, UnavailableError
from ..serving.control import ModelControl
from ..serving.life import run
from ..serving.request import Answer, InferRequest
from ..serving.shared_memory import NO_CUDA, SharedMemory
from ..serving.state import VERSION, ServingState, client_of
from . import kserve
from .http_app import ERROR_FIELD, error_response, json_body, parse_json, whole_body

JSON_HEADER = "Inference-Header-Content-Length"
ERROR_KEY = "error"  # KServe's error document: {"error": message}


def app(state: ServingState, models: ModelControl) -> web.Application:
    """The KServe v2 REST routes (to be mounted at ``/v2``)."""
    api = web.Application()
    api[ERROR_FIELD] = ERROR_KEY
    handlers = _Handlers(state, models)
    r = api.router
    r.add_get("", handlers.server_metadata)
    r.add_get("/health/live", handlers.live)
    r.add_get("/health/ready", handlers.ready)
    r.add_get("/models/stats", handlers.statistics)
    r.add_post("/repository/index", handlers.repository_index)
    r.add_post("/repository/models/{model}/load", handlers.load)
    r.add_post("/repository/models/{model}/unload", handlers.unload)
    for region in ("", "/region/{region}"):  # Triton's shared memory extension
        r.add_get(f"/systemsharedmemory{region}/status", handlers.shared_memory_status)
        r.add_post(f"/systemsharedmemory{region}/unregister", handlers.shared_memory_unregister)
        r.add_get(f"/cudasharedmemory{region}/status", handlers.cuda_status)
        r.add_post(f"/cudasharedmemory{region}/unregister", handlers.cuda_unregister)
    r.add_post("/systemsharedmemory/region/{region}/register", handlers.shared_memory_register)
    r.add_post("/cudasharedmemory/region/{region}/register", handlers.cuda_register)
    for prefix in ("/models/{model}", "/models/{model}/versions/{version}"):
        r.add_get(prefix, handlers.model_metadata)
        r.add_get(prefix + "/ready", handlers.model_ready)
        r.add_get(prefix + "/config", handlers.model_config)
        r.add_get(prefix + "/stats", handlers.statistics)
        r.add_post(prefix + "/infer", handlers.infer)
    return api


class _Handlers:
    def __init__(self, state: ServingState, models: ModelControl):
        self.state = state
        self.models = models

    async def live(self, request):
        return web.Response(status=200)

    async def ready(self, request):
        return web.Response(status=200 if kserve.server_ready(self.state) else 400)

    async def server_metadata(self, request):
        return web.json_response(message_json(kserve.server_metadata(self.state)))

    async def model_metadata(self, request):
        return web.json_response(message_json(kserve.model_metadata(self.state, *_model(request))))

    async def model_ready(self, request):
        return web.Response(status=200 if kserve.model_ready(self.state, *_model(request)) else 400)

    async def model_config(self, request):
        return web.json_response(message_json(kserve.model_config(self.state, *_model(request))))

    async def statistics(self, request):
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return web.json_response(message_json(kserve.model_statistics(self.state, name, version)))

    async def repository_index(self, request):
        body = await _object_body(request, '{"ready": true}')
        index = kserve.repository_index(self.state, bool(body.get("ready")))
        return web.json_response([message_json(m) for m in index.models])

    async def load(self, request):
        body = await _object_body(request, '{"parameters": {}}')
        kserve.no_overrides(body.get("parameters") or {})
        await self.models.load(request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request):
        await self.models.unload(request.match_info["model"])
        return web.Response(status=200)

    async def shared_memory_register(self, request):
        body = await _object_body(request, '{"key": "/frames", "offset": 0, "byte_size": 6220800}')
        missing = [f for f in ("key", "byte_size") if f not in body]
        if missing:
            raise BadInputError(f"registering a region needs {missing}")
        self.state.shared_memory.register(client_of(request.remote or ""), request.match_info["region"],
                                          str(body["key"]), body.get("offset", 0), body["byte_size"])
        return web.Response(status=200)

    async def shared_memory_unregister(self, request):
        self.state.shared_memory.unregister(request.match_info.get("region", ""))
        return web.Response(status=200)

    async def shared_memory_status(self, request):
        return web.json_response(self.state.shared_memory.status(request.match_info.get("region", "")))

    async def cuda_register(self, request):
        raise UnavailableError(NO_CUDA)

    async def cuda_unregister(self, request):
        return web.Response(status=200)  # nothing is registered

    async def cuda_status(self, request):
        name = request.match_info.get("region", "")
        if name:
            raise NotFoundError(f"no CUDA shared memory region {name!r}")
        return web.json_response([])

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        call = InferCall(name, version, await whole_body(request), request.headers.get(JSON_HEADER),
                         self.state.shared_memory)
        return await run(self.state, call, client_of(request.remote or ""))


def _model(request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


async def _object_body(request, example: str) -> dict:
    """A body that is a JSON object, or none at all ({})."""
    body = await json_body(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise BadInputError(f"the body must be a JSON object, e.g. {example}, or empty")
    return body


# ----------------------------------------------------------------------------- one call


class InferCall:
    """One REST inference call as a ``serving.life.Call``: ``read`` reads its body once (the
    JSON document, then the binary inputs after it); ``respond`` answers with what the
    document asked for (a JSON header, binary outputs after it); ``fail`` with ``{"error"}``."""

    api = "kserve_http"  # the books' name for the way it came in

    def __init__(self, model: str, version: str, body: bytes | memoryview, header_length: str | None,
                 regions: SharedMemory):
        self.model, self.version, self.body, self.header_length = model, version, body, header_length
        self.regions = regions
        self.document: dict = {}
        self.binary_of: dict[str, bool | None] = {}  # output -> binary? (None: not said)
        self.shared: kserve.SharedOutputs | None = None

    def read(self) -> InferRequest:
        body, header_length = self.body, self.header_length
        try:
            split = int(header_length) if header_length is not None else len(body)
            if not 0 <= split <= len(body):
                raise ValueError
        except ValueError:
            raise BadInputError(f"{JSON_HEADER} {header_length!r} does not fit the body of "
                                f"{len(body)} bytes") from None
        document = parse_json(bytes(body[:split]), "the inference request")
        if not isinstance(document, dict):
            raise BadInputError("the inference request must be a JSON object")
        params = document.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadInputError("'parameters' must be an object")
        requested = _requested(document)
        self.document, self.binary_of = document, {name: binary for name, binary, _ in requested}
        inputs = _inputs(document, memoryview(body)[split:], self.regions)  # views: no copy of a frame
        self.shared = kserve.SharedOutputs([(name, p) for name, _, p in requested], self.regions)
        return kserve.request_of(self.model, self.version, params, inputs, list(self.binary_of))

    def respond(self, answer: Answer) -> web.Response:
        head, binary = self._response(answer)
        payload = json.dumps(head).encode()
        if not binary:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload + binary, content_type="application/octet-stream",
                            headers={JSON_HEADER: str(len(payload))})

    def fail(self, error: BaseException) -> web.Response:
        return error_response(error, ERROR_KEY)

    def _response(self, answer: Answer) -> tuple[dict, bytes]:
        """(JSON header, binary section) of the response."""
        document = self.document
        binary_default = bool((document.get("parameters") or {}).get("binary_data_output", False))
        head: dict[str, Any] = {"model_name": answer.pipe.name, "model_version": VERSION, "outputs": []}
        if "id" in document:
            head["id"] = document["id"]
        blobs = []
        for name, datatype, array in kserve.output_tensors(answer, list(self.binary_of)):
            entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            binary = self.binary_of.get(name)
            if self.shared.place(name, array):
                pass  # written to the region the request named: no data here
            elif binary if binary is not None else binary_default:
                raw = kserve.raw_contents(array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            elif array.dtype == object:
                entry["data"] = [v.decode() for v in array.reshape(-1)]
            else:
                entry["data"] = np.asarray(array).reshape(-1).tolist()
            head["outputs"].append(entry)
        return head, b"".join(blobs)


def _flat(values) -> list:
    """Nested lists' items in order, without recursion: the client chooses the depth."""
    out, pending = [], [iter(values if isinstance(values, list) else [values])]
    while pending:
        for v in pending[-1]:
            if isinstance(v, list):
                pending.append(iter(v))
                break
            out.append(v)
        else:
            pending.pop()
    return out


def _inputs(document: dict, binary: bytes | memoryview, regions: SharedMemory) -> list[kserve.InputTensor]:
    """The request's inputs, binary parts taken in order from after the JSON header; an
    input with ``shared_memory_*`` parameters is read from its region."""
    items = document.get("inputs")
    if not isinstance(items, list):
        raise BadInputError("'inputs' must be a list of tensors")
    out, offset = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadInputError(f"inputs[{i}] must be an object {{name, shape, datatype, data}}")
        try:
            name, datatype = str(item["name"]), str(item["datatype"])
            shape = [int(d) for d in item["shape"]]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"inputs[{i}] needs a name, a datatype and an integer shape") from None
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadInputError(f"inputs[{i}] parameters must be an object")
        size = parameters.get("binary_data_size")
        if "shared_memory_region" in parameters:
            out.append(kserve.input_tensor(name, datatype, shape, parameters, regions,
                                           values=item.get("data")))
        elif size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadInputError(f"inputs[{i}] binary_data_size {size!r} does not fit the "
                                    f"{len(binary) - offset} binary bytes left")
            out.append(kserve.InputTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        elif "data" in item:
            values = _flat(item["data"])
            if datatype == "BYTES":
                values = [v.encode() if isinstance(v, str) else v for v in values]
                if not all(isinstance(v, bytes) for v in values):
                    raise BadInputError(f"inputs[{i}] BYTES data must be strings")
            out.append(kserve.InputTensor(name, datatype, shape, values=values))
        else:
            raise BadInputError(f"inputs[{i}] has neither data nor binary_data_size")
    if offset != len(binary):
        raise BadInputError(f"{len(binary) - offset} binary bytes after the inputs are unclaimed")
    return out


def _requested(document: dict) -> list[tuple[str, bool | None, dict]]:
    """(output name, binary? (None: not said), parameters) of each output the request names."""
    items = document.get("outputs") or []
    if not isinstance(items, list):
        raise BadInputError("'outputs' must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadInputError(f"outputs[{i}] must be an object with a name")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadInputError(f"outputs[{i}] parameters must be an object")
        out.append((item["name"], parameters.get("binary_data"), parameters))
    return out


# ----------------------------------------------------------------------------- metadata


def message_json(message) -> dict:
    """A protobuf message as Triton's HTTP JSON: field names as in the .proto, 64-bit
    integers as numbers (protobuf's own JSON would quote them), enums by name."""
    out = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _json_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_json_value(field, v) for v in value]
        else:
            out[field.name] = _json_value(field, value)
    return out


def _json_value(field, value):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
