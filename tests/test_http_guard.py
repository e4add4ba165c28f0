"""The connection layer (service/http.py) over raw sockets: slow clients, caps, parser errors.

Each test runs the real application behind the same GuardedRunner that `allot serve` uses, on
a port of its own, with small deadlines (0.5 s). Nothing here asserts a duration beyond
"closed within a generous bound".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.identity import Hasher
from service import logsafe
from service.app import create_app
from service.http import ConnectionGuard, GuardedRunner, Limits

BOUND = 10.0  # generous: "closed within" this many seconds, whatever the machine's load
ID, PHONE = "11010519491231002X", "13912345678"
BODY = orjson.dumps({"citizen_id": ID, "phone": PHONE, "site_id": "s1"})
RESERVE = b"POST /api/v1/rounds/r1/reservations HTTP/1.1\r\nHost: t\r\n"

Start = Callable[..., Awaitable[int]]


@pytest.fixture
async def guarded(settings: Settings, redis: Redis) -> AsyncIterator[Start]:
    """start(**[service] overrides, trusted=...) -> port of a guarded listener of the app."""
    runners: list[web.AppRunner] = []

    async def start(trusted: tuple[str, ...] | None = None, **service: Any) -> int:
        s = replace(settings, service=replace(settings.service, **service))
        if trusted is not None:
            s = replace(s, gate=replace(s.gate, trusted_proxies=trusted))
        guard = ConnectionGuard(Limits.from_settings(s), Hasher(s.pepper_bytes).client)
        runner = GuardedRunner(create_app(s), guard, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails past BOUND)."""
    chunks = []
    async with asyncio.timeout(BOUND):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await connect(port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_to_close(reader)
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def problem_of(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/problem+json"), headers
    doc: dict[str, Any] = orjson.loads(body)
    assert (doc["code"], doc["status"]) == (code, status), doc
    assert doc["type"]
    assert doc["title"]
    assert isinstance(doc["detail"], str)
    return doc


# -- slow clients -------------------------------------------------------------------------------


async def test_a_request_head_trickled_byte_by_byte_is_cut_off(guarded: Start) -> None:
    """A slowloris client holds a connection forever with a head that never ends."""
    port = await guarded(header_timeout_ms=500)
    reader, writer = await connect(port)
    head = RESERVE + b"X-Pad: " + b"a" * 10_000

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        assert await read_to_close(reader) == b""  # closed, nothing to answer
    finally:
        sender.cancel()
        writer.close()


async def test_a_connection_that_never_sends_a_request_is_closed(guarded: Start) -> None:
    """Idle sockets opened by the thousand would exhaust the worker's file descriptors."""
    port = await guarded(header_timeout_ms=500)
    reader, writer = await connect(port)
    try:
        assert await read_to_close(reader) == b""
    finally:
        writer.close()


async def test_a_body_that_never_arrives_is_answered_408_request_timeout(guarded: Start) -> None:
    """A POST that announces a body and sends a third of it must not hold a worker's slot."""
    port = await guarded(body_timeout_ms=500)
    reader, writer = await connect(port)
    try:
        writer.write(
            RESERVE
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
            + BODY[:20]
        )
        await writer.drain()
        problem_of(await read_to_close(reader), 408, "request-timeout")
    finally:
        writer.close()


async def test_a_chunked_body_that_stops_is_answered_408(guarded: Start) -> None:
    """The same for a chunked body whose last chunk never comes."""
    port = await guarded(body_timeout_ms=500)
    raw = RESERVE + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"%x\r\n%s\r\n" % (len(BODY), BODY)  # one chunk, then neither more nor the end
    problem_of(await exchange(port, raw), 408, "request-timeout")


async def test_a_kept_alive_connection_idle_between_requests_keeps_working(
    guarded: Start,
) -> None:
    """Deadlines run only while a request is arriving: keep-alive clients (browsers, the load
    test, a proxy's pool) are not cut off between requests."""
    port = await guarded(header_timeout_ms=500, body_timeout_ms=500)
    reader, writer = await connect(port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(BOUND):
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers, _ = parse(head)
                await reader.readexactly(int(headers["content-length"]))
            assert status == 200
            await asyncio.sleep(1.0)  # idle for twice the head deadline
    finally:
        writer.close()


# -- connections per address ----------------------------------------------------------------------


async def test_connections_over_the_per_address_cap_get_429_and_are_closed(
    guarded: Start,
) -> None:
    """One address may not take every connection slot; a closed one frees its place."""
    port = await guarded(trusted=(), connections_per_address=3, header_timeout_ms=30_000)
    held = [await connect(port) for _ in range(3)]
    try:
        raw = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        doc = problem_of(raw, 429, "rate-limited")
        assert "connections" in doc["detail"]
        assert int(parse(raw)[1]["retry-after"]) >= 1
        _, first = held.pop()
        first.close()
        async with asyncio.timeout(BOUND):  # the server sees the close a moment later
            while True:
                raw = await exchange(
                    port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )
                if parse(raw)[0] == 200:
                    break
                await asyncio.sleep(0.05)
    finally:
        for _, writer in held:
            writer.close()


async def test_trusted_proxies_are_exempt_from_the_connection_cap(guarded: Start) -> None:
    """A proxy carries many clients on its connections; the load test and wrk run from here."""
    port = await guarded(trusted=("127.0.0.1/32",), connections_per_address=2)
    held = [await connect(port) for _ in range(4)]
    try:
        raw = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert parse(raw)[0] == 200
    finally:
        for _, writer in held:
            writer.close()


# -- parser errors -------------------------------------------------------------------------------

MALFORMED = {
    "chunked header, plain JSON body": RESERVE
    + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    + BODY,
    "space in a header name": b"GET / HTTP/1.1\r\nHost: t\r\nX Citizen: "
    + ID.encode()
    + b"\r\n\r\n",
    "header line too long": b"GET / HTTP/1.1\r\nHost: t\r\nX-Phone: "
    + PHONE.encode() * 900
    + b"\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + ID.encode() + b"\r\n\r\n",
    "Content-Length and chunked": RESERVE
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    + BODY,
    "bad request line": b"GET /?" + PHONE.encode() + b" HTTP/9\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_request_is_400_bad_request_problem_json_quoting_nothing(
    guarded: Start, case: str
) -> None:
    """aiohttp's own answer is plain text that quotes the bytes it choked on."""
    port = await guarded()
    raw = await exchange(port, MALFORMED[case])
    doc = problem_of(raw, 400, "bad-request")
    for secret in (ID, PHONE):
        assert secret not in raw.decode("latin-1"), doc


@pytest.mark.usefixtures("safe_aiohttp_logs")  # as `allot serve` does
async def test_parser_errors_are_logged_once_per_interval_without_what_was_sent(
    guarded: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A client can send garbage as fast as it likes; the log must neither flood nor leak."""
    caplog.set_level(logging.DEBUG)
    port = await guarded()
    for _ in range(5):
        for raw in MALFORMED.values():
            problem_of(await exchange(port, raw), 400, "bad-request")
    about = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about]
    assert all(r.exc_info is None and r.exc_text is None for r in caplog.records)
    for secret in (ID, PHONE, "Traceback"):
        assert secret not in caplog.text


async def test_a_malformed_chunk_inside_a_body_is_answered_400_at_once(guarded: Start) -> None:
    """The handler waiting for that body gets a clear answer, not a wait until the deadline."""
    port = await guarded(body_timeout_ms=60_000)
    reader, writer = await connect(port)
    try:
        writer.write(
            RESERVE + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"cit\r\n'
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is now reading the body
        writer.write(b"zz" + PHONE.encode() + b"\r\n")
        await writer.drain()
        problem_of(await read_to_close(reader), 400, "bad-request")
    finally:
        writer.close()


async def test_a_client_hanging_up_mid_body_logs_no_traceback(
    guarded: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Phones lose their connection all the time; each loss must not write a stack trace."""
    caplog.set_level(logging.INFO)
    port = await guarded()
    _reader, writer = await connect(port)
    writer.write(RESERVE + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)  # the server notices and the handler's read fails
    # the one warning a test Redis (no persistence) earns at start-up is not about this client
    noted = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("redis runs with")
    ]
    assert not noted, caplog.text


@pytest.mark.usefixtures("safe_aiohttp_logs")
def test_aiohttp_log_lines_keep_no_arguments_exception_text_or_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp logs the bytes it could not parse, with a traceback, once per bad request."""
    caplog.set_level(logging.DEBUG)
    logsafe.install()  # again: idempotent, one filter and one rate limit
    server = logging.getLogger("aiohttp.server")
    assert sum(isinstance(f, logsafe.AiohttpLogFilter) for f in server.filters) == 1
    secret = "11010519491231002X 13912345678"
    for _ in range(20):
        try:
            raise ValueError(f"Invalid character in chunk size: b'{secret}'")
        except ValueError:
            server.exception("Error handling request from %s", "203.0.113.5")
    logging.getLogger("aiohttp.web").warning(f"Web-handler should return a response, got {secret}")
    logging.getLogger("aiohttp.access").info('203.0.113.5 "GET /r/%s HTTP/1.1" 200', secret)
    records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    messages = [r.getMessage() for r in records]
    assert messages == [
        "Error handling request from (ValueError); details withheld"
        " (they may hold what the client sent)",
        "Web-handler should return a response; details withheld"
        " (they may hold what the client sent)",
    ]
    assert all(r.exc_info is None and r.exc_text is None for r in records)
    for text in (secret, "203.0.113.5", "Traceback", "Invalid character"):
        assert text not in caplog.text
