"""A lean HTTP/1.1 client for benchmarks/serve.py's load: one keep-alive connection, bodies
encoded once, answers read by Content-Length.

The load runs on the same cores as the server, so what the client spends per request is
taken from the server: httpx spent ~0.9 ms of CPU per request here (GET /healthz one at a
time), about 2.5x the server's event loop, where this one spends a small fraction of that.
It speaks only what uvicorn answers these requests with (a status line, headers with a
Content-Length, the body) and refuses anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ProtocolError(RuntimeError):
    """The server answered something this client does not read (e.g. a chunked body)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def encode_request(url: str, method: str, path: str, body: dict[str, Any] | None) -> bytes:
    """The request's bytes, ready to send as many times as wanted."""
    host = urlsplit(url).netloc
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    payload = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


class Connection:
    """One keep-alive connection; ``send`` one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, request: bytes) -> Answer:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ProtocolError(f"a {value.strip().decode()} body: not read here")
        if length is None:
            raise ProtocolError(f"an answer without Content-Length: {lines[0].decode()}")
        return Answer(status, await self.reader.readexactly(length))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
