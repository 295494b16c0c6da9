"""Cameras on the server over HTTP: ``/v1/streams`` (an aiohttp sub-app), a thin adapter.

``POST /v1/streams`` (a ``StreamSpec`` as JSON) -> 201 and the stream's status;
``GET /v1/streams`` -> ``{"streams": [status, ...]}``; ``GET /v1/streams/{id}``;
``DELETE /v1/streams/{id}``; ``POST /v1/streams/{id}/pause`` and ``/resume``. Errors:
``{"error": ...}`` with the status from the one table in ``pipeline.errors``. Results are
delivered to the stream's sinks, or to gRPC's ``Subscribe``.
"""

from __future__ import annotations

from aiohttp import web

from ..cameras.spec import StreamSpec
from ..cameras.streams import CameraStream, CameraStreams
from .http_app import ERROR_FIELD, json_body


def app(streams: CameraStreams) -> web.Application:
    """The routes, to be mounted at ``/v1/streams``."""
    api = web.Application()
    api[ERROR_FIELD] = "error"
    r = api.router

    async def add(request: web.Request) -> web.Response:
        spec = StreamSpec.read(await json_body(request), streams.rules)
        return web.json_response((await streams.add(spec)).status(), status=201)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"streams": [s.status() for s in streams.all()]})

    async def get(request: web.Request) -> web.Response:
        return web.json_response(streams.get(request.match_info["id"]).status())

    async def remove(request: web.Request) -> web.Response:
        return web.json_response((await streams.remove(request.match_info["id"])).status())

    def change(act):
        async def handler(request: web.Request) -> web.Response:
            stream = streams.get(request.match_info["id"])
            act(stream)
            return web.json_response(stream.status())
        return handler

    r.add_post("", add)
    r.add_get("", listing)
    r.add_get("/{id}", get)
    r.add_delete("/{id}", remove)
    r.add_post("/{id}/pause", change(CameraStream.pause))
    r.add_post("/{id}/resume", change(CameraStream.resume))
    return api
