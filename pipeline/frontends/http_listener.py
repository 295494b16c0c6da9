"""The HTTP listener: an aiohttp application served on the running loop (``HTTPServer``) behind
our own accept loop, so that a client cannot hold the server's sockets: a cap on open
connections, a deadline for a new connection's first headers, an idle timeout, and client
garbage and accept() failures logged at most once per interval."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..throttle import Throttled

LOG = logging.getLogger(__name__)

ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's words for EMFILE and kin
FD_RESERVE = 256  # open files kept for gRPC, the model, metrics and logs when HTTP is full
CUT_S = 0.01  # at the drain's deadline, how long a handler has to end once cancelled


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, which logs every malformed request (a bad request line or
    header) with its traceback: those, the client's fault, become one short throttled line."""

    def __init__(self):
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._bad_requests = Throttled(LOG)

    def log(self, level, msg, *args, exc_info=None, **kwargs):
        if isinstance(exc_info, HttpProcessingError):
            first = (exc_info.message or type(exc_info).__name__).splitlines()[0][:120]
            peer = args[0] if args else "?"
            if level < logging.INFO:  # aiohttp's choice for non-HTTP bytes (TLS to a plain port)
                self.logger.debug("malformed HTTP request from %s: %r", peer, first)
            else:
                self._bad_requests.log(logging.INFO, "malformed HTTP request from %s: %r", peer, first)
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


def open_file_budget() -> int:
    """The HTTP connections the open-file limit leaves room for, once its soft value is raised
    to the hard one (the usual soft 1,024 is what a crowd of silent sockets exhausts)."""
    try:
        import resource
    except ImportError:  # not POSIX: no limit we can read
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            LOG.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:  # an infinite hard limit the kernel caps lower
            LOG.info("open-file limit stays %d (could not raise it to %d: %s)", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft // 2, soft - FD_RESERVE)


class HTTPServer:
    """An aiohttp application served on the running loop: ``start``, ``stop_accepting`` when
    the server drains, then ``stop`` by the drain's deadline.

    Its own listener hands connections to aiohttp (``_Connection``) so that a client cannot
    hold the server's sockets: at most ``max_connections`` open (lowered to fit the open-file
    limit; beyond it a new connection is closed at once), a new connection's first request
    headers due within ``header_timeout_s`` (aiohttp itself would wait for the idle timeout),
    keep-alive connections closed after ``idle_timeout_s`` idle, and accept() failures
    (a full file table) logged once per interval instead of once per attempt."""

    def __init__(self, app: web.Application, *, header_timeout_s: float = 10.0,
                 idle_timeout_s: float = 30.0, max_connections: int = 1000):
        self.app = app
        self.header_timeout_s, self.idle_timeout_s = header_timeout_s, idle_timeout_s
        self.max_connections = max_connections
        self.open = 0  # connections admitted and not yet closed
        self.runner: web.AppRunner | None = None
        self.refused = Throttled(LOG)
        self._accept_errors = Throttled(LOG)
        self._listener: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler = None

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        """Listen; returns the port (``port`` 0 picks a free one). OSError if it cannot."""
        self.max_connections = min(self.max_connections, open_file_budget())
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    keepalive_timeout=self.idle_timeout_s, logger=_ServerLog())
        await self.runner.setup()
        loop = self._loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=ssl_context, reuse_port=False,
            ssl_handshake_timeout=self.header_timeout_s if ssl_context else None)
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        LOG.info("HTTP: at most %d connections; headers due in %.1f s; idle ones closed after %.0f s",
                 self.max_connections, self.header_timeout_s, self.idle_timeout_s)
        return self._listener.sockets[0].getsockname()[1]

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") == ACCEPT_ERROR:  # retried every second: logged once per interval
            self._accept_errors.log(logging.WARNING, "cannot accept connections: %s (%d HTTP "
                                    "connections open; the open-file limit?)",
                                    context.get("exception"), self.open)
        elif self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def stop_accepting(self) -> None:
        """Take no new connection (the drain); open ones stay, their requests answered."""
        if self._listener is not None:
            self._listener.close()

    async def stop(self, deadline: float) -> None:
        """Close every connection: idle ones at once, busy ones once their request is answered,
        and at ``deadline`` (``time.monotonic()``) whatever is still open, whatever its client
        does. (aiohttp's own clean-up gives a handler that waits on a client's body its
        ``shutdown_timeout``, 60 s, twice over.)"""
        self.stop_accepting()
        server = self.runner.server if self.runner is not None else None
        if server is not None:
            server.pre_shutdown()  # no request after the one in progress; idle ones stop waiting
            left = deadline - time.monotonic()
            # aiohttp's timeouts are not ours (rounded up to the second, given twice, and 0 is
            # none at all): the deadline is kept here.
            try:
                await asyncio.wait_for(server.shutdown(left), max(0.0, left))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                await server.shutdown(CUT_S)  # handlers cancelled, connections closed
        if self.runner is not None:
            await self.runner.cleanup()  # the app's shutdown and cleanup; no connection is left
        if self._loop is not None and self._loop.get_exception_handler() == self._loop_error:
            self._loop.set_exception_handler(self._previous_handler)


class _Connection(asyncio.Protocol):
    """One HTTP connection in front of aiohttp's handler: admitted under the server's cap,
    and closed if its first request's headers are not all in within the header timeout."""

    def __init__(self, server: HTTPServer):
        self.server = server
        self.handler = None  # aiohttp's RequestHandler, once admitted
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes read, for a header end split across reads

    def connection_made(self, transport) -> None:
        server = self.server
        make_handler = server.runner.server if server.runner is not None else None
        if make_handler is None:  # stopping: the site is being torn down
            transport.abort()
            return
        if server.open >= server.max_connections:
            server.refused.log(logging.WARNING, "refusing new HTTP connections: %d open, the "
                               "cap (--max-http-connections, and the open-file limit)", server.open)
            transport.abort()
            return
        self.handler = make_handler()
        server.open += 1
        self.handler.connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(server.header_timeout_s,
                                                           self.handler.force_close)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if b"\n\r\n" in seen or b"\n\n" in seen:  # a blank line: the headers are in
                self.timer.cancel()
                self.timer = None
            self.tail = seen[-2:]
        if self.handler is not None:  # refused connections are aborted: bytes may still come
            self.handler.data_received(data)

    def eof_received(self):
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc) -> None:
        if self.handler is None:  # refused: never counted
            return
        if self.timer is not None:
            self.timer.cancel()
        self.server.open -= 1
        self.handler.connection_lost(exc)
