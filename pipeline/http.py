"""HTTP on the same server, engine and batcher as gRPC (aiohttp, in the gRPC server's loop).

Two APIs, so a user switching from either peer changes only the URL:

- Roboflow ``inference``'s, as the official ``inference-sdk`` calls it:
  v0 (legacy) ``POST /{model}/{version}`` with the base64 image as the raw body (or a
  multipart ``file``), query ``api_key``, ``confidence``, ``overlap``, ``max_detections``,
  ``response_mask_format``, ``format``; v1 ``GET /model/registry``, ``POST /model/add`` and
  ``POST /infer/instance_segmentation`` (JSON; a list of images gives a list of responses).
  As in Roboflow's server, masks come as polygon ``points`` unless the request asks for
  ``response_mask_format=rle``; ``confidence`` and ``overlap`` of 1 or more are percents.
  Errors: ``{"message": ...}``. ``model_id`` is ``<repository model>/1``.
- KServe v2 REST, as ``tritonclient.http`` calls it: health, metadata, config, statistics,
  repository index and ``POST /v2/models/{m}[/versions/{v}]/infer`` with JSON tensors or the
  binary tensor extension. Errors: ``{"error": ...}``.

Statuses come from the one table in ``pipeline.errors`` (400 bad input, 404 unknown model,
413 too large, 503 draining or overloaded: the SDK retries 503). Images given by URL are
fetched only when the server was started with ``--allow-image-urls`` (server-side fetches
are an SSRF risk). A configured token is required as ``Authorization: Bearer <token>``; the
SDK's ``api_key`` is accepted in its place (health stays open, for probes).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import ClientSession, ClientTimeout, web
from google.protobuf.descriptor import FieldDescriptor

from . import kserve, schema
from .errors import BadInputError, status_of
from .serving import VERSION, ServingState, describe, end_sequence, infer, sequence_tracking

LOG = logging.getLogger(__name__)
ROBOFLOW_TASK = "instance-segmentation"
JSON_HEADER = "Inference-Header-Content-Length"
OPEN_PATHS = ("/v2/health/",)  # probes carry no token
AUTHORIZED = web.RequestKey("authorized", bool)  # the header or query carried the token


class HTTPError(Exception):
    """An HTTP-level refusal before any pipeline work (bad JSON, too large, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- JSON helpers


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


def _flat(values) -> list:
    out = []
    for v in values if isinstance(values, list) else [values]:
        out.extend(_flat(v) if isinstance(v, list) else [v])
    return out


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"the body is not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- the app


class HTTPFrontend:
    """The aiohttp application over a ServingState; ``start``/``stop`` on the running loop."""

    def __init__(self, state: ServingState, *, max_body_mb: int, token: str | None = None,
                 allow_image_urls: bool = False):
        self.state = state
        self.max_body = max_body_mb * 1024 * 1024
        self.token = token
        self.allow_image_urls = allow_image_urls
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        app = web.Application(client_max_size=self.max_body,
                              middlewares=[self._errors, self._guard])
        r = app.router
        # KServe v2 first (fixed prefixes), then Roboflow's fixed routes, then its catch-all.
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2/models/stats", self.statistics)
        r.add_post("/v2/repository/index", self.repository_index)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_get(prefix + "/stats", self.statistics)
            r.add_post(prefix + "/infer", self.kserve_infer)
        r.add_get("/model/registry", self.registry)
        r.add_post("/model/add", self.add_model)
        r.add_post("/infer/instance_segmentation", self.roboflow_v1)
        r.add_post("/{model}/{version}", self.roboflow_v0)
        r.add_get("/{model}/{version}", self.roboflow_v0)
        self.app = app

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -------------------------------------------------------------------- middlewares

    def _roboflow(self, request: web.Request) -> bool:
        return not request.path.startswith("/v2")

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        key = "message" if self._roboflow(request) else "error"
        return web.json_response({key: message}, status=status)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every failure as JSON with a status from the one table; the server keeps serving."""
        try:
            length = request.content_length
            if length is not None and length > self.max_body:
                raise HTTPError(413, f"the body of {length} bytes exceeds the {self.max_body}-byte "
                                     "limit (--max-message-mb)")
            with self.state.in_progress():
                return await handler(request)
        except HTTPError as exc:
            return self._error(request, exc.status, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, 413, f"the body exceeds the {self.max_body}-byte limit "
                                             "(--max-message-mb)")
        except web.HTTPException as exc:  # aiohttp's own (404 route, 405 method)
            return self._error(request, exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - ours map through the table; the rest are 500s
            return self._error(request, status_of(exc).http, describe(exc))

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """The bearer token (or the SDK's api_key), and the connection's share of the server."""
        if self.token and not request.path.startswith(OPEN_PATHS):
            request[AUTHORIZED] = self._token_ok(request.headers.get("Authorization", ""),
                                                 request.query.get("api_key"))
            body_key_routes = ("/model/add", "/infer/instance_segmentation")
            if not request[AUTHORIZED] and request.path not in body_key_routes:
                raise HTTPError(401, "missing or wrong token (header 'Authorization: Bearer "
                                     "<token>', or the api_key parameter)")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        with self.state.limits.request(str(peer)):
            return await handler(request)

    def _token_ok(self, header: str, api_key: str | None) -> bool:
        expected = self.token.encode()
        bearer = header[7:] if header.startswith("Bearer ") else ""
        return hmac.compare_digest(bearer.encode(), expected) or (
            api_key is not None and hmac.compare_digest(str(api_key).encode(), expected))

    def _body_key_ok(self, request: web.Request, body: dict) -> None:
        if self.token and not request.get(AUTHORIZED) and not self._token_ok("", body.get("api_key")):
            raise HTTPError(401, "missing or wrong token (header 'Authorization: Bearer <token>', "
                                 "or api_key in the body)")

    # -------------------------------------------------------------------- KServe v2

    async def live(self, request):
        return web.Response(status=200)

    async def ready(self, request):
        return web.Response(status=200 if kserve.server_ready(self.state) else 400)

    async def server_metadata(self, request):
        return web.json_response(message_json(kserve.server_metadata()))

    def _model(self, request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def model_metadata(self, request):
        return web.json_response(message_json(kserve.model_metadata(self.state, *self._model(request))))

    async def model_ready(self, request):
        ok = kserve.model_ready(self.state, *self._model(request))
        return web.Response(status=200 if ok else 400)

    async def model_config(self, request):
        return web.json_response(message_json(kserve.model_config(self.state, *self._model(request))))

    async def statistics(self, request):
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return web.json_response(message_json(kserve.model_statistics(self.state, name, version)))

    async def repository_index(self, request):
        body = await _json_body(request) if request.can_read_body else {}
        index = kserve.repository_index(self.state, bool((body or {}).get("ready")))
        return web.json_response([message_json(m) for m in index.models])

    async def kserve_infer(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        body = await request.read()
        header_length = request.headers.get(JSON_HEADER)
        try:
            split = int(header_length) if header_length is not None else len(body)
            if not 0 <= split <= len(body):
                raise ValueError
        except ValueError:
            raise BadInputError(f"{JSON_HEADER} {header_length!r} does not fit the body of "
                                f"{len(body)} bytes") from None
        try:
            document = json.loads(body[:split])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"the inference request is not valid JSON ({exc})") from None
        if not isinstance(document, dict):
            raise BadInputError("the inference request must be a JSON object")
        inputs = _kserve_inputs(document, body[split:])
        params = document.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadInputError("'parameters' must be an object")
        wanted = _requested(document)

        def respond(pipe, dets, options):
            return _kserve_response(document, pipe, dets, options, wanted, params)

        def read_images(pipe):
            kserve.requested_outputs([n for n, _ in wanted])
            return kserve.images_of(inputs, pipe.max_batch_size)

        tracking = sequence_tracking(self.state, name, params)
        try:
            head, binary = await infer(self.state, name, version, params, read_images, respond,
                                       tracking=tracking)
        finally:
            end_sequence(self.state, tracking, params)
        payload = json.dumps(head).encode()
        if not binary:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload + binary, content_type="application/octet-stream",
                            headers={JSON_HEADER: str(len(payload))})

    # -------------------------------------------------------------------- Roboflow

    def _registered(self) -> dict:
        return {"models": [{"model_id": f"{name}/{VERSION}", "task_type": ROBOFLOW_TASK,
                            "batch_size": pipe.max_batch_size}
                           for name, pipe in sorted(self.state.pipelines.items())]}

    def _roboflow_model(self, model_id: Any) -> str:
        if not isinstance(model_id, str) or model_id.count("/") != 1:
            raise BadInputError(f"model_id must be '<model>/<version>', e.g. "
                                f"'instance_segmentation/{VERSION}', got {model_id!r}")
        name, version = model_id.split("/")
        self.state.lookup(name, version)  # NotFoundError names what is served
        return name

    async def registry(self, request):
        return web.json_response(self._registered())

    async def add_model(self, request):
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object {model_id, api_key}")
        self._body_key_ok(request, body)
        self._roboflow_model(body.get("model_id"))
        return web.json_response(self._registered())

    async def roboflow_v0(self, request: web.Request) -> web.StreamResponse:
        model_id = f"{request.match_info['model']}/{request.match_info['version']}"
        name = self._roboflow_model(model_id)
        query = request.query
        params = _roboflow_params(query, legacy=True)
        output = query.get("format", "json")
        if output not in ("json", "image"):
            raise BadInputError(f"format must be 'json' or 'image', got {output!r}")
        image = await self._v0_image(request)
        documents = await self._roboflow_infer(name, params, [image], draw=output == "image")
        if output == "image":
            return web.Response(body=documents[0], content_type="image/jpeg")
        return web.json_response(documents[0])

    async def roboflow_v1(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object {model_id, image, ...}")
        self._body_key_ok(request, body)
        name = self._roboflow_model(body.get("model_id"))
        many = isinstance(body.get("image"), list)
        given = body.get("image") if many else [body.get("image")]
        if not given or given == [None]:
            raise BadInputError("'image' is required: {\"type\": \"base64\", \"value\": ...} or a list")
        images = [await self._v1_image(item, i) for i, item in enumerate(given)]
        documents = await self._roboflow_infer(name, _roboflow_params(body, legacy=False), images)
        return web.json_response(documents if many else documents[0])

    async def _roboflow_infer(self, name: str, params: dict, images: list[bytes],
                              draw: bool = False) -> list:
        started = time.monotonic()

        def respond(pipe, dets, options):
            if draw:  # drawn from the exact masks, whatever format the JSON would use
                return [_overlay_jpeg(image, schema.document(det, pipe.class_names, "rle"))
                        for image, det in zip(images, dets)]
            return [{"inference_id": str(uuid.uuid4()), "time": time.monotonic() - started,
                     **schema.document(det, pipe.class_names, options.mask_format)} for det in dets]

        def read_images(pipe):
            if len(images) > pipe.max_batch_size:
                raise BadInputError(f"{len(images)} images exceed the model's max_batch_size "
                                    f"{pipe.max_batch_size}")
            return images

        return await infer(self.state, name, VERSION, params, read_images, respond)

    async def _v0_image(self, request: web.Request) -> bytes:
        if request.query.get("image") is not None:
            return await self._fetch(request.query["image"])
        if request.query.get("image_type", "base64") != "base64":
            raise BadInputError("image_type must be 'base64' (numpy arrays are not accepted)")
        if (request.content_type or "").startswith("multipart/form-data"):
            reader = await request.multipart()
            async for part in reader:
                if part.name == "file":
                    return bytes(await part.read())
            raise BadInputError("the multipart body has no 'file' part")
        body = await request.read()
        if not body:
            raise BadInputError("the body is empty: send the image as base64 text, or as a "
                                "multipart 'file'")
        return _base64(body, "the body")

    async def _v1_image(self, item: Any, i: int) -> bytes:
        if not isinstance(item, dict) or "value" not in item:
            raise BadInputError(f"image {i} must be an object {{\"type\": \"base64\", \"value\": ...}}")
        kind = item.get("type", "base64")
        if kind == "url":
            return await self._fetch(item["value"])
        if kind != "base64":
            raise BadInputError(f"image {i}: type {kind!r} is not accepted (use 'base64' or 'url')")
        if not isinstance(item["value"], str):
            raise BadInputError(f"image {i}: value must be base64 text")
        return _base64(item["value"].encode(), f"image {i}")

    async def _fetch(self, url: Any) -> bytes:
        if not self.allow_image_urls:
            raise BadInputError("images by URL are refused: this server does not fetch from the "
                                "network (start it with --allow-image-urls to allow it); send the "
                                "image itself as base64")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadInputError(f"image URL must be http(s)://..., got {url!r}")
        try:
            async with ClientSession(timeout=ClientTimeout(total=10)) as session:
                async with session.get(url) as response:
                    if response.status != 200:
                        raise BadInputError(f"fetching {url} answered HTTP {response.status}")
                    chunks, size = [], 0
                    async for chunk in response.content.iter_chunked(1 << 16):
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > self.max_body:
                            break
                    data = b"".join(chunks)
        except (OSError, TimeoutError) as exc:
            raise BadInputError(f"fetching {url} failed ({exc})") from None
        if len(data) > self.max_body:
            raise HTTPError(413, f"the image at {url} exceeds the {self.max_body}-byte limit")
        return data


# ----------------------------------------------------------------------------- helpers


def _base64(text: bytes, what: str) -> bytes:
    if text.startswith(b"data:") and b"," in text:  # a data URI
        text = text.split(b",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError(f"{what} is not base64 text (send the image base64-encoded)") from None


def _roboflow_params(source, legacy: bool) -> dict:
    """Request parameters from Roboflow's names: ``overlap`` (v0) / ``iou_threshold`` (v1);
    confidence and overlap of 1 or more are percents (v0); masks default to polygons."""
    params: dict[str, Any] = {"response_mask_format": source.get("response_mask_format") or "polygon"}
    confidence = source.get("confidence")
    if confidence not in (None, "default", "best"):
        params["confidence"] = _percent(confidence, "confidence") if legacy else confidence
    overlap = source.get("overlap") if legacy else source.get("iou_threshold")
    if overlap is not None:
        params["iou_threshold"] = _percent(overlap, "overlap") if legacy else overlap
    if source.get("max_detections") is not None:
        params["max_detections"] = source.get("max_detections")
    return params


def _percent(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"parameter {key!r} must be a number, got {value!r}") from None
    return number / 100 if number >= 1 else number


def _overlay_jpeg(image: bytes, document: dict) -> bytes:
    """The image with its masks drawn (Roboflow's ``format=image``)."""
    import io

    from .images import as_rgb_array
    from .overlay import draw

    buffer = io.BytesIO()
    draw(as_rgb_array(image), document["predictions"]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _kserve_inputs(document: dict, binary: bytes) -> list[kserve.InputTensor]:
    """The request's inputs, binary parts taken in order from after the JSON header."""
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
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
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


def _requested(document: dict) -> list[tuple[str, bool | None]]:
    """(output name, binary?) of each output the request names (binary None: not said)."""
    items = document.get("outputs") or []
    if not isinstance(items, list):
        raise BadInputError("'outputs' must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadInputError(f"outputs[{i}] must be an object with a name")
        out.append((item["name"], (item.get("parameters") or {}).get("binary_data")))
    return out


def _kserve_response(document: dict, pipe, dets, options, wanted, params) -> tuple[dict, bytes]:
    """(JSON header, binary section) of a KServe v2 REST response."""
    binary_default = bool(params.get("binary_data_output", False))
    binary_of = {name: binary for name, binary in wanted}
    head: dict[str, Any] = {"model_name": pipe.name, "model_version": VERSION, "outputs": []}
    if "id" in document:
        head["id"] = document["id"]
    blobs = []
    for name, datatype, array in kserve.output_tensors(dets, list(binary_of), pipe.class_names,
                                                       options.mask_format):
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        binary = binary_of.get(name)
        if binary if binary is not None else binary_default:
            raw = kserve.raw_contents(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif array.dtype == object:
            entry["data"] = [v.decode() for v in array.reshape(-1)]
        else:
            entry["data"] = np.asarray(array).reshape(-1).tolist()
        head["outputs"].append(entry)
    return head, b"".join(blobs)

