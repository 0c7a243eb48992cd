"""The server's Prometheus metrics, in a registry of its own (served at /metrics).

Average batch size is ``batch_size_sum / batch_size_count`` (requests ÷ model calls); the
padding waste is ``padding_tokens_total / batch_tokens_total`` (positions run through the
model), and for cached decoding steps ``masked_positions_total / attended_positions_total``
(cache positions their attention read).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "steadytrain_serve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UTILISATION_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
TOKENS_PER_S_WINDOW_S = 10.0
STEP_FLUSH_S = 0.1  # decoding steps reach the metrics at most this late


class ServeMetrics:
    """Requests, queue, batches, model time, tokens and rejections of one server."""

    def __init__(self, *, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.max_batch_size = max_batch_size
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by endpoint and outcome (ok, bad_request, rejected, timeout, "
            "disconnected, failed).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections",
            "Requests refused before queueing, by reason (queue_full, draining, not_ready).",
            ["reason"],
            registry=registry,
        )
        self.queue_length = Gauge(
            f"{PREFIX}_queue_length", "Requests waiting for a batch.", ["kind"], registry=registry
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time from arrival to joining a batch.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Requests (or generating sequences) per model call.",
            ["kind"],
            buckets=tuple(float(size) for size in range(1, max_batch_size + 1)),
            registry=registry,
        )
        self.batch_utilisation = Histogram(
            f"{PREFIX}_batch_utilisation",
            "Batch size as a share of serve.max_batch_size, per model call.",
            ["kind"],
            buckets=UTILISATION_BUCKETS,
            registry=registry,
        )
        self.forward_time = Histogram(
            f"{PREFIX}_forward_seconds",
            "Model time per call (a forward batch or one decoding step), queueing apart.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Counter(
            f"{PREFIX}_batch_tokens",
            "Token positions run through the model (a forward batch, a prefill, one per sequence "
            "of a cached decoding step), padding included.",
            ["kind"],
            registry=registry,
        )
        self.padding_tokens = Counter(
            f"{PREFIX}_padding_tokens",
            "Token positions that were padding (waste).",
            ["kind"],
            registry=registry,
        )
        self.attended_positions = Counter(
            f"{PREFIX}_attended_positions",
            "Cache positions the attention of cached decoding steps read, masked ones included.",
            registry=registry,
        )
        self.masked_positions = Counter(
            f"{PREFIX}_masked_positions",
            "Cache positions read but masked: past a shorter row's end (waste).",
            registry=registry,
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated.", registry=registry
        )
        self.tokens_per_second = Gauge(
            f"{PREFIX}_generated_tokens_per_second",
            f"Tokens generated per second over the last {TOKENS_PER_S_WINDOW_S:g} s.",
            registry=registry,
        )
        self.batch_failures = Counter(
            f"{PREFIX}_batch_failures",
            "Model calls that raised (their requests failed, others went on).",
            ["kind"],
            registry=registry,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 when loaded, warmed up and the batch loop runs.",
            registry=registry,
        )
        self._per_kind: dict[str, tuple[Any, ...]] = {}
        self._steps: list[tuple[float, str, int, float, Any, int]] = []
        self._steps_lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._recent_tokens_per_second)

    def observe_batch(
        self, kind: str, *, size: int, seconds: float, tokens: int, padding: int
    ) -> None:
        # Called at every decoding step: each kind's children are looked up once.
        if kind not in self._per_kind:
            self._per_kind[kind] = tuple(
                metric.labels(kind)
                for metric in (
                    self.batch_size,
                    self.batch_utilisation,
                    self.forward_time,
                    self.batch_tokens,
                    self.padding_tokens,
                )
            )
        batch_size, utilisation, forward_time, batch_tokens, padding_tokens = self._per_kind[kind]
        batch_size.observe(size)
        utilisation.observe(size / self.max_batch_size)
        forward_time.observe(seconds)
        batch_tokens.inc(tokens)
        if padding:
            padding_tokens.inc(padding)

    def record_step(
        self, kind: str, *, size: int, seconds: float, cost: Any, generated: int
    ) -> None:
        """A decoding step (``cost``: a StepCost), observed at the next ``flush_steps``.

        Called by the model's thread between two steps, where what it costs delays every
        running sequence: it only appends. The thread flushes when its batch empties (after
        the answers have gone) and at least every ``STEP_FLUSH_S`` while busy; a scrape
        flushes first, so it sees every step taken before it.
        """
        with self._steps_lock:
            self._steps.append((time.monotonic(), kind, size, seconds, cost, generated))

    def flush_steps(self) -> None:
        """Observe the recorded steps (from any thread)."""
        with self._steps_lock:
            steps, self._steps = self._steps, []
        for at, kind, size, seconds, cost, generated in steps:
            self.observe_batch(
                kind, size=size, seconds=seconds, tokens=cost.positions, padding=cost.padding
            )
            if cost.attended:
                self.attended_positions.inc(cost.attended)
            if cost.masked:
                self.masked_positions.inc(cost.masked)
            self.observe_generated(generated, at=at)

    @property
    def steps_recorded_at(self) -> float | None:
        """When the oldest step not yet flushed was recorded (None: none)."""
        return self._steps[0][0] if self._steps else None

    def observe_generated(self, count: int, *, at: float | None = None) -> None:
        self.generated_tokens.inc(count)
        with self._lock:
            self._recent.append((time.monotonic() if at is None else at, count))

    def _recent_tokens_per_second(self) -> float:
        """Computed when scraped, so an idle server reads 0 rather than its last rate."""
        horizon = time.monotonic() - TOKENS_PER_S_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            total = sum(counted for _, counted in self._recent)
        return total / TOKENS_PER_S_WINDOW_S
