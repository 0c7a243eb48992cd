"""Aggregate per-step timings into logged metrics; print progress and the final summary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from steadytrain.telemetry.resources import host_rss_bytes
from steadytrain.telemetry.timers import PHASES


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line."""

    num_steps: int = 0
    num_committed: int = 0  # steps whose update was applied (the others were skipped)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, step_seconds: float, phases: dict[str, float], *, committed: bool = True) -> None:
        self.num_steps += 1
        self.num_committed += int(committed)
        self.seconds += step_seconds
        for name, seconds in phases.items():
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds


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


_SUMMARY_TITLE = "steadytrain run summary"


class Progress(Protocol):
    """Where the run reports to a person: a line now and then, each logged step, the summary."""

    def say(self, message: str) -> None: ...

    def step(self, record: Mapping[str, Any]) -> None: ...

    def summary(self, summary: Mapping[str, object]) -> None: ...


class NullProgress:
    """Progress that shows nothing: ranks other than 0, or ``log.console: false``."""

    def say(self, message: str) -> None:
        pass

    def step(self, record: Mapping[str, Any]) -> None:
        pass

    def summary(self, summary: Mapping[str, object]) -> None:
        pass


class ConsoleProgress:
    """One line per logged step and a summary table at the end, on a rich console.

    Everything is printed as plain ``Text``: paths and error messages may hold ``[...]``, which
    rich would otherwise read as markup and drop.

    Args:
        max_steps: the run's last step, shown as ``step N/max_steps``.
        console: where to print; stdout when ``None`` (tests pass one that writes to a buffer).
    """

    def __init__(self, *, max_steps: int, console: Console | None = None) -> None:
        self._console = console if console is not None else Console(highlight=False)
        self._max_steps = max_steps

    def say(self, message: str) -> None:
        self._console.print(Text(message), soft_wrap=True)

    def step(self, record: Mapping[str, Any]) -> None:
        width = len(str(self._max_steps))
        line = (
            f"step {record['step']:>{width}}/{self._max_steps}  loss {_loss_text(record['loss'])}  "
            f"lr {record['lr']:.2e}  {record['step_time_s'] * 1000:6.1f} ms/step  "
            f"{record['tokens_per_second']:>9,.0f} tok/s  "
            f"sync {record['grad_sync_share'] * 100:4.1f}%"
        )
        self._console.print(Text(line), soft_wrap=True)

    def summary(self, summary: Mapping[str, object]) -> None:
        """Print the table; a value too long for its row is printed whole on a line below it.

        Users copy the run dir, weights and checkpoint paths out of the summary, so no value is
        ever cut with an ellipsis or folded across lines.
        """
        rows = [(key, str(value)) for key, value in summary.items()]
        # The width of the table without its values: key column, borders and padding.
        frame_width = self._console.measure(_summary_table([(key, "") for key, _ in rows])).maximum
        room = self._console.width - frame_width
        fits = [(key, value) for key, value in rows if cell_len(value) <= room]
        too_long = [(key, value) for key, value in rows if cell_len(value) > room]
        if fits:
            self._console.print(_summary_table(fits))
        else:  # a terminal too narrow for any value: the title alone, not an empty frame
            self._console.print(Text(_SUMMARY_TITLE, style="italic"), soft_wrap=True)
        for key, value in too_long:
            # soft_wrap: the terminal wraps the line for display but copying gives it whole.
            self._console.print(Text.assemble((f"{key}:", "bold"), " ", value), soft_wrap=True)


def _summary_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(title=_SUMMARY_TITLE, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    # Values here fit by construction; fold rather than ellipsis is the safety net, so that
    # every character would still be printed.
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(Text(key), Text(value))
    return table


def _loss_text(loss: float | None) -> str:
    return "skipped" if loss is None else f"{loss:.4f}"
