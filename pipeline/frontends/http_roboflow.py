"""Roboflow ``inference``'s HTTP API, as the official ``inference-sdk`` calls it.

v0 (legacy) ``POST /{model}/{version}`` with the base64 image as the raw body (or a multipart
``file``), query ``api_key``, ``confidence``, ``overlap``, ``max_detections``,
``response_mask_format``, ``format``; v1 ``GET /model/registry``, ``POST /model/add`` and
``POST /infer/instance_segmentation`` (JSON; a list of images gives a list of responses).
As in Roboflow's server, masks come as polygon ``points`` unless the request asks for
``response_mask_format=rle``; ``confidence`` and ``overlap`` of 1 or more are percents.
Errors: ``{"message": ...}``. ``model_id`` is ``<repository model>/1``. Images given by URL
are fetched only when the server was started with ``--allow-image-urls`` (server-side
fetches are an SSRF risk).

Its paths share no prefix, so ``add_routes`` puts them on the root app (KServe's REST API is
the sub-app at ``/v2``); the catch-all ``/{model}/{version}`` is matched last.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .. import schema
from ..errors import BadInputError
from ..serving.life import run
from ..serving.request import Answer, InferRequest
from ..serving.state import VERSION, ServingState
from ..serving.url_policy import AllowList, fetch_image
from .auth import Token
from .http_app import BODY_KEY_PATHS, ERROR_FIELD, body_key_ok, error_response, json_body

TASK = "instance-segmentation"
ERROR_KEY = "message"  # Roboflow's error document: {"message": ...}


def add_routes(app: web.Application, state: ServingState, *, token: Token | None,
               max_body: int, allow_image_urls: bool, image_url_allow: tuple[str, ...] = ()) -> None:
    """Roboflow's routes and error format on ``app`` (the root app)."""
    app[ERROR_FIELD] = ERROR_KEY
    app[BODY_KEY_PATHS] = frozenset({"/model/add", "/infer/instance_segmentation"})
    api = _Handlers(state, token, max_body, allow_image_urls, AllowList.parse(image_url_allow))
    r = app.router
    r.add_get("/model/registry", api.registry)
    r.add_post("/model/add", api.add_model)
    r.add_post("/infer/instance_segmentation", api.v1)
    r.add_post("/{model}/{version}", api.v0)
    r.add_get("/{model}/{version}", api.v0)


def repository_model(state: ServingState, model_id: Any) -> str:
    """The repository's model that Roboflow's ``model_id`` (``<model>/<version>``) names."""
    if not isinstance(model_id, str) or model_id.count("/") != 1:
        raise BadInputError(f"model_id must be '<model>/<version>', e.g. "
                            f"'instance_segmentation/{VERSION}', got {model_id!r}")
    name, version = model_id.split("/")
    state.lookup(name, version)  # NotFoundError names what is served
    return name


