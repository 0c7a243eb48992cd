"""``steadytrain plan``: the memory and checkpoint-interval planners (calculations only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from steadytrain.cli.plan_output import (
    echo_json,
    print_checkpoint_plan,
    print_memory_plan,
    write_checkpoint_plot,
)
from steadytrain.config import ConfigError

if TYPE_CHECKING:  # the planners import numpy only once a command needs them
    from steadytrain.plan import RunFigures

plan_app = typer.Typer(
    no_args_is_help=True,
    help="Plan a run: per-rank memory (DDP or FSDP) and the checkpoint interval.",
)


@plan_app.command("memory")
def memory(
    params: Annotated[
        float | None,
        typer.Option("--params", help="Parameters of the model, e.g. 7e9 (or give --config)."),
    ] = None,
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Count the parameters of this config's model, built on the meta device; "
            "the default GPT's shape also gives activations.",
        ),
    ] = None,
    world_size: Annotated[
        int | None, typer.Option("--world-size", help="Ranks (GPUs) the run trains on.")
    ] = None,
    gpu_memory_gb: Annotated[
        float | None,
        typer.Option("--gpu-memory-gb", help="Memory of one GPU in GB (10⁹ bytes), e.g. 80."),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", help="Tokens per sample (default: the config's data.seq_len)."),
    ] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            "--micro-batch",
            help="Samples per rank per forward (default: the config's train.micro_batch_size).",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="fp32, or bf16 (autocast) (default: the config's train.precision, else fp32).",
        ),
    ] = None,
    headroom: Annotated[
        float | None,
        typer.Option(
            "--headroom", help="Share added for allocator fragmentation (default 0.1: 10%)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="With --config, override a key: --set model.kwargs.width=512."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Per-rank memory under DDP and FSDP (parameters, gradients, Adam state, buffers,
    activations; with --config its parallel settings too) and which to use
    (docs/planning.md)."""
    from steadytrain.config import load_config
    from steadytrain.plan import DEFAULT_HEADROOM, plan_memory

    if (params is None) == (config_path is None):
        raise ConfigError("give the model as --params N or as --config CONFIG.yaml (one of them)")
    if world_size is None or gpu_memory_gb is None:
        raise ConfigError(
            "give --world-size and --gpu-memory-gb, e.g. --world-size 8 --gpu-memory-gb 80"
        )
    room = DEFAULT_HEADROOM if headroom is None else headroom
    if config_path is not None:
        from steadytrain.train import memory_flag_overrides, plan_config_memory

        flags = memory_flag_overrides(seq_len=seq_len, micro_batch=micro_batch, precision=precision)
        config = load_config(config_path, overrides=[*(overrides or []), *flags])
        planned = plan_config_memory(
            config, world_size=world_size, gpu_memory_gb=gpu_memory_gb, headroom=room
        )
        for warning in planned.warnings:
            typer.echo(f"steadytrain: {warning}", err=True)
        plan = planned.plan
    else:
        if overrides:
            raise ConfigError("--set overrides a config: give --config CONFIG.yaml with it")
        if seq_len is not None or micro_batch is not None:
            typer.echo(
                "steadytrain: --seq-len and --micro-batch are not used with --params: "
                "activations need the model's shape (give --config)",
                err=True,
            )
        plan = plan_memory(
            _parameter_count(params),
            world_size=world_size,
            gpu_memory_gb=gpu_memory_gb,
            precision=precision or "fp32",
            headroom=room,
        )
    if as_json:
        echo_json(plan.to_dict())
        return
    print_memory_plan(plan)


def _parameter_count(params: float | None) -> int:
    if params is None or not 1 <= params < 1e18:
        raise ConfigError(f"--params: {params} is not a parameter count; give e.g. --params 7e9")
    return int(params)


CHECKPOINT_PLOT = "checkpoint-plan.png"


@plan_app.command("checkpoints")
def checkpoints(
    mtbf_hours: Annotated[
        float, typer.Option("--mtbf-hours", help="Mean time between failures of one node, hours.")
    ],
    nodes: Annotated[
        int, typer.Option("--nodes", help="Nodes the job spans; any one failing stops it.")
    ] = 1,
    checkpoint_seconds: Annotated[
        float | None,
        typer.Option(
            "--checkpoint-seconds",
            help="Seconds a save takes to be durable (a synchronous save blocks for all of it).",
        ),
    ] = None,
    stall_seconds: Annotated[
        float | None,
        typer.Option(
            "--stall-seconds", help="Seconds an asynchronous save blocks training (its snapshot)."
        ),
    ] = None,
    restart_seconds: Annotated[
        float | None,
        typer.Option(
            "--restart-seconds",
            help="Seconds from a failure to training again (default: the run's recovery "
            "events, else 120).",
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run", help="Take the save, write and restart costs a run measured."),
    ] = None,
    asynchronous: Annotated[
        bool | None,
        typer.Option(
            "--async/--sync",
            help="Recommend for this kind of save (default: the run's, else --sync).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the simulated failures.")] = 0,
    failures: Annotated[
        int | None,
        typer.Option("--failures", help="Failures simulated per interval (default 20000)."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help=f"The PNG to write (default: RUN_DIR/{CHECKPOINT_PLOT} with --run, else "
            f"./{CHECKPOINT_PLOT}).",
        ),
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no plot.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """The checkpoint interval that maximizes goodput (Young, Daly) and a seeded simulation
    of goodput against interval, for synchronous and asynchronous saves (docs/planning.md)."""
    from steadytrain.plan import DEFAULT_NUM_FAILURES, plan_checkpoints, plan_inputs

    inputs = plan_inputs(
        node_mtbf_hours=mtbf_hours,
        num_nodes=nodes,
        checkpoint_s=checkpoint_seconds,
        stall_s=stall_seconds,
        restart_s=restart_seconds,
        asynchronous=asynchronous,
        run=_measured(run_dir) if run_dir is not None else None,
    )
    plan = plan_checkpoints(
        inputs, num_failures=failures if failures is not None else DEFAULT_NUM_FAILURES, seed=seed
    )
    default_plot = run_dir / CHECKPOINT_PLOT if run_dir is not None else Path(CHECKPOINT_PLOT)
    plot_path = None if no_plot else plot or default_plot
    if plot_path is not None:
        write_checkpoint_plot(plan, plot_path)
    if as_json:
        echo_json({**plan.to_dict(), "plot": str(plot_path) if plot_path else None})
        return
    print_checkpoint_plan(plan, plot_path)


def _measured(run_dir: Path) -> RunFigures:
    """What the run in ``run_dir`` measured, as the planner's plain numbers."""
    from steadytrain.plan import RunFigures
    from steadytrain.telemetry import measure_run_costs

    costs = measure_run_costs(run_dir)
    return RunFigures(
        name=str(run_dir),
        asynchronous=costs.asynchronous,
        every_steps=costs.every_steps,
        step_s=costs.step_s,
        checkpoint_s=costs.checkpoint_s,
        stall_s=costs.stall_s,
        restart_s=costs.restart_s,
        sources={f: costs.source(f) for f in ("checkpoint_s", "stall_s", "restart_s", "mode")},
    )
