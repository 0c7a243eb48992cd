"""The HTTP API (FastAPI): request checks, queueing, waiting for the model's thread, answers.

Handlers never call the model: they queue a request and await its outcome, so the event loop
stays free. A client that disconnects or runs out of time is taken off the queue (or out of
its running batch) at once, and nothing is ever sent to it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from steadytrain.config import ServeConfig
from steadytrain.serve.batcher import Batcher, BatcherClosed, Pending, QueueFull, ServeFailure
from steadytrain.serve.generation import Sampling, byte_tokens
from steadytrain.serve.loading import ServedModel
from steadytrain.serve.metrics import ServeMetrics
from steadytrain.serve.worker import (
    FORWARD,
    GENERATE,
    KINDS,
    ForwardRequest,
    GenerateRequest,
    ModelWorker,
)

CLIENT_GONE = 499  # nginx's "client closed request": counted, never seen by anyone
OUTCOMES = {200: "ok", 499: "disconnected", 500: "failed", 503: "rejected", 504: "timeout"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, description="Text to continue.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens (bytes) to generate.")
    temperature: float = Field(1.0, ge=0, description="0: greedy; higher: more random.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest only.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seeds this request's sampling.")
    stream: bool = Field(False, description="Send each token as a server-sent event.")


class ForwardBody(_Body):
    tokens: list[int] = Field(min_length=1, description="Token ids of one sequence.")
    output: Literal["logprobs", "logits"] = Field(
        "logprobs", description="logprobs: log p(token t | tokens before t); logits: all."
    )


@dataclass
class ServerState:
    """What /readyz reports: loaded and warmed up, its batch loop alive, not draining."""

    served: ServedModel | None = None
    worker: ModelWorker | None = None
    draining: bool = False

    def not_ready(self) -> str | None:
        """Why the server cannot take requests now, or None when it can."""
        if self.draining:
            return "draining: the server is shutting down"
        if self.served is None or self.worker is None:
            return "loading the model"
        if not self.worker.alive:
            return self.worker.error or "the batch loop is not running"
        return None


class LoopReply:
    """A request's outcome, handed from the model's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, stream: bool) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.tokens: asyncio.Queue[int | None] | None = asyncio.Queue() if stream else None

    def token(self, token: int) -> None:
        if self.tokens is not None:
            self._call(self.tokens.put_nowait, token)

    def finish(self, result: Any) -> None:
        self._call(self._settle, result, None)

    def fail(self, error: ServeFailure) -> None:
        self._call(self._settle, None, error)

    def _settle(self, result: Any, error: ServeFailure | None) -> None:
        # On the loop: a future cancelled because its client left is never set.
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        if self.tokens is not None:
            self.tokens.put_nowait(None)

    def _call(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(callback, *args)


def create_app(
    state: ServerState, *, batcher: Batcher, metrics: ServeMetrics, settings: ServeConfig
) -> FastAPI:
    """The API over ``batcher`` (whose requests the model's thread answers)."""
    api = _Api(state, batcher=batcher, metrics=metrics, settings=settings)
    app = FastAPI(title="steadytrain serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ServeFailure, api.failed)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, api.invalid)  # type: ignore[arg-type]
    app.add_api_route("/healthz", api.healthz, methods=["GET"])
    app.add_api_route("/readyz", api.readyz, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus_metrics, methods=["GET"])
    app.add_api_route("/v1/forward", api.forward, methods=["POST"])
    app.add_api_route("/v1/generate", api.generate, methods=["POST"])
    metrics.ready.set_function(lambda: 0.0 if state.not_ready() else 1.0)
    for kind in KINDS:  # read when scraped: never stale after a discard
        metrics.queue_length.labels(kind).set_function(functools.partial(batcher.queued, kind))
    return app


class _Api:
    """The handlers: check, queue, await the outcome, answer (and count what happened)."""

    def __init__(
        self,
        state: ServerState,
        *,
        batcher: Batcher,
        metrics: ServeMetrics,
        settings: ServeConfig,
    ) -> None:
        self.state = state
        self.batcher = batcher
        self.metrics = metrics
        self.settings = settings

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        reason = self.state.not_ready()
        served = self.state.served
        if reason is not None or served is None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "weights": served.source,
                "step": served.step,
                "device": str(served.device),
            }
        )

    async def prometheus_metrics(self) -> Response:
        self.metrics.flush_steps()  # every decoding step taken so far
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def forward(self, body: ForwardBody, request: Request) -> Any:
        served = self.ready_model()
        tokens = body.tokens
        limit = self.settings.max_prompt_tokens
        limit = min(limit, served.max_seq_len or limit)
        if len(tokens) > limit:
            raise ServeFailure(
                413, f"tokens: {len(tokens)} tokens, more than the {limit} this server takes"
            )
        if served.vocab_size is not None and not all(0 <= t < served.vocab_size for t in tokens):
            raise ServeFailure(422, f"tokens: ids must be in [0, {served.vocab_size})")
        pending = self.submit(FORWARD, ForwardRequest(tokens, body.output))
        result = await self.outcome(pending, request)
        self.count(request, 200)
        return result

    async def generate(self, body: GenerateBody, request: Request) -> Any:
        pending = self.submit(GENERATE, self.generate_request(body), stream=body.stream)
        if body.stream:  # counted as answered: what follows goes in the stream's own events
            self.count(request, 200)
            return StreamingResponse(_events(pending, self.batcher), media_type="text/event-stream")
        result = await self.outcome(pending, request)
        self.count(request, 200)
        return result

    def generate_request(self, body: GenerateBody) -> GenerateRequest:
        served, settings = self.ready_model(), self.settings
        if not served.generates:
            raise ServeFailure(
                404,
                f"/v1/generate serves the default byte-level GPT; this run's model is "
                f"{served.config.model.factory}: use /v1/forward",
            )
        tokens = byte_tokens(body.prompt)
        if len(tokens) > settings.max_prompt_tokens:
            raise ServeFailure(
                413,
                f"prompt: {len(tokens)} bytes, more than serve.max_prompt_tokens "
                f"({settings.max_prompt_tokens})",
            )
        if body.max_new_tokens > settings.max_new_tokens:
            raise ServeFailure(
                422,
                f"max_new_tokens: {body.max_new_tokens} is more than serve.max_new_tokens "
                f"({settings.max_new_tokens})",
            )
        sampling = Sampling(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            seed=body.seed,
        )
        return GenerateRequest(tokens, sampling)

    def ready_model(self) -> ServedModel:
        reason = self.state.not_ready()
        if reason is not None or self.state.served is None:
            self.metrics.rejections.labels("draining" if self.state.draining else "not_ready").inc()
            raise ServeFailure(503, f"not ready: {reason}")
        return self.state.served

    def submit(self, kind: str, payload: Any, *, stream: bool = False) -> Pending:
        reply = LoopReply(asyncio.get_running_loop(), stream=stream)
        deadline = self.batcher.clock() + self.settings.request_timeout_s
        pending = Pending(kind, payload, reply, deadline=deadline)
        try:
            self.batcher.put(pending)
        except QueueFull as full:
            self.metrics.rejections.labels("queue_full").inc()
            raise ServeFailure(
                503, f"the queue is full ({full}); retry after {self.settings.retry_after_s} s"
            ) from None
        except BatcherClosed as closed:
            self.metrics.rejections.labels("draining").inc()
            raise ServeFailure(503, str(closed)) from None
        return pending

    async def outcome(self, pending: Pending, request: Request) -> Any:
        """The request's result; a client that leaves or outlasts its time is dropped."""
        future = pending.reply.future  # type: ignore[attr-defined]
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait(
                {future, watcher},
                timeout=max(0.0, pending.deadline - self.batcher.clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the shutdown grace ran out
            self.batcher.discard(pending)
            raise
        finally:
            watcher.cancel()
        if future.done():
            return future.result()  # raises its ServeFailure
        self.batcher.discard(pending)
        future.cancel()
        if watcher in done:
            raise ServeFailure(CLIENT_GONE, "the client disconnected")
        limit = self.settings.request_timeout_s
        raise ServeFailure(504, f"not answered within serve.request_timeout_s ({limit:g} s)")

    def count(self, request: Request, status: int) -> None:
        outcome = OUTCOMES.get(status, "bad_request" if 400 <= status < 500 else "failed")
        self.metrics.requests.labels(request.url.path, outcome).inc()

    async def failed(self, request: Request, failure: ServeFailure) -> JSONResponse:
        self.count(request, failure.status)
        retry = {"Retry-After": str(self.settings.retry_after_s)} if failure.status == 503 else None
        return JSONResponse({"error": str(failure)}, status_code=failure.status, headers=retry)

    async def invalid(self, request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            failure = ServeFailure(400, "the body is not valid JSON")
        elif "json" not in request.headers.get("content-type", ""):
            failure = ServeFailure(415, "send the body as JSON (Content-Type: application/json)")
        else:
            where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
            failure = ServeFailure(422, f"{where or 'body'}: {first.get('msg')}")
        return await self.failed(request, failure)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _events(pending: Pending, batcher: Batcher) -> AsyncIterator[str]:
    """A generation as server-sent events: one per token, then ``done`` (or ``error``)."""
    reply: LoopReply = pending.reply  # type: ignore[assignment]
    assert reply.tokens is not None
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    finished = False
    try:
        while True:
            remaining = max(0.0, pending.deadline - batcher.clock())
            try:
                token = await asyncio.wait_for(reply.tokens.get(), timeout=remaining)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                yield _event("error", {"error": "not answered within serve.request_timeout_s"})
                return
            if token is not None:
                yield _event(None, {"token": token, "text": text.decode(bytes([token]))})
                continue
            finished = True
            try:
                result = reply.future.result()
            except ServeFailure as failure:
                yield _event("error", {"error": str(failure), "status": failure.status})
                return
            yield _event("done", result)
            return
    finally:
        if not finished:  # the client left (or the stream broke): stop generating for it
            batcher.discard(pending)


def _event(kind: str | None, data: dict[str, Any]) -> str:
    head = f"event: {kind}\n" if kind else ""
    return f"{head}data: {json.dumps(data)}\n\n"
