"""Aggregate per-step timings into logged metrics; print progress and the final summary."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from steadytrain.telemetry.resources import host_rss_bytes
from steadytrain.telemetry.timers import PHASES


def _no_phases() -> dict[str, float]:
    return dict.fromkeys(PHASES, 0.0)


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line.

    On CUDA most steps time their phases on the host (kernel launches, not the device's
    work); every ``sync_every``-th step is *synced* and exact. The two kinds are summed apart,
    so they are never averaged together.
    """

    num_steps: int = 0
    num_committed: int = 0  # steps whose update was applied (the others were skipped)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=_no_phases)  # unsynced steps
    num_unsynced: int = 0
    synced_phase_seconds: dict[str, float] = field(default_factory=_no_phases)
    num_synced: int = 0

    def add(
        self,
        step_seconds: float,
        phases: dict[str, float],
        *,
        committed: bool = True,
        synced: bool = False,
    ) -> None:
        self.num_steps += 1
        self.num_committed += int(committed)
        self.seconds += step_seconds
        sums = self.synced_phase_seconds if synced else self.phase_seconds
        if synced:
            self.num_synced += 1
        else:
            self.num_unsynced += 1
        for name, seconds in phases.items():
            sums[name] = sums.get(name, 0.0) + seconds


def interval_record(
    stats: IntervalStats, *, samples_per_step: int, tokens_per_sample: int
) -> dict[str, Any]:
    """Per-step averages of an interval: step time, throughput and each phase's seconds.

    ``<phase>_s`` are means over the interval's unsynced steps (over its synced ones when it
    has no other); ``synced_<phase>_s`` are means over its synced steps, present when it had
    any (CUDA only), with ``synced_steps`` their count.
    """
    steps = max(1, stats.num_steps)
    step_time = stats.seconds / steps
    samples_per_second = samples_per_step / step_time if step_time > 0 else 0.0
    record: dict[str, Any] = {
        "step_time_s": step_time,
        "samples_per_second": samples_per_second,
        "tokens_per_second": samples_per_second * tokens_per_sample,
    }
    host = stats.phase_seconds if stats.num_unsynced else stats.synced_phase_seconds
    host_steps = max(1, stats.num_unsynced or stats.num_synced)
    for name in PHASES:
        record[f"{name}_s"] = host[name] / host_steps
    if stats.num_synced:
        record["synced_steps"] = stats.num_synced
        for name in PHASES:
            record[f"synced_{name}_s"] = stats.synced_phase_seconds[name] / stats.num_synced
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

    def close(self) -> None: ...


class NullProgress:
    """Progress that shows nothing: ranks other than 0, or ``log.console: false``."""

    def say(self, message: str) -> None:
        pass

    def step(self, record: Mapping[str, Any]) -> None:
        pass

    def summary(self, summary: Mapping[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleProgress:
    """A progress bar in a terminal, one line per logged step elsewhere; a summary at the end.

    In a terminal (and not under CI: ``CI`` set in the environment), a rich progress bar on one
    line shows the step, the ETA, loss, tokens/s and health, and other messages print above
    it. Otherwise each logged step prints one plain line, which logs and CI keep readably.
    Everything is printed as plain ``Text``: paths and error messages may hold ``[...]``, which
    rich would otherwise read as markup and drop.

    Args:
        max_steps: the run's last step, shown as ``step N/max_steps``.
        console: where to print; stdout when ``None`` (tests pass one that writes to a buffer).
    """

    def __init__(self, *, max_steps: int, console: Console | None = None) -> None:
        self._console = console if console is not None else Console(highlight=False)
        self._max_steps = max_steps
        self._bar_wanted = self._console.is_terminal and not os.environ.get("CI")
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def say(self, message: str) -> None:
        self._console.print(Text(message), soft_wrap=True)  # above the bar, while one shows

    def step(self, record: Mapping[str, Any]) -> None:
        if self._bar_wanted:
            self._advance_bar(record)
            return
        width = len(str(self._max_steps))
        health = record.get("health_score")
        line = (
            f"step {record['step']:>{width}}/{self._max_steps}  loss {_loss_text(record['loss'])}  "
            f"lr {record['lr']:.2e}  {record['step_time_s'] * 1000:6.1f} ms/step  "
            f"{record['tokens_per_second']:>9,.0f} tok/s  "
            f"sync {record['grad_sync_share'] * 100:4.1f}%"
            + (f"  health {health}" if health is not None else "")
        )
        self._console.print(Text(line), soft_wrap=True)

    def _advance_bar(self, record: Mapping[str, Any]) -> None:
        fields = {
            "loss": _loss_text(record["loss"]),
            "tokens": f"{record['tokens_per_second']:,.0f}",
            "health": record.get("health_score", "-"),
        }
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tokens]} tok/s"),
                TextColumn("health {task.fields[health]}"),
                console=self._console,
                auto_refresh=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self._max_steps, **fields)
        assert self._task is not None
        self._bar.update(self._task, completed=int(record["step"]), **fields)
        self._bar.refresh()

    def close(self) -> None:
        """Take the bar off the screen's live area (it stays printed); safe to call twice."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, summary: Mapping[str, object]) -> None:
        """Print the table; a value too long for its row is printed whole on a line below it.

        Users copy the run dir, weights and checkpoint paths out of the summary, so no value is
        ever cut with an ellipsis or folded across lines.
        """
        self.close()
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
