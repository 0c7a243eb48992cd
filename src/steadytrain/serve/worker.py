"""The model's thread: it alone calls the model, batching what the handlers queue.

Forward requests are batched whole; generations are batched by decoding step over one KV
cache (decoding.py), joining the running batch between steps and leaving it when done,
gone or out of time. A model call that
raises fails only the requests it held: each is retried alone, so one bad request fails by
itself. Anything else that stops the thread closes the batcher, fails what is left, and
makes /readyz report it.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from steadytrain.model import GPT
from steadytrain.serve.batcher import Batcher, Dropped, Pending, ServeFailure
from steadytrain.serve.decoding import DecodingBatch
from steadytrain.serve.faults import Faults
from steadytrain.serve.generation import (
    Generation,
    Sampling,
    byte_text,
    forward_rows,
    pad_rows,
    token_logprobs,
)
from steadytrain.serve.loading import ServedModel
from steadytrain.serve.metrics import STEP_FLUSH_S, ServeMetrics

FORWARD, GENERATE = "forward", "generate"
KINDS = (FORWARD, GENERATE)
T = TypeVar("T")


@dataclass(frozen=True)
class ForwardRequest:
    tokens: list[int]
    output: Literal["logits", "logprobs"]


@dataclass(frozen=True)
class GenerateRequest:
    tokens: list[int]
    sampling: Sampling


class ModelWorker:
    """Owns the model and runs the batch loop in one thread."""

    def __init__(
        self,
        served: ServedModel,
        batcher: Batcher,
        metrics: ServeMetrics,
        *,
        faults: Faults = Faults(),
    ) -> None:
        self.served = served
        self.batcher = batcher
        self.metrics = metrics
        self.faults = faults
        settings = served.config.serve
        self.max_batch_size = settings.max_batch_size
        self.max_wait_s = settings.max_wait_ms / 1000
        self.running: list[tuple[Pending, Generation]] = []
        self.decoding: DecodingBatch | None = None
        if served.generates:
            assert isinstance(served.model, GPT), "/v1/generate serves the default GPT only"
            self.decoding = DecodingBatch(served.model, max_rows=self.max_batch_size)
        self.error: str | None = None  # why the loop stopped, if it did by failing
        self._thread = threading.Thread(target=self._run, name="steadytrain-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, timeout: float) -> None:
        """Close the batcher (what is still queued fails) and wait for the thread."""
        for pending in self.batcher.close("the server is shutting down"):
            pending.reply.fail(ServeFailure(503, "the server is shutting down"))
        self._thread.join(timeout)

    def warm_up(self) -> str | None:
        """One forward, and a prefill and a cached decoding step, in the calling thread,
        before serving.

        Returns a warning when a user's model refuses the warm-up's two tokens: it may take
        other inputs, so it is served anyway (requests it refuses fail with what it raised).

        Raises:
            Exception: the default GPT failing its warm-up (a broken install, not an input).
        """
        served = self.served
        with torch.inference_mode():
            try:
                forward_rows(served.model, pad_rows([[0, 1]], device=served.device))
            except Exception as error:
                if served.generates:
                    raise
                return f"warm-up skipped: the model refused tokens [0, 1] ({_describe(error)})"
            if self.decoding is not None:
                generation = Generation([0], Sampling(max_new_tokens=2, temperature=0))
                self.decoding.join(generation)
                self.decoding.step()  # the prompt's prefill
                self.decoding.step()  # a step from the cache
                self.decoding.leave(generation)
        return None

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as error:  # a bug: say so where operators look, and stop
            self.error = f"the batch loop stopped: {type(error).__name__}: {error}"
            traceback.print_exc()
        finally:
            self.metrics.flush_steps()
            reason = self.error or "the server is shutting down"
            left = self.batcher.close(reason)
            for pending in [*left, *(pending for pending, _ in self.running)]:
                pending.reply.fail(ServeFailure(503, reason))
            self.running = []

    def _loop(self) -> None:
        while True:
            if not self.running and not self.batcher.wait_for_requests():
                if self.batcher.closed is not None:
                    return
                continue
            # A running generation must not wait for a batch to fill: only an idle loop does.
            wait_s = 0.0 if self.running else self.max_wait_s
            forward, dropped = self.batcher.take(
                FORWARD, limit=self.max_batch_size, max_wait_s=wait_s
            )
            self._answer_dropped(dropped)
            if forward:
                self._run_forward(forward)
            free = self.max_batch_size - len(self.running)
            if free:
                # Never a wait for generations: one that comes later joins at the next step,
                # its prefill in that step's pass, so waiting for it would only delay these.
                joining, dropped = self.batcher.take(GENERATE, limit=free, max_wait_s=0.0)
                self._answer_dropped(dropped)
                self._join(joining)
            if self.running:
                self._decode()
            recorded = self.metrics.steps_recorded_at
            if recorded is not None and (
                not self.running or time.monotonic() - recorded > STEP_FLUSH_S
            ):
                self.metrics.flush_steps()

    def _answer_dropped(self, dropped: Dropped) -> None:
        for pending in dropped.expired:
            pending.reply.fail(_timed_out(self.served))
        # The gone are not answered: their clients are not there to hear it.

    def _started(self, pendings: Sequence[Pending]) -> None:
        now = self.batcher.clock()
        for pending in pendings:
            pending.started_at = now
            self.metrics.queue_wait.labels(pending.kind).observe(now - pending.enqueued_at)

    # Forward requests

    def _run_forward(self, pendings: list[Pending]) -> None:
        self._started(pendings)
        # Right-padding is safe only when no token sees the tokens after it.
        if self.served.causal:
            groups = [pendings]
        else:
            by_length = sorted(pendings, key=lambda pending: len(pending.payload.tokens))
            groups = [
                list(group)
                for _, group in itertools.groupby(by_length, lambda p: len(p.payload.tokens))
            ]
        for group in groups:
            outputs = self._isolated(FORWARD, group, self._forward_call)
            for pending, output in zip(group, outputs, strict=True):
                if isinstance(output, ServeFailure):
                    pending.reply.fail(output)
                    continue
                try:
                    result = _forward_result(pending.payload, output)
                except ValueError as error:
                    pending.reply.fail(ServeFailure(422, str(error)))
                    continue
                pending.reply.finish(result)

    def _forward_call(self, group: list[Pending]) -> list[torch.Tensor]:
        rows = [pending.payload.tokens for pending in group]
        self.faults.before_model_call(rows)
        batch = pad_rows(rows, device=self.served.device)
        started = time.perf_counter()
        outputs = forward_rows(self.served.model, batch)
        self.metrics.observe_batch(
            FORWARD,
            size=len(rows),
            seconds=time.perf_counter() - started,
            tokens=batch.tokens.numel(),
            padding=batch.num_padding,
        )
        return outputs

    # Generation

    def _join(self, pendings: list[Pending]) -> None:
        self._started(pendings)
        assert self.decoding is not None
        for pending in pendings:
            request: GenerateRequest = pending.payload
            generation = Generation(request.tokens, request.sampling)
            self.decoding.join(generation)
            self.running.append((pending, generation))

    def _decode(self) -> None:
        """One decoding step for every running generation still wanted."""
        assert self.decoding is not None
        decoding = self.decoding
        now = self.batcher.clock()
        still: list[tuple[Pending, Generation]] = []
        for pending, generation in self.running:
            if pending.gone or pending.expired(now):
                decoding.leave(generation)  # its cache row is free for a newcomer
                if not pending.gone:  # a client that disconnected is answered by nobody
                    pending.reply.fail(_timed_out(self.served))
                continue
            still.append((pending, generation))
        self.running = still
        if not still:
            return
        pendings = [pending for pending, _ in still]
        generation_of = dict(still)
        outcomes = self._isolated(
            GENERATE, pendings, lambda group: self._decode_call([generation_of[p] for p in group])
        )
        self.running = []
        for (pending, generation), outcome in zip(still, outcomes, strict=True):
            if isinstance(outcome, ServeFailure):
                decoding.leave(generation)
                pending.reply.fail(outcome)
                continue
            pending.reply.token(outcome)
            if generation.done:
                decoding.leave(generation)
                pending.reply.finish(
                    {
                        "text": byte_text(generation.generated),
                        "tokens": list(generation.generated),
                        "num_tokens": len(generation.generated),
                    }
                )
            else:
                self.running.append((pending, generation))

    def _decode_call(self, generations: list[Generation]) -> list[int]:
        assert self.decoding is not None
        self.faults.before_model_call([generation.prompt for generation in generations])
        started = time.perf_counter()
        step = self.decoding.step(generations)
        self.metrics.record_step(
            GENERATE,
            size=len(generations),
            seconds=time.perf_counter() - started,
            cost=step.cost,
            generated=len(step.tokens),
        )
        return step.tokens

    def _isolated(
        self, kind: str, group: list[Pending], call: Callable[[list[Pending]], list[T]]
    ) -> list[T | ServeFailure]:
        """``call(group)``; when it raises, each request alone, so that only those that fail
        by themselves fail (with a 500 saying why)."""
        try:
            return list(call(group))
        except Exception as error:
            self.metrics.batch_failures.labels(kind).inc()
            if len(group) == 1:
                return [_model_failure(error)]
        outcomes: list[T | ServeFailure] = []
        for pending in group:
            try:
                outcomes.extend(call([pending]))
            except Exception as error:
                self.metrics.batch_failures.labels(kind).inc()
                outcomes.append(_model_failure(error))
        return outcomes


def _forward_result(request: ForwardRequest, output: torch.Tensor) -> dict[str, Any]:
    if request.output == "logits":
        return {"logits": output.tolist(), "shape": list(output.shape)}
    return {"logprobs": token_logprobs(output, request.tokens)}


def _describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


def _model_failure(error: Exception) -> ServeFailure:
    return ServeFailure(500, f"the model failed on this request ({_describe(error)})")


def _timed_out(served: ServedModel) -> ServeFailure:
    limit = served.config.serve.request_timeout_s
    return ServeFailure(504, f"not answered within serve.request_timeout_s ({limit:g} s)")
