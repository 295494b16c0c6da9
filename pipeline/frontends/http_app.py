"""HTTP on the same server, engine and batcher as gRPC (aiohttp, in the gRPC server's loop).

Three APIs, each in its own module: Roboflow ``inference``'s (``http_roboflow``; its paths
share no prefix, so its routes are the root app's), KServe v2 REST (``http_kserve``, a
sub-app at ``/v2``) and cameras (``http_cameras``, at ``/v1/streams``). What their aiohttp
apps share is here, written once:

- ``middlewares``: every failure as JSON in the matched app's own error format
  (``ERROR_FIELD``), with its status from the one table in ``pipeline.errors``; the body-size
  cap; the bearer token (``auth.Token``; routes an app lists in ``BODY_KEY_PATHS`` may carry
  it in the body instead, as Roboflow's SDK does, read from a small prefix before the rest
  of the body is); the client's share of the server;
- ``json_body`` and ``parse_json``: JSON as the standard has it, a 400 for anything else.

The listener in front of the app is ``http_listener``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web

from ..errors import BadInputError, ShuttingDownError, TooLargeError, UnauthenticatedError, describe, status_of
from ..serving.state import ServingState, client_of
from .auth import OPEN_HTTP_PATHS, Token

LOG = logging.getLogger(__name__)

ERROR_FIELD = web.AppKey("error_field", str)  # the app's error document: {field: message}
BODY_KEY_PATHS = web.AppKey("body_key_paths", frozenset)  # may carry the token in the body
AUTHORIZED = web.RequestKey("authorized", bool)  # the header or query carried the token
BODY_PREFIX = web.RequestKey("body_prefix", bytes)  # the body's first bytes, read by `guard`
NO_TOKEN = ("missing or wrong token (header 'Authorization: Bearer <token>', or the api_key "
            "parameter)")
# A body's api_key must come within its first bytes (Roboflow's SDK writes it first): a
# request without the token is refused before the rest, up to 64 MB, is read and parsed.
KEY_PREFIX_BYTES = 64 * 1024
_SPACE = re.compile(r"[ \t\n\r]*")


def setting(request: web.Request, key: web.AppKey, default: Any = None) -> Any:
    """The matched app's own setting (a sub-app's before the root's). Not
    ``request.config_dict``: in the root's middlewares that sees the root alone."""
    for app in reversed(request.match_info.apps):
        if key in app:
            return app[key]
    return default


