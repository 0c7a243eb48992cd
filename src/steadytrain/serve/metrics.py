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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "steadytrain_serve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UTILISATION_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
TOKENS_PER_S_WINDOW_S = 10.0


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
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._recent_tokens_per_second)

    def observe_batch(
        self, kind: str, *, size: int, seconds: float, tokens: int, padding: int
    ) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_utilisation.labels(kind).observe(size / self.max_batch_size)
        self.forward_time.labels(kind).observe(seconds)
        self.batch_tokens.labels(kind).inc(tokens)
        self.padding_tokens.labels(kind).inc(padding)

    def observe_attention(self, *, attended: int, masked: int) -> None:
        self.attended_positions.inc(attended)
        self.masked_positions.inc(masked)

    def observe_generated(self, count: int) -> None:
        self.generated_tokens.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def _recent_tokens_per_second(self) -> float:
        """Computed when scraped, so an idle server reads 0 rather than its last rate."""
        horizon = time.monotonic() - TOKENS_PER_S_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            total = sum(counted for _, counted in self._recent)
        return total / TOKENS_PER_S_WINDOW_S
