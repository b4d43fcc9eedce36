"""A lean HTTP/1.1 client for load generation: keep-alive connections over asyncio streams, requests built
once as bytes, answers parsed only as far as needed (status, Content-Length, Server-Timing).

A general client (httpx) spends about half a millisecond of Python per request; on a 2-core machine that
shares its cores with the server, that would be most of what is measured. This one spends a few tens of
microseconds, so a server that answers in 1 ms is seen as answering in about 1 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024
# uvicorn closes a keep-alive connection after 5 s without a request: reuse only younger idle ones.
MAX_IDLE_S = 4.0


class ProtocolError(Exception):
    """An answer that is not valid HTTP/1.1 as this client reads it."""


class ClosedBeforeAnswer(ConnectionResetError):
    """The server closed the connection before a byte of the answer came (e.g. an idle keep-alive
    connection it timed out): the request was not processed, so it may be sent again."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; only the last value of a repeated header
    body: bytes

    def server_timing(self) -> dict[str, float]:
        """`Server-Timing: decode;dur=0.41, queue;dur=0.02` -> {"decode": 0.41, "queue": 0.02} (ms)."""
        return parse_server_timing(self.headers.get("server-timing", ""))


def parse_server_timing(value: str) -> dict[str, float]:
    """The `dur` of each metric in a Server-Timing header value (metrics without one are left out)."""
    timings: dict[str, float] = {}
    for metric in value.split(","):
        name, *parameters = (part.strip() for part in metric.split(";"))
        for parameter in parameters:
            key, _, number = parameter.partition("=")
            if key.strip() == "dur" and name:
                with contextlib.suppress(ValueError):
                    timings[name] = float(number)
    return timings


def build_request(
    method: str,
    path: str,
    *,
    host: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The whole request as bytes (head + body), keep-alive, Content-Length always set for bodies."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class Connection:
    """One keep-alive TCP connection; `exchange` sends a prepared request and reads its whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False
        self.last_used = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> Reply:
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as error:
            self.closed = True
            if not getattr(error, "partial", b""):
                raise ClosedBeforeAnswer("the server closed the connection before answering") from error
            raise ConnectionResetError("the server closed the connection mid-answer") from error
        except asyncio.LimitOverrunError as error:
            raise ProtocolError("answer head too long") from error
        status, headers = _parse_head(head[:-4])
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.last_used = time.monotonic()
        return Reply(status, headers, body)

    async def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


@dataclass
class ConnectionPool:
    """Keep-alive connections to one server, opened on demand and reused; a failed one is dropped."""

    host: str
    port: int
    timeout_s: float = 30.0
    max_connections: int | None = None  # a cap: requests beyond it wait for a connection to come free
    _idle: list[Connection] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None
    opened: int = 0
    retried: int = 0  # requests sent again after a stale keep-alive connection

    async def exchange(self, request: bytes) -> Reply:
        """Send on an idle connection young enough to be alive (else a new one, up to max_connections); a
        reused connection the server had closed before answering is replaced once, as HTTP clients do."""
        if self.max_connections is None:
            return await self._exchange(request)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        async with self._slots:
            return await self._exchange(request)

    async def _exchange(self, request: bytes) -> Reply:
        connection = self._take_idle()
        reused = connection is not None
        if connection is None:
            connection = await self._open()
        try:
            reply = await asyncio.wait_for(connection.exchange(request), self.timeout_s)
        except ClosedBeforeAnswer:
            connection.close()
            if not reused:
                raise
            self.retried += 1
            connection = await self._open()
            try:
                reply = await asyncio.wait_for(connection.exchange(request), self.timeout_s)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        if not connection.closed:
            self._idle.append(connection)
        return reply

    def _take_idle(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.last_used < MAX_IDLE_S:
                return connection
            connection.close()
        return None

    async def _open(self) -> Connection:
        connection = await asyncio.wait_for(Connection.open(self.host, self.port), self.timeout_s)
        self.opened += 1
        return connection

    async def prepare(self, count: int) -> None:
        """Open `count` connections up front (so a measured window does not pay for handshakes)."""
        opened = await asyncio.gather(*(Connection.open(self.host, self.port) for _ in range(count)))
        self._idle.extend(opened)
        self.opened += count

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def split_url(url: str) -> tuple[str, int, str]:
    """'http://127.0.0.1:8000/predict?x=1' -> ('127.0.0.1', 8000, '/predict?x=1'); http only."""
    if not url.startswith("http://"):
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    authority, _, path = url[len("http://") :].partition("/")
    host, _, port = authority.partition(":")
    return host, int(port or 80), "/" + path
