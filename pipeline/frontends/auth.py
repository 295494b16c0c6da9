"""The bearer token: one check, applied by both transports (a gRPC interceptor, an HTTP
middleware in ``http``). Health checks and reflection stay open: probes carry no token."""

from __future__ import annotations

import hmac

import grpc

OPEN_GRPC_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
OPEN_HTTP_PATHS = ("/v2/health/",)
MISSING = "missing or wrong bearer token"


class Token:
    """The server's token, compared in constant time."""

    def __init__(self, token: str):
        self._expected = token.encode()

    def accepts(self, authorization: str = "", api_key: str | None = None) -> bool:
        """True for an ``Authorization: Bearer <token>`` value, or the token given as Roboflow's
        ``api_key``."""
        bearer = authorization[7:] if authorization.startswith("Bearer ") else ""
        return hmac.compare_digest(bearer.encode(), self._expected) or (
            api_key is not None and hmac.compare_digest(str(api_key).encode(), self._expected))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every gRPC call but health checks and reflection without the token
    (UNAUTHENTICATED)."""

    def __init__(self, token: Token):
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_METHODS):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.token.accepts(str(metadata.get("authorization", ""))):
            return handler

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{MISSING} (metadata 'authorization: Bearer <token>')")

        async def deny_stream(request_or_iterator, context):
            await deny(request_or_iterator, context)
            yield  # pragma: no cover - abort raises first

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(deny_stream if handler.response_streaming else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
