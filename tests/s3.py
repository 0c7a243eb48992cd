"""A real S3-protocol server for tests: moto on loopback, and a fault-injecting proxy before it.

The fixtures (``s3_endpoint``, ``bucket``, ``fault_proxy``) are registered for every test in
``tests/conftest.py``. Credentials and the endpoint reach the code under test as users give
them: through the standard AWS environment variables or ``checkpoint.storage_options``.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

ACCESS_KEY = "steadytrain-test"
SECRET = "s3cr3t-" + uuid.uuid4().hex  # unique, so a leak of it anywhere can be searched for


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment a user of an S3-compatible store at ``endpoint`` would set."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def storage_options(endpoint: str, *, botocore_retries: bool = True) -> dict[str, Any]:
    """``checkpoint.storage_options`` for the server at ``endpoint``.

    Args:
        endpoint: the server's (or a proxy's) URL.
        botocore_retries: when false, botocore sends each request once, so that every retry
            seen is one of ``ObjectStorage``'s own and requests can be counted exactly.
    """
    options: dict[str, Any] = {
        "key": ACCESS_KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint},
    }
    if not botocore_retries:
        # "total_max_attempts" counts the first request; botocore's "max_attempts" counts
        # only retries.
        options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    return options


def s3fs_for(endpoint: str):
    """An s3fs file system on ``endpoint``, to set up and inspect what a test stored."""
    import s3fs

    return s3fs.S3FileSystem(**storage_options(endpoint))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback, in a thread of the test process."""
    from moto.server import ThreadedMotoServer

    # In this process, the server's access log would fill every failure report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def bucket(s3_endpoint: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    s3fs_for(s3_endpoint).mkdir(name)
    return name


@dataclass(frozen=True)
class S3Error:
    """An error response as S3 sends it: an HTTP status and an XML body naming the error."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{self.message}</Message>"
            "<RequestId>steadytrain-fault</RequestId></Error>"
        ).encode()


# S3 sends SlowDown when throttling, and asks for a retry of InternalError; botocore retries
# both unless told not to, and s3fs itself retries SlowDown (five times, as of s3fs 2026.9).
SLOW_DOWN = S3Error(503, "SlowDown", "Please reduce your request rate.")
INTERNAL_ERROR = S3Error(500, "InternalError", "We encountered an internal error. Try again.")
ACCESS_DENIED = S3Error(403, "AccessDenied", "Access Denied")


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy saw, and what it answered."""

    method: str
    path: str
    byte_range: str | None
    status: int
    injected: bool
    arrived_s: float  # time.monotonic() when the request arrived


class FaultProxy:
    """An HTTP proxy before an S3 server that answers chosen requests with an ``S3Error``.

    It relays everything until told to ``fail``; ``requests`` logs every request since then.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self.fail(None)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and "Expect: 100-continue", like S3
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: object) -> None:
                return None

            def _relay(self) -> None:
                arrived_s = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                error = proxy._error_for(self.command)
                if error is not None:
                    proxy._log(self, arrived_s, error.status, injected=True)
                    self._answer(error.status, [("Content-Type", "application/xml")], error.body())
                    return
                upstream_connection = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in {"expect", "connection"}
                }
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                response = upstream_connection.getresponse()
                payload = response.read()
                upstream_connection.close()
                proxy._log(self, arrived_s, response.status, injected=False)
                self._answer(
                    response.status,
                    response.getheaders(),
                    payload,
                    length=response.getheader("Content-Length"),
                )

            def _answer(
                self,
                status: int,
                headers: list[tuple[str, str]],
                payload: bytes,
                *,
                length: str | None = None,
            ) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(name, value)
                # A HEAD answer has no body, but says how long the GET one would be.
                head = self.command == "HEAD"
                self.send_header("Content-Length", (head and length) or str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def fail(
        self,
        error: S3Error | None,
        *,
        times: int | None = None,
        every: int = 1,
        after: int = 0,
        method: str | None = None,
    ) -> None:
        """From now on answer requests with ``error`` (``None``: relay every request), and
        start a new log of ``requests``.

        Args:
            error: the error to answer with.
            times: how many requests to fail before relaying again; ``None``: never stop.
            every: fail every ``every``-th request that is counted.
            after: relay this many counted requests before failing any.
            method: count only requests with this HTTP method; others are relayed.
        """
        with self._lock:
            self._error = error
            self._times = times
            self._every = every
            self._after = after
            self._method = method
            self._counted = 0
            self._failed = 0
            self.requests = []

    @property
    def injected(self) -> int:
        """How many requests since the last ``fail`` were answered with an injected error."""
        with self._lock:
            return sum(request.injected for request in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _error_for(self, method: str) -> S3Error | None:
        with self._lock:
            if self._error is None or self._method not in {None, method}:
                return None
            self._counted += 1
            due = self._counted > self._after and (self._counted - self._after) % self._every == 0
            if not due or (self._times is not None and self._failed >= self._times):
                return None
            self._failed += 1
            return self._error

    def _log(
        self, handler: BaseHTTPRequestHandler, arrived_s: float, status: int, *, injected: bool
    ) -> None:
        request = ProxiedRequest(
            method=handler.command,
            path=handler.path,
            byte_range=handler.headers.get("Range"),
            status=status,
            injected=injected,
            arrived_s=arrived_s,
        )
        with self._lock:
            self.requests.append(request)


@pytest.fixture(scope="session")
def _session_fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    # One proxy for all tests: one URL, so fsspec reuses one client rather than building one
    # (and loading botocore's service model, half a second) for each test.
    proxy = FaultProxy(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def fault_proxy(_session_fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` before the moto server, relaying every request until told to fail."""
    _session_fault_proxy.fail(None)
    yield _session_fault_proxy
    _session_fault_proxy.fail(None)