def parse_json(data: bytes | str, what: str = "the body") -> Any:
    """JSON as the standard has it: BadInputError (400) for text that is not JSON, for NaN
    and Infinity (Python's extension; no number parameter means them), and for nesting too
    deep to parse (RecursionError: ``[`` * 50000)."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(data, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadInputError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadInputError(f"{what} nests too deeply to be read") from None


async def whole_body(request: web.Request) -> bytes | memoryview:
    """The body, read as it arrives into one buffer of its declared length: aiohttp's ``read``
    grows a copy and then copies that again, holding a large frame three times at once. A
    body without a length is read as aiohttp reads it. BadInputError if it ends early."""
    length = request.content_length
    if length is None:
        return await request.read()
    view, got = memoryview(bytearray(length)), 0
    while got < length:
        chunk = await request.content.readany()
        if not chunk:
            raise BadInputError(f"the body ended after {got} of its {length} bytes")
        view[got : got + len(chunk)] = chunk  # aiohttp delivers no more than the length it read
        got += len(chunk)
    return view


async def json_body(request: web.Request) -> Any:
    return parse_json(request.get(BODY_PREFIX, b"") + await request.read())


def body_key_ok(request: web.Request, token: Token | None, body: dict) -> None:
    """For BODY_KEY_PATHS: the token as ``api_key`` in the body, unless the header or the
    query carried it already. (``guard`` refused bodies whose first bytes lack it; this is
    the check of the body as parsed.)"""
    if token is not None and not request.get(AUTHORIZED) and not token.accepts(api_key=body.get("api_key")):
        raise UnauthenticatedError(NO_TOKEN.replace("parameter", "in the body"))


def leading_api_key(prefix: bytes) -> Any:
    """The top-level ``api_key`` of a JSON object that starts with ``prefix``, or None when
    it is not among the members that ``prefix`` holds whole (members are read in order; a
    member cut off by the prefix's end, or anything that is not JSON, ends the search)."""
    text, decoder = prefix.decode("utf-8", "replace"), json.JSONDecoder()
    i = _SPACE.match(text).end()
    if not text.startswith("{", i):
        return None
    i += 1
    try:
        while True:
            key, i = decoder.raw_decode(text, _SPACE.match(text, i).end())
            i = _SPACE.match(text, i).end()
            if not text.startswith(":", i):
                return None
            value, i = decoder.raw_decode(text, _SPACE.match(text, i + 1).end())
            if key == "api_key":
                return value
            i = _SPACE.match(text, i).end()
            if not text.startswith(",", i):
                return None
            i += 1
    except (ValueError, RecursionError):
        return None


async def _read_prefix(request: web.Request, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body (fewer if it is shorter); ``json_body`` reads them
    back first."""
    chunks, size = [], 0
    while size < limit:
        chunk = await request.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    request[BODY_PREFIX] = prefix = b"".join(chunks)
    return prefix


def _key_may_be_in_body(request: web.Request) -> bool:
    """The matched app lists the request's path, or its route's pattern
    (``/inference_pipelines/{pipeline_id}/status``), in BODY_KEY_PATHS."""
    paths = setting(request, BODY_KEY_PATHS, ())
    resource = request.match_info.route.resource
    return request.path in paths or (resource is not None and resource.canonical in paths)


def error_response(error: BaseException, field: str) -> web.Response:
    """``error`` as an app's error document (``{field: message}``), its status from the one
    table in ``pipeline.errors``: every HTTP failure, a call's ``fail`` too."""
    return web.json_response({field: describe(error)}, status=status_of(error).http)


def middlewares(state: ServingState, *, max_body: int, token: Token | None,
                open_pages: frozenset[str] = frozenset()) -> list:
    """``open_pages``: paths GET without the token (a page that holds no data and asks for
    the token itself: the dashboard's shell)."""
    def too_large(length: int | None = None) -> TooLargeError:
        what = "the body" if length is None else f"the body of {length} bytes"
        return TooLargeError(f"{what} exceeds the {max_body}-byte limit (--max-message-mb)")

    async def answer(request: web.Request, handler) -> web.StreamResponse:
        try:
            length = request.content_length
            if length is not None and length > max_body:
                raise too_large(length)
            if state.draining and request.body_exists:  # its body might never come: not waited for
                raise ShuttingDownError("server is shutting down; retry on another replica")
            with state.in_progress():
                return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(too_large(), setting(request, ERROR_FIELD, "error"))
        except web.HTTPException as exc:  # aiohttp's own (404 route, 405 method)
            return web.json_response({setting(request, ERROR_FIELD, "error"): exc.reason}, status=exc.status)
        except Exception as exc:  # noqa: BLE001 - ours map through the table; the rest are 500s
            if isinstance(exc, ConnectionError) and request.transport is None:
                # The client left before its body was read: nobody to answer, nothing of ours failed.
                LOG.debug("HTTP client %s left before its request was read (%s)", request.remote, exc)
                return web.Response(status=499)  # nginx's "client closed request"; never sent
            return error_response(exc, setting(request, ERROR_FIELD, "error"))

    @web.middleware
    async def errors(request: web.Request, handler):
        """Every failure as JSON with a status from the one table; the server keeps serving.
        While it drains, a request with a body is refused at once, and every answer closes its
        connection (the client's next request goes to another replica)."""
        response = await answer(request, handler)
        if state.draining:
            response.force_close()
        return response

    @web.middleware
    async def guard(request: web.Request, handler):
        """The bearer token (or the SDK's api_key), and the connection's share of the server."""
        opened = request.method in ("GET", "HEAD") and request.path in open_pages
        if token is not None and not request.path.startswith(OPEN_HTTP_PATHS) and not opened:
            request[AUTHORIZED] = token.accepts(request.headers.get("Authorization", ""),
                                                request.query.get("api_key"))
            if not request[AUTHORIZED]:
                if not _key_may_be_in_body(request):
                    raise UnauthenticatedError(NO_TOKEN)
                prefix = await _read_prefix(request, KEY_PREFIX_BYTES)
                if not token.accepts(api_key=leading_api_key(prefix)):
                    raise UnauthenticatedError(NO_TOKEN.replace(
                        "parameter", f"in the body, before the image: within its first "
                        f"{KEY_PREFIX_BYTES // 1024} KiB"))
        with state.limits.request(client_of(request.remote or "")):
            return await handler(request)

    return [errors, guard]
