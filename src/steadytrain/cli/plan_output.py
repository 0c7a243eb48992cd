"""What ``steadytrain plan`` prints and draws: the tables, the verdicts, the goodput plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from steadytrain.config import ConfigError

if TYPE_CHECKING:  # the planners import numpy only once a command needs them
    from steadytrain.plan import CheckpointPlan, IntervalGoodput, MemoryPlan


def echo_json(report: dict[str, Any]) -> None:
    """``report`` as strict JSON: a NaN or infinity is a bug, never output."""
    typer.echo(json.dumps(report, indent=2, allow_nan=False))


def print_memory_plan(plan: MemoryPlan) -> None:
    from rich.console import Console
    from rich.table import Table

    from steadytrain.plan import format_against, format_gb

    shape = plan.shape
    model = (
        f"the default GPT ({shape.num_layers} layers, width {shape.width}, {shape.num_heads} "
        f"heads, vocabulary {shape.vocab_size}), micro-batch {plan.micro_batch_size} × "
        f"{plan.seq_len} tokens"
        if shape is not None
        else "shape unknown (activations, autocast copies and FSDP's units not estimated)"
    )
    views = ", gradients as bucket views" if plan.gradient_as_bucket_view else ""
    typer.echo(
        f"model: {plan.num_params:,} parameters, {model}; world size {plan.world_size}, "
        f"{plan.precision}, {format_gb(plan.gpu_memory_bytes)} per GPU; DDP comm hook "
        f"{plan.comm_hook}{views}"
    )
    table = Table(title="per-rank memory, GB (10⁹ bytes)")
    table.add_column("")
    table.add_column("DDP", justify="right")
    table.add_column("FSDP", justify="right")
    budget = plan.gpu_memory_bytes
    for name, *values in plan.rows():
        # A total over the budget never reads as the budget: as many digits as that takes.
        cells = [
            "unknown" if v is None else format_against(v, budget).removesuffix(" GB")
            for v in values
        ]
        table.add_row(name, *cells)
    Console(highlight=False).print(table)
    typer.echo(plan.reason)


def print_checkpoint_plan(plan: CheckpointPlan, plot_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    inputs, console = plan.inputs, Console(highlight=False)
    sources = inputs.sources
    stall = (
        f"; an asynchronous save stalls {_duration(inputs.stall_s)} ({sources['stall_s']})"
        if inputs.stall_s is not None
        else "; asynchronous saves: give --stall-seconds to compare"
    )
    for line in (
        f"system MTBF {_duration(inputs.mtbf_s)} ({inputs.node_mtbf_hours:g} h per node / "
        f"{inputs.num_nodes} node(s))",
        f"save        {_duration(inputs.checkpoint_s)} to durable ({sources['checkpoint_s']})"
        f"{stall}",
        f"restart     {_duration(inputs.restart_s)} ({sources['restart_s']})",
    ):
        typer.echo(line)
    optima = Table(title="optimal checkpoint interval")
    for column in ("", "young", "daly", "optimal", "goodput", "simulated optimum"):
        optima.add_column(column, justify="right")
    for name, mode in (("sync", plan.sync), ("async", plan.asynchronous)):
        if mode is not None:
            optima.add_row(
                name,
                _duration(mode.young_interval_s),
                _duration(mode.daly_interval_s),
                _duration(mode.optimal_interval_s),
                f"{mode.goodput:.2%}",
                f"{_duration(mode.simulated_optimal_interval_s)}, {mode.simulated_goodput:.2%}",
            )
    console.print(optima)
    sweep = Table(
        title=f"goodput against interval (simulated ± standard error: seed {plan.seed}, "
        f"{plan.num_failures:,} failures)"
    )
    for column in ("interval", "sync", "sync simulated", "async", "async simulated"):
        sweep.add_column(column, justify="right")
    for point in plan.sweep:
        cells = [_duration(point.interval_s)]
        for goodput in (point.sync, point.asynchronous):
            cells += (
                [f"{goodput.goodput:.2%}", f"{goodput.simulated:.2%} ± {_error(goodput)}"]
                if goodput is not None
                else ["-", "-"]
            )
        sweep.add_row(*cells)
    console.print(sweep)
    for line in checkpoint_verdict(plan, plot_path):
        typer.echo(line)


def checkpoint_verdict(plan: CheckpointPlan, plot_path: Path | None) -> list[str]:
    """The recommendation, the run's own interval at its own mode, and the plot's path."""
    inputs, chosen = plan.inputs, plan.chosen
    kind = "asynchronous" if inputs.asynchronous else "synchronous"
    steps = (
        f" (checkpoint.every_steps: {plan.optimal_every_steps})" if plan.optimal_every_steps else ""
    )
    lines = [
        f"recommended: {kind} saves every {_duration(chosen.optimal_interval_s)}{steps}, "
        f"goodput {chosen.goodput:.2%} (mode: {inputs.sources['mode']})"
    ]
    if inputs.current_interval_s is not None:
        run_kind = "asynchronous" if inputs.run_asynchronous else "synchronous"
        current = plan.current_goodput
        goodput = (
            f"goodput {current.goodput:.2%}"
            if current is not None
            else "goodput unknown (give --stall-seconds)"
        )
        lines.append(
            f"the run now: {run_kind} saves every {_duration(inputs.current_interval_s)} "
            f"(checkpoint.every_steps: {inputs.current_every_steps}, "
            f"{_duration(inputs.step_s or 0.0)} per step), {goodput}"
        )
    if plot_path is not None:
        lines.append(f"plot: {plot_path}")
    return lines


def write_checkpoint_plot(plan: CheckpointPlan, path: Path) -> None:
    """Goodput against interval (exact curves, simulated points), the optima marked.

    Raises:
        ConfigError: the plot cannot be written to ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    from steadytrain.plan import goodput_curve

    intervals, sync, asynchronous = goodput_curve(plan)
    figure, axes = plt.subplots(figsize=(9, 4.8), dpi=100)
    modes = [("sync", "#1f77b4", sync, plan.sync)]
    if asynchronous is not None and plan.asynchronous is not None:
        modes.append(("async", "#2ca02c", asynchronous, plan.asynchronous))
    for name, color, curve, mode in modes:
        axes.plot(intervals, [100 * g for g in curve], color=color, label=f"{name} (exact)")
        simulated = [
            (point.interval_s, goodput)
            for point in plan.sweep
            if (goodput := point.mode(asynchronous=name == "async")) is not None
        ]
        axes.errorbar(
            [interval for interval, _ in simulated],
            [100 * goodput.simulated for _, goodput in simulated],
            yerr=[100 * goodput.standard_error for _, goodput in simulated],
            fmt="o",
            color=color,
            markersize=4,
            label=f"{name} (simulated, seed {plan.seed})",
        )
        axes.axvline(mode.optimal_interval_s, color=color, linestyle="--", linewidth=1)
        axes.axvline(mode.simulated_optimal_interval_s, color=color, linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("checkpoint interval (s of compute between saves)")
    axes.set_ylabel("goodput (%)")
    axes.set_title(
        f"Goodput against checkpoint interval (MTBF {_duration(plan.inputs.mtbf_s)}; "
        "dashed: formula optimum, dotted: simulated)"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower center")
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        raise ConfigError(
            f"cannot write the plot to {path}: {error.strerror or error}; give --plot PATH "
            "or --no-plot"
        ) from None
    finally:
        plt.close(figure)


def _error(goodput: IntervalGoodput) -> str:
    """A simulated goodput's standard error, in percent to two significant digits."""
    return f"{100 * goodput.standard_error:.2g}%"


def _duration(seconds: float) -> str:
    from steadytrain.telemetry import format_duration

    return format_duration(seconds, digits=3)
