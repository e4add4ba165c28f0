"""The HTTP connection layer under the application: slow clients, connection caps, parser errors.

aiohttp reads request heads and bodies with no deadline of its own (an idle connection is closed
after an hour), lets one address open any number of connections, and answers a request it
cannot parse with a plain-text 400 that quotes the raw bytes, after logging them with a
traceback. ``GuardedHandler`` (aiohttp's ``RequestHandler`` with a few methods overridden) adds:

* a **head deadline** (``[service] header_timeout_ms``): a request head must be complete this
  long after its first byte, and the first head this long after the connection opened; else the
  connection is closed (nothing can be answered to a request that has not arrived);
* a **body deadline** (``body_timeout_ms``): a body must be complete this long after its head;
  else the handler's read fails with 408 ``request-timeout`` problem+json and the connection
  is closed after that answer;
* a **cap on open connections per peer address** (``connections_per_address``; peers in
  ``trusted_proxies`` are exempt, a proxy carries many clients): a connection over the cap is
  answered 429 ``rate-limited`` with Retry-After on its first request, then closed;
* **problem+json for parser errors**: 400 ``bad-request`` naming what kind of error it was,
  never the bytes, logged at most once per 10 s with a count and no traceback.

The hot path pays two attribute checks per received chunk; timers are armed only for a head or a
body that does not arrive in one piece (and one per connection for its first head).
This leans on aiohttp's RequestHandler internals (``_request_count``, ``_messages``,
``_request_in_progress``, ``_lingering_time``); pyproject.toml pins aiohttp's minor version and
tests/test_http_guard.py covers every override.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from allocator.config import Settings
from allocator.errors import Problem, RateLimited, Unavailable
from allocator.ratelog import RateLimitedLog
from service.client import Network, is_trusted
from service.problems import BadRequest, RequestTimeout, problem_response

log = logging.getLogger("allot.http")

# What a parser error was, in words a client can act on; never the bytes that caused it.
_PARSER_ERRORS = {
    "BadHttpMethod": "the request method is not a valid token",
    "BadStatusLine": "the request line is malformed",
    "LineTooLong": "a line of the request head is too long",
    "InvalidHeader": "a header is malformed",
    "InvalidURLError": "the request target is not a valid URL",
    "TransferEncodingError": "the chunked body is malformed",
    "ContentLengthError": "the body does not match its Content-Length",
}


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float  # seconds; 0: none
    body_timeout: float  # seconds; 0: none
    per_address: int  # open connections per untrusted peer address; 0: no cap
    trusted: tuple[Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        s = settings.service
        return cls(
            header_timeout=s.header_timeout_ms / 1000,
            body_timeout=s.body_timeout_ms / 1000,
            per_address=s.connections_per_address,
            trusted=settings.gate.trusted_networks(),
        )


class ConnectionGuard:
    """Shared by every connection of one listener: the limits, open connections per address,
    and the rate-limited log (addresses appear in it only as a short keyed hash)."""

    def __init__(self, limits: Limits, hash_address: Callable[[str], str]) -> None:
        self.limits = limits
        self._hash = hash_address
        self._open: dict[str, int] = {}
        self.log = RateLimitedLog(log)

    def opened(self, host: str) -> tuple[str | None, bool]:
        """Count a new connection: (the key it is counted under, or None; over the cap?)."""
        cap = self.limits.per_address
        if cap <= 0 or is_trusted(host, self.limits.trusted):
            return None, False
        n = self._open.get(host, 0) + 1
        self._open[host] = n
        return host, n > cap

    def closed(self, host: str) -> None:
        n = self._open.get(host, 0) - 1
        if n > 0:
            self._open[host] = n
        else:
            self._open.pop(host, None)

    def client(self, host: str | None) -> str:
        """How a peer address appears in the log: a short HMAC, never the address."""
        return self._hash(host or "")[:12]


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with deadlines, the cap and problem+json errors."""

    __slots__ = ("_body", "_body_timer", "_counted", "_guard", "_head_timer", "_heard", "_host")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._host = ""
        self._counted: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._heard = False  # bytes of a request head have arrived since the last head ended

    # -- connection lifecycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._counted, over_cap = self._guard.opened(self._host)
        if over_cap:
            self._request_handler = self._refuse_over_cap  # read per request by start()
        super().connection_made(transport)
        if self._guard.limits.header_timeout > 0:
            self._head_timer = self._loop.call_later(
                self._guard.limits.header_timeout, self._head_expired
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted is not None:
            self._guard.closed(self._counted)
            self._counted = None
        self._cancel_head_timer()
        self._cancel_body_timer()
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The hot path (a head and its body in one read, nothing late): one base call, two
        # comparisons, one is_eof(). Everything else is on the slow paths below.
        count = self._request_count
        RequestHandler.data_received(self, data)
        if self._request_count != count:  # a head (or a parser error) is complete
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._heard = False
            messages = self._messages
            if not messages:
                return
            if self._body is not None and self._previous_body_ended(messages[-1][0]):
                return
            payload = messages[-1][1]
            if not payload.is_eof():
                self._watch_body(payload)
        elif self._body is not None:  # body bytes of the request being read
            if self._body.is_eof():
                self._cancel_body_timer()
                self._body = None
        elif data:  # bytes of a head that is not complete yet
            self._heard = True
            if self._head_timer is None and self._guard.limits.header_timeout > 0:
                self._head_timer = self._loop.call_later(
                    self._guard.limits.header_timeout, self._head_expired
                )

    def _previous_body_ended(self, message: Any) -> bool:
        """A new message while a body was being read: that body is complete (a pipelined
        request follows), or the parser failed inside it (True: answered as that body's)."""
        body = self._body
        assert body is not None
        if not isinstance(message, RawRequestMessage) and not body.is_eof():
            self._body_malformed(type(message.exc).__name__)
            return True
        self._cancel_body_timer()
        self._body = None
        return False

    # -- deadlines -------------------------------------------------------------------------------

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _watch_body(self, payload: StreamReader) -> None:
        self._cancel_body_timer()
        self._body = None
        if payload.is_eof():
            return
        self._body = payload
        if self._guard.limits.body_timeout > 0:
            self._body_timer = self._loop.call_later(
                self._guard.limits.body_timeout, self._body_late
            )

    def _body_malformed(self, kind: str) -> None:
        """The parser failed inside the body being read (chunk framing): that request's own
        read fails with 400 bad-request, instead of waiting for a body that cannot come."""
        payload, self._body = self._body, None
        self._cancel_body_timer()
        assert payload is not None
        self._messages.pop()  # the parser's error message: answered by the body's own handler
        self._log_parser_error(kind)
        self._lingering_time = 0.0  # close right after that answer
        what = _PARSER_ERRORS.get(kind, "the body could not be parsed")
        payload.set_exception(BadRequest(f"This is not a well-formed HTTP/1.1 request: {what}."))

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress:
            self.close()  # a pipelined head is late: answer the current request, then close
            return
        if self._heard:  # a head was started and not finished: a slow or broken client
            self._guard.log.log(
                "head-timeout",
                logging.INFO,
                "closed a connection from client %s: request head not complete within %g s",
                self._guard.client(self._host),
                self._guard.limits.header_timeout,
            )
        self.force_close()  # an idle connection that never spoke is just closed

    def _body_late(self) -> None:
        self._body_timer = None
        payload, self._body = self._body, None
        if payload is None or payload.is_eof() or self.transport is None:
            return
        self._guard.log.log(
            "body-timeout",
            logging.INFO,
            "request body from client %s not complete within %g s: 408",
            self._guard.client(self._host),
            self._guard.limits.body_timeout,
        )
        if not self._request_in_progress:
            self.force_close()  # nobody waits for this body (aiohttp is discarding its rest)
            return
        # The handler's read fails with 408 problem+json; no lingering read of the rest after
        # that answer: the connection closes as soon as it is sent.
        self._lingering_time = 0.0
        payload.set_exception(
            RequestTimeout(
                f"The request body did not arrive within {self._guard.limits.body_timeout:g} s."
            )
        )

    # -- answers of the connection layer ---------------------------------------------------------

    async def _refuse_over_cap(self, request: BaseRequest) -> web.StreamResponse:
        self._guard.log.warning(
            "over-cap",
            "client %s has more than %d open connections; refused one with 429",
            self._guard.client(self._host),
            self._guard.limits.per_address,
        )
        resp = problem_response(
            RateLimited(
                "Too many open connections from your address; close some and try again.",
                retry_after=1,
            )
        )
        resp.force_close()
        return resp

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's last resort: a request it could not parse, or an error outside the app's
        middleware. Answered problem+json; logged once per interval, without what was sent."""
        if request.writer.output_size > 0:  # as aiohttp does: an answer is already on its way
            raise ConnectionError("Response is sent already, cannot send an error answer")
        kind = type(exc).__name__ if exc is not None else "unknown"
        problem: Problem
        if isinstance(exc, HttpProcessingError) and status < 500:
            what = _PARSER_ERRORS.get(kind, "the request could not be parsed")
            problem = BadRequest(f"This is not a well-formed HTTP/1.1 request: {what}.")
            self._log_parser_error(kind)
        else:
            problem = Unavailable("Something went wrong on our side; please try again.")
            self._guard.log.log(
                "http-layer-error",
                logging.ERROR,
                "%s in the HTTP layer at %s, answered 503",
                kind,
                _where(exc),
            )
        resp = problem_response(problem)
        resp.force_close()
        return resp

    def _log_parser_error(self, kind: str) -> None:
        self._guard.log.warning(
            "parser-error",
            "malformed HTTP request from client %s (%s): answered 400 bad-request",
            self._guard.client(self._host),
            kind,
        )


class ReadyResponse(web.StreamResponse):
    """A whole answer (a status, a content type, a few headers, a body of bytes) written in one
    piece, for the hot route (service/app.py, HotRoutes).

    The bytes on the wire are those ``web.Response`` sends for the same answer: the status line,
    the given headers, then Content-Type, Content-Length, Date (aiohttp's clock, cached per
    second), Server and, as aiohttp decides it from the request, Connection; then the body, in
    one write. What it leaves out is the general machinery a fixed answer does not use
    (payload types, compression, chunking, cookies, re-checking each header) and the
    ``on_response_prepare`` signal, which the application does not use and the hot route,
    being unrouted, would not send anyway. tests/test_hot_route.py compares its answers with
    the routed way's, header by header, over HTTP/1.0 and 1.1.
    """

    def __init__(
        self,
        body: bytes,
        *,
        status: int,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status=status)
        self._ready_body = body
        given = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        self._ready_head = f"{given}Content-Type: {content_type}\r\n"

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        self._req = request
        writer = self._payload_writer = request.writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        connection = ""
        if keep_alive:
            if version == HttpVersion10:
                connection = "Connection: keep-alive\r\n"
        elif version == HttpVersion11:
            connection = "Connection: close\r\n"
        body = self._ready_body
        head = (
            f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}\r\n"
            f"{self._ready_head}Content-Length: {len(body)}\r\n"
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n{connection}\r\n"
        )
        await writer.write_eof(head.encode() + body)
        self._eof_sent = True
        self._body_length = writer.output_size
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        self._req = None
        self._payload_writer = None  # written in full by prepare


def _where(exc: BaseException | None) -> str:
    """file:line where an exception was raised (no message: it may quote a client's bytes)."""
    tb = exc.__traceback__ if exc is not None else None
    if tb is None:
        return "an unknown place"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


class GuardedServer(web.Server):
    """aiohttp's low-level server (the protocol factory), building GuardedHandlers."""

    def __init__(self, inner: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=inner._loop,
            **inner._kwargs,
        )
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, guard=self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are GuardedHandlers."""

    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._guard)


def serve(
    app: web.Application,
    guard: ConnectionGuard,
    *,
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop,
    reuse_port: bool = False,
    backlog: int = 128,
    shutdown_timeout: float = 5,
) -> None:
    """``web.run_app`` for a guarded listener: serve until SIGINT or SIGTERM, then clean up."""

    async def main() -> None:
        runner = GuardedRunner(
            app,
            guard,
            handle_signals=True,
            access_log=None,  # no per-request log line: under a flash crowd, the bottleneck
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=75,  # idle keep-alive connections, as web.run_app had it
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=backlog)
            await site.start()
            await asyncio.Event().wait()  # until a signal raises GracefulExit
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(task)
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
