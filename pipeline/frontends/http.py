"""HTTP on the same server, engine and batcher as gRPC (aiohttp, in the gRPC server's loop).

Two APIs, each in its own module: Roboflow ``inference``'s (``http_roboflow``; its paths
share no prefix, so its routes are the root app's) and KServe v2 REST (``http_kserve``, a
sub-app at ``/v2``). What they share is here, written once:

- ``middlewares``: every failure as JSON in the matched app's own error format
  (``ERROR_FIELD``), with its status from the one table in ``pipeline.errors``; the body-size
  cap; the bearer token (``auth.Token``; routes an app lists in ``BODY_KEY_PATHS`` may carry
  it in the body instead, as Roboflow's SDK does); the connection's share of the server;
- ``json_body``; ``HTTPServer``, which starts and stops the site.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..errors import BadInputError, TooLargeError, UnauthenticatedError, status_of
from .auth import OPEN_HTTP_PATHS, Token
from .inference import ServingState, describe

ERROR_FIELD = web.AppKey("error_field", str)  # the app's error document: {field: message}
BODY_KEY_PATHS = web.AppKey("body_key_paths", frozenset)  # may carry the token in the body
AUTHORIZED = web.RequestKey("authorized", bool)  # the header or query carried the token
NO_TOKEN = ("missing or wrong token (header 'Authorization: Bearer <token>', or the api_key "
            "parameter)")


def setting(request: web.Request, key: web.AppKey, default: Any = None) -> Any:
    """The matched app's own setting (a sub-app's before the root's). Not
    ``request.config_dict``: in the root's middlewares that sees the root alone."""
    for app in reversed(request.match_info.apps):
        if key in app:
            return app[key]
    return default


async def json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"the body is not valid JSON ({exc})") from None


def body_key_ok(request: web.Request, token: Token | None, body: dict) -> None:
    """For BODY_KEY_PATHS: the token as ``api_key`` in the body, unless the header or the
    query carried it already."""
    if token is not None and not request.get(AUTHORIZED) and not token.accepts(api_key=body.get("api_key")):
        raise UnauthenticatedError(NO_TOKEN.replace("parameter", "in the body"))


def middlewares(state: ServingState, *, max_body: int, token: Token | None) -> list:
    def too_large(length: int | None = None) -> TooLargeError:
        what = "the body" if length is None else f"the body of {length} bytes"
        return TooLargeError(f"{what} exceeds the {max_body}-byte limit (--max-message-mb)")

    @web.middleware
    async def errors(request: web.Request, handler):
        """Every failure as JSON with a status from the one table; the server keeps serving."""
        try:
            length = request.content_length
            if length is not None and length > max_body:
                raise too_large(length)
            with state.in_progress():
                return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            status, message = 413, str(too_large())
        except web.HTTPException as exc:  # aiohttp's own (404 route, 405 method)
            status, message = exc.status, exc.reason
        except Exception as exc:  # noqa: BLE001 - ours map through the table; the rest are 500s
            status, message = status_of(exc).http, describe(exc)
        return web.json_response({setting(request, ERROR_FIELD, "error"): message}, status=status)

    @web.middleware
    async def guard(request: web.Request, handler):
        """The bearer token (or the SDK's api_key), and the connection's share of the server."""
        if token is not None and not request.path.startswith(OPEN_HTTP_PATHS):
            request[AUTHORIZED] = token.accepts(request.headers.get("Authorization", ""),
                                                request.query.get("api_key"))
            if not request[AUTHORIZED] and request.path not in setting(request, BODY_KEY_PATHS, ()):
                raise UnauthenticatedError(NO_TOKEN)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        with state.limits.request(str(peer)):
            return await handler(request)

    return [errors, guard]


class HTTPServer:
    """An aiohttp application served on the running loop: ``start`` then ``stop``."""

    def __init__(self, app: web.Application):
        self.app = app
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        """Listen; returns the port (``port`` 0 picks a free one). OSError if it cannot."""
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
