"""Aggregate per-step timings into logged metrics; print progress and the final summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from steadytrain.telemetry.resources import host_rss_bytes
from steadytrain.telemetry.timers import PHASES


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line."""

    num_steps: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, step_seconds: float, phases: dict[str, float]) -> None:
        self.num_steps += 1
        self.seconds += step_seconds
        for name, seconds in phases.items():
            self.phase_seconds[name] += seconds


def interval_record(
    stats: IntervalStats, *, samples_per_step: int, tokens_per_sample: int
) -> dict[str, Any]:
    """Per-step averages of an interval: step time, throughput and each phase's seconds."""
    steps = max(1, stats.num_steps)
    step_time = stats.seconds / steps
    samples_per_second = samples_per_step / step_time if step_time > 0 else 0.0
    record: dict[str, Any] = {
        "step_time_s": step_time,
        "samples_per_second": samples_per_second,
        "tokens_per_second": samples_per_second * tokens_per_sample,
    }
    for name in PHASES:
        record[f"{name}_s"] = stats.phase_seconds[name] / steps
    # Communication cost: the share of step time with a gradient all-reduce in flight.
    record["grad_sync_share"] = record["grad_sync_s"] / step_time if step_time > 0 else 0.0
    record["host_rss_mb"] = host_rss_bytes() / 2**20
    return record


class ConsoleProgress:
    """One line per logged step and a summary table at the end (rank 0 only)."""

    def __init__(self, *, enabled: bool, max_steps: int) -> None:
        self._console = Console(highlight=False, soft_wrap=True) if enabled else None
        self._max_steps = max_steps

    def say(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message)

    def step(self, record: dict[str, Any]) -> None:
        if self._console is None:
            return
        width = len(str(self._max_steps))
        self._console.print(
            f"step {record['step']:>{width}}/{self._max_steps}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['step_time_s'] * 1000:6.1f} ms/step  "
            f"{record['tokens_per_second']:>9,.0f} tok/s  "
            f"sync {record['grad_sync_share'] * 100:4.1f}%"
        )

    def summary(self, summary: dict[str, Any]) -> None:
        if self._console is None:
            return
        table = Table(title="steadytrain run summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in summary.items():
            table.add_row(key, value if isinstance(value, str) else f"{value}")
        self._console.print(table)