class _Handlers:
    def __init__(self, state: ServingState, token: Token | None, max_body: int,
                 allow_image_urls: bool, image_url_allow: AllowList = AllowList()):
        self.state = state
        self.token = token
        self.max_body = max_body
        self.allow_image_urls = allow_image_urls
        self.image_url_allow = image_url_allow

    def _registered(self) -> dict:
        return {"models": [{"model_id": f"{name}/{VERSION}", "task_type": TASK,
                            "batch_size": pipe.max_batch_size}
                           for name, pipe in sorted(self.state.pipelines.items())]}

    async def registry(self, request):
        return web.json_response(self._registered())

    async def add_model(self, request):
        body = await json_body(request)
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object {model_id, api_key}")
        body_key_ok(request, self.token, body)
        repository_model(self.state, body.get("model_id"))
        return web.json_response(self._registered())

    async def v0(self, request: web.Request) -> web.StreamResponse:
        name = repository_model(self.state, f"{request.match_info['model']}/{request.match_info['version']}")
        query = request.query
        params = _parameters(query, legacy=True)
        output = query.get("format", "json")
        if output not in ("json", "image"):
            raise BadInputError(f"format must be 'json' or 'image', got {output!r}")
        image = await self._v0_image(request)
        return await run(self.state, RoboflowCall(name, params, [image], many=False, draw=output == "image"))

    async def v1(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object {model_id, image, ...}")
        body_key_ok(request, self.token, body)
        name = repository_model(self.state, body.get("model_id"))
        many = isinstance(body.get("image"), list)
        given = body.get("image") if many else [body.get("image")]
        if not given or given == [None]:
            raise BadInputError("'image' is required: {\"type\": \"base64\", \"value\": ...} or a list")
        pipe = self.state.pipeline(name)  # draining or a batch too large: refused before any fetch
        if len(given) > pipe.max_batch_size:
            raise BadInputError(f"batch of {len(given)} exceeds the model's max_batch_size {pipe.max_batch_size}")
        images = [await self._v1_image(item, i) for i, item in enumerate(given)]
        return await run(self.state, RoboflowCall(name, _parameters(body, legacy=False), images, many=many))

    async def _v0_image(self, request: web.Request) -> bytes:
        if request.query.get("image") is not None:
            return await self._fetch(request.query["image"])
        if request.query.get("image_type", "base64") != "base64":
            raise BadInputError("image_type must be 'base64' (numpy arrays are not accepted)")
        if (request.content_type or "").startswith("multipart/form-data"):
            try:
                async for part in await request.multipart():
                    if part.name == "file":
                        return bytes(await part.read())
            except (ValueError, TypeError, RuntimeError, HttpProcessingError) as exc:
                # aiohttp's words for a missing boundary or a broken part: the client's fault
                raise BadInputError(f"the multipart body is malformed ({exc})") from None
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
        return await fetch_image(url, max_body=self.max_body, allow=self.image_url_allow)


class RoboflowCall:
    """One request of Roboflow's API as a ``serving.life.Call``: answered with one document
    per image (a list when the request sent a list: ``many``), or with the first image drawn
    as JPEG (``draw``: v0's ``format=image``); a failure is ``{"message": ...}``."""

    api = "roboflow_http"  # the books' name for the way it came in

    def __init__(self, model: str, params: dict, images: list[bytes], *, many: bool, draw: bool = False):
        self.model, self.params, self.images, self.many, self.draw = model, params, images, many, draw
        self.started = time.monotonic()

    def read(self) -> InferRequest:
        return InferRequest.read(self.model, VERSION, self.images, self.params)

    def respond(self, answer: Answer) -> web.Response:
        names = answer.pipe.class_names
        if self.draw:  # drawn from the exact masks, whatever format the JSON would use
            det = answer.detections[0]
            return web.Response(body=_overlay_jpeg(self.images[0], schema.document(det, names, "rle")),
                                content_type="image/jpeg")
        documents = [{"inference_id": str(uuid.uuid4()), "time": time.monotonic() - self.started,
                      **schema.document(det, names, answer.options.mask_format)}
                     for det in answer.detections]
        return web.json_response(documents if self.many else documents[0])

    def fail(self, error: BaseException) -> web.Response:
        return error_response(error, ERROR_KEY)


def _base64(text: bytes, what: str) -> bytes:
    if text.startswith(b"data:") and b"," in text:  # a data URI
        text = text.split(b",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError(f"{what} is not base64 text (send the image base64-encoded)") from None


def _parameters(source, legacy: bool) -> dict:
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
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise BadInputError(f"parameter {key!r} must be a number, got {value!r}") from None
    return number / 100 if number >= 1 else number


def _overlay_jpeg(image: bytes, document: dict) -> bytes:
    """The image with its masks drawn (Roboflow's ``format=image``)."""
    from ..images import as_rgb_array, encode_jpeg
    from ..overlay import draw

    return encode_jpeg(draw(as_rgb_array(image), document["predictions"]))
