"""Serve the run's metrics to Prometheus with the official client (``telemetry.prometheus_port``).

``PrometheusSink`` is a ``MetricSink`` on rank 0 beside ``metrics.jsonl``: each logged record
updates the gauges, and the client's own HTTP server (a daemon thread) answers scrapes. Only
rank 0 serves; other ranks' numbers arrive in the per-rank gather of the logged step and carry
a ``rank`` label. The names follow Prometheus conventions: base units (seconds), ``_total``
for counters, ``_ratio`` for shares (docs/telemetry.md lists them).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from steadytrain.telemetry.timers import PHASES

_PREFIX = "steadytrain_"

# Record field -> (metric name without the prefix, help).
_GAUGES = {
    "step": ("step", "Training step reached (global)."),
    "epoch": ("epoch", "Epoch of the data order."),
    "samples_seen": ("samples_seen", "Samples consumed, over all ranks."),
    "tokens_seen": ("tokens_seen", "Tokens consumed, over all ranks."),
    "loss": ("loss", "Mean training loss over the last logged interval and all ranks."),
    "val_loss": ("validation_loss", "Mean validation loss of the last evaluation."),
    "lr": ("learning_rate", "Learning rate of the last step."),
    "step_time_s": ("step_time_seconds", "Mean step time over the last logged interval."),
    "steps_per_second": ("steps_per_second", "Steps completed per second."),
    "samples_per_second": ("samples_per_second", "Samples per second, over all ranks."),
    "tokens_per_second": ("tokens_per_second", "Tokens per second, over all ranks."),
    "grad_sync_share": ("grad_sync_ratio", "Share of step time with a gradient all-reduce."),
    "seconds_since_checkpoint": (
        "seconds_since_checkpoint",
        "Seconds of work not yet in a durable checkpoint.",
    ),
    "steps_at_risk": ("steps_at_risk", "Steps a failure now would lose."),
    "expected_lost_s": (
        "expected_lost_seconds",
        "Work a failure at a random moment loses on average, by the checkpoint interval.",
    ),
    "health_score": ("health_score", "Health score, 0 to 100 (docs/telemetry.md)."),
    "goodput": ("goodput_ratio", "Useful steps / steps computed, over all attempts."),
    "steps_computed": ("steps_computed", "Steps computed over all attempts, recomputed included."),
    "cost": ("cost", "Cost so far at telemetry.price_per_device_hour."),
    "host_rss_mb": ("host_resident_megabytes", "Resident memory of rank 0's process."),
}


class PrometheusSink:
    """Gauges and counters fed by logged records, served on ``host:port`` (port 0: any free).

    ``seconds_since_step`` is called at each scrape, so the stall shows between logged steps.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        run: Mapping[str, str],
        seconds_since_step: Callable[[], float],
        restarts: int,
        stalled: Callable[[], bool] = lambda: False,
        bind_retry_s: float = 0.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self._gauges = {
            field: Gauge(_PREFIX + name, doc, registry=self.registry)
            for field, (name, doc) in _GAUGES.items()
        }
        for gauge in self._gauges.values():
            gauge.set(float("nan"))  # not measured yet (a validation loss before evaluation)
        self._health = float("nan")
        # A stall scores 0 at once (docs/telemetry.md), though no record comes to say so.
        self._gauges["health_score"].set_function(lambda: 0.0 if stalled() else self._health)
        self._phase = Gauge(
            _PREFIX + "phase_seconds",
            "Mean seconds per step in each phase over the last logged interval (rank 0).",
            ["phase"],
            registry=self.registry,
        )
        self._own = Gauge(
            _PREFIX + "rank_own_seconds",
            "Seconds per step each rank spent computing and loading (the straggler measure).",
            ["rank", "host"],
            registry=self.registry,
        )
        self._straggler = Gauge(
            _PREFIX + "straggler",
            "1 for a rank named a straggler at the last check, else 0.",
            ["rank"],
            registry=self.registry,
        )
        self._restarts = Counter(
            _PREFIX + "restarts",
            "Times the run came back from a checkpoint.",
            registry=self.registry,
        )
        self._restarts.inc(restarts)
        self._skipped = Counter(
            _PREFIX + "skipped_steps",
            "Steps whose update the non-finite guard dropped, since this process started.",
            registry=self.registry,
        )
        self._device_seconds = Gauge(
            _PREFIX + "device_seconds",
            "Device time used over all attempts (world size × wall time).",
            registry=self.registry,
        )
        since = Gauge(
            _PREFIX + "seconds_since_last_step",
            "Seconds since this process last completed a step (live at each scrape).",
            registry=self.registry,
        )
        since.set_function(seconds_since_step)
        Info(_PREFIX + "run", "The run's identity.", registry=self.registry).info(dict(run))
        self._server, self._thread = _serve(port, host, self.registry, retry_s=bind_retry_s)
        self.address = (host, int(self._server.server_port))

    def write(self, record: dict[str, Any]) -> None:
        for field, gauge in self._gauges.items():
            value = record.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if field == "health_score":
                    self._health = float(value)
                else:
                    gauge.set(value)
        if isinstance(record.get("device_hours"), (int, float)):
            self._device_seconds.set(record["device_hours"] * 3600)
        for phase in PHASES:
            if f"{phase}_s" in record:
                self._phase.labels(phase=phase).set(record[f"{phase}_s"])
        if record.get("skipped_in_interval"):
            self._skipped.inc(record["skipped_in_interval"])
        hosts, own = record.get("rank_hosts"), record.get("rank_own_s")
        if hosts is not None and own is not None:
            named = set(record.get("stragglers", []))
            for rank, (host, seconds) in enumerate(zip(hosts, own, strict=True)):
                self._own.labels(rank=str(rank), host=str(host)).set(seconds)
                self._straggler.labels(rank=str(rank)).set(int(rank in named))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _serve(port: int, host: str, registry: CollectorRegistry, *, retry_s: float) -> Any:
    """Start the client's HTTP server; retry a busy port for ``retry_s`` (a restarted rank 0
    may find the port still held by its predecessor's exiting processes)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
