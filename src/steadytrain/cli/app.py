"""The ``steadytrain`` command: parse, validate, call the library. No logic of its own."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from steadytrain.cli.plan import plan_app
from steadytrain.config import (
    EXIT_AUDIT_FAILED,
    EXIT_CHAOS_DIFFERS,
    EXIT_CHECKPOINT_BAD,
    EXIT_INTERNAL,
    Config,
    ConfigError,
    UserError,
    check_allowed_changes,
    load_config,
)

if TYPE_CHECKING:  # the CLI imports torch only once a command needs it
    from steadytrain.checkpoint import CheckpointStatus

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed PyTorch training that survives failures and proves it.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
app.add_typer(data_app, name="data")
checkpoints_app = typer.Typer(no_args_is_help=True, help="Inspect a run's checkpoints.")
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(plan_app, name="plan")
RunDirArg = Annotated[Path, typer.Argument(help="A run directory (its --run-dir).")]

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. examples/tiny.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: --set train.lr=3e-4 (value parsed as YAML)."),
]
ServeSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a serve key: --set serve.max_batch_size=16 (value parsed as YAML).",
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option("--nproc", min=1, help="Start N local worker processes with torchrun's agent."),
]


def _load(config_path: Path, overrides: list[str] | None, run_dir: Path | None) -> Config:
    settings = list(overrides or [])
    if run_dir is not None:
        settings.append(f"run_dir={json.dumps(str(run_dir))}")  # quoted: '2024' is a name
    return load_config(config_path, overrides=settings)


AllowChangeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-change",
        help="Resume although this identity field differs from the checkpoint's, e.g. "
        "--allow-change train.max_steps to train a run for longer (repeatable).",
    ),
]


@app.command()
def train(
    config_path: ConfigArg,
    nproc: NprocOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run directory (overrides run_dir).")
    ] = None,
    overrides: SetOpt = None,
    resume_from: Annotated[
        str | None,
        typer.Option("--resume-from", help="Resume from this checkpoint (path or URL)."),
    ] = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start fresh even if checkpoints exist.")
    ] = False,
    allow_changes: AllowChangeOpt = None,
    max_restarts: Annotated[
        int,
        typer.Option(
            "--max-restarts",
            min=0,
            help="With --nproc: restart the worker group up to R times after a rank fails; "
            "each restart resumes from the newest good checkpoint.",
        ),
    ] = 0,
) -> None:
    """Train: as a torchrun worker, alone, or as the launcher of --nproc local workers.

    With checkpoints in the run directory, the same command resumes from the newest good one.
    Exit code 75 means preempted: a checkpoint was saved; run the same command again.
    """
    if resume_from is not None and no_resume:
        raise ConfigError("--resume-from and --no-resume contradict each other; pick one")
    if allow_changes and no_resume:
        raise ConfigError(
            "--allow-change applies to a resume, and --no-resume starts fresh; drop one of them"
        )
    config = _load(config_path, overrides, run_dir)  # before importing torch: fast errors
    allowed = check_allowed_changes(config, allow_changes or [])
    if nproc is not None:
        _start_worker_forkserver()  # stopped below on every way out
    from steadytrain.checkpoint import ResumeRequest
    from steadytrain.distributed import (
        launch_local_workers,
        name_worker_process,
        stop_worker_forkserver,
        under_torchrun,
    )
    from steadytrain.train import preflight, run_training

    if nproc is not None and not under_torchrun():
        try:
            for line in preflight(config, world_size=nproc, prepare_corpus=True):
                typer.echo(f"steadytrain: {line}")
            worker_args = ["train", str(config_path), *_passthrough(overrides, run_dir)]
            if resume_from is not None:
                worker_args += ["--resume-from", resume_from]
            if no_resume:
                worker_args.append("--no-resume")
            for field in allowed:
                worker_args += ["--allow-change", field]
            code = launch_local_workers(
                nproc=nproc,
                entrypoint=run_local_worker,
                worker_args=worker_args,
                preload=WORKER_PRELOAD,
                max_restarts=max_restarts,
                shutdown_timeout_s=config.fault.preempt_grace_s + 15,
            )
        finally:
            stop_worker_forkserver()
        global _launched_workers
        _launched_workers = True
        raise typer.Exit(code)
    stop_worker_forkserver()  # inside torchrun, which starts the workers itself
    if nproc is not None:
        typer.echo(
            "steadytrain: --nproc is ignored inside torchrun (it sets the world size)", err=True
        )
    if max_restarts and nproc is None:
        typer.echo(
            "steadytrain: --max-restarts needs --nproc (under torchrun, give torchrun "
            "--max-restarts)",
            err=True,
        )
    if under_torchrun():
        name_worker_process()
    request = ResumeRequest(enabled=not no_resume, from_path=resume_from, allow_changes=allowed)
    code = _exit_code_of(lambda: sys.exit(run_training(config, resume=request).exit_code))
    _end_worker(code)


def _end_worker(code: int) -> NoReturn:
    """End a training process with ``code``.

    A worker of a multi-rank group ends without interpreter finalization (see
    ``exit_process``: gloo threads outlive the group and can abort a finished run); a
    worker that ``--nproc`` forked leaves that to ``run_local_worker``.
    """
    from steadytrain.distributed import exit_process, in_local_worker, joined_group_of_many

    if joined_group_of_many() and not in_local_worker():
        exit_process(code)
    raise typer.Exit(code)


# What every training worker imports before its first step, imported once by the forkserver
# that --nproc forks its workers from. torch._inductor.config is what
# torch.use_deterministic_algorithms imports (with torch._dynamo and sympy: ~2 s of a
# worker's start on CPU).
WORKER_PRELOAD = ("steadytrain.cli.app", "steadytrain.train", "torch._inductor.config")


def _start_worker_forkserver() -> None:
    """Start the process ``--nproc`` forks its workers from, before this one imports torch:
    its imports of ``WORKER_PRELOAD`` (seconds on a small machine) then run beside this
    process's own imports and preflight instead of after them."""
    import multiprocessing.forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    multiprocessing.forkserver.ensure_running()


def run_local_worker(launcher: int, args: list[str]) -> None:
    """A ``--nproc`` worker: ``steadytrain ARGS`` in a process forked by the launcher's agent."""
    from steadytrain.distributed import become_local_worker, end_local_worker

    become_local_worker(launcher)
    end_local_worker(_exit_code_of(lambda: app(args=args, prog_name="steadytrain")))


@app.command()
def validate(
    config_path: ConfigArg,
    nproc: NprocOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Check a config (and its overrides) for a world size without training."""
    config = _load(config_path, overrides, None)
    from steadytrain.distributed import world_size_from_env
    from steadytrain.train import preflight

    world_size = nproc or world_size_from_env()
    for line in preflight(config, world_size=world_size, prepare_corpus=False):
        typer.echo(line)
    typer.echo(f"config {config_path} is valid for {world_size} rank(s)")


@app.command()
def chaos(
    config_path: ConfigArg,
    kills: Annotated[int, typer.Option("--kills", min=1, help="How many faults to inject.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seeds when, what and whom.")] = 0,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Worker processes.")] = 2,
    faults: Annotated[
        str, typer.Option("--faults", help="Fault kinds to draw from: kill,term,stop,nan.")
    ] = "kill,term,stop,nan",
    run_dir: Annotated[
        Path, typer.Option("--run-dir", help="Where the reference and faulty runs go.")
    ] = Path("runs/chaos"),
    overrides: SetOpt = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", min=0, help="Agent restarts per launch.")
    ] = 1,
) -> None:
    """Inject seeded faults into a job and prove it ends bit-identical to an uninterrupted run.

    Exits 0 when the final weights match and the audit is clean, 6 otherwise.
    """
    _load(config_path, overrides, None)  # fail fast on a bad config
    from rich.console import Console
    from rich.table import Table

    from steadytrain.fault import run_chaos

    kinds = [kind.strip() for kind in faults.split(",") if kind.strip()]
    report = run_chaos(
        config_path,
        num_faults=kills,
        seed=seed,
        nproc=nproc,
        kinds=kinds,
        work_dir=run_dir,
        overrides=list(overrides or []),
        max_restarts=max_restarts,
    )
    console = Console(highlight=False)
    for fault in report.faults:
        console.print(f"fault {fault.describe()}", markup=False)
    table = Table(title=f"steadytrain chaos (seed {seed})")
    table.add_column("")
    table.add_column("")
    for name, value in report.rows():
        table.add_row(name, value)
    console.print(table)
    for problem in report.problems:
        console.print(f"PROBLEM: {problem}", markup=False)
    if not report.audit_ok:
        console.print(report.audit_output, markup=False)
    if not report.ok:
        typer.echo(f"chaos FAILED: see {run_dir}/chaos-logs and {run_dir}/chaos/events.jsonl")
        raise typer.Exit(EXIT_CHAOS_DIFFERS)
    typer.echo("chaos OK: the faulty run ended bit-identical to the uninterrupted one")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run directory trained with data.ledger.")],
) -> None:
    """Prove from the ledger that each sample of each epoch was consumed exactly once."""
    from steadytrain.data import audit_ledger

    report = audit_ledger(run_dir)
    for epoch in report.epochs:
        status = "complete" if epoch.complete else "partial"
        tail = f", tail of {len(epoch.tail)} not consumed by design" if epoch.complete else ""
        typer.echo(f"epoch {epoch.epoch} ({status}): {epoch.num_consumed:,} samples consumed{tail}")
        if epoch.skipped_by_guard:
            shown = ", ".join(map(str, epoch.skipped_by_guard[:20]))
            more = " …" if len(epoch.skipped_by_guard) > 20 else ""
            typer.echo(
                f"  {len(epoch.skipped_by_guard)} samples skipped by the non-finite guard: "
                f"{shown}{more}"
            )
    for source in report.sources:
        typer.echo(
            f"source {source.name} (weight {source.weight:g}): {source.num_consumed:,} samples "
            f"consumed, {source.passes:.2f} passes over its {source.num_samples:,}"
        )
    if report.skipped_steps:
        typer.echo(
            f"steps skipped by the non-finite guard (update dropped, data passed over): "
            f"{', '.join(map(str, report.skipped_steps))}"
        )
    for problem in report.problems:
        typer.echo(f"PROBLEM: {problem}")
    summary = (
        f"{report.num_steps} recorded steps over {report.num_attempts} attempt(s), "
        f"{report.num_samples:,} samples, global batch {report.global_batch_size}"
    )
    if not report.ok:
        typer.echo(f"audit FAILED: {len(report.problems)} problem(s); {summary}")
        raise typer.Exit(EXIT_AUDIT_FAILED)
    once = "consumed exactly once"
    if report.sources:
        once = "consumed as often as the mixture's order says (each source's stream once)"
    if report.skipped_steps:
        once += f" or skipped by the guard ({len(report.skipped_steps)} step(s))"
    typer.echo(f"audit OK: every sample {once}; {summary}")


@app.command()
def status(
    run_dir: RunDirArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where a run stands: progress and ETA, health, the three headline signals, the last
    checkpoint, restarts, stragglers and recent events (while it runs, and after)."""
    from steadytrain.telemetry import run_status

    report = run_status(run_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for line in _status_screen(report):
        typer.echo(line)


@app.command()
def report(run_dir: RunDirArg) -> None:
    """Write RUN_DIR/report/: PNG plots and index.html, a page that needs no network (loss,
    throughput, phases, health, per-rank times, with checkpoints, restarts, preemptions,
    hangs and skipped steps marked)."""
    from steadytrain.telemetry import write_report

    written = write_report(run_dir)
    typer.echo(f"report: {written.page} ({len(written.images)} plots in {written.directory})")


@app.command()
def serve(
    run_dir: RunDirArg,
    checkpoint: Annotated[
        int | None,
        typer.Option(
            "--checkpoint",
            min=0,
            help="Serve this committed checkpoint's weights (verified) instead of the final ones.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback is a choice.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = 8000,
    overrides: ServeSetOpt = None,
) -> None:
    """Serve a trained run over HTTP (POST /v1/generate, /v1/forward; GET /healthz, /readyz,
    /metrics) with dynamic batching, until SIGTERM, which drains requests in flight.

    Exit code 4: the weights are missing or corrupted. --set takes serve.* settings only.
    """
    from steadytrain.serve import serve as run_server

    run_server(run_dir, checkpoint_step=checkpoint, host=host, port=port, overrides=overrides or [])


def _status_screen(report: dict[str, Any]) -> list[str]:
    from steadytrain.telemetry import format_duration

    progress, health, signals = report["progress"], report["health"], report["signals"]
    total = progress["max_steps"]
    done = f" ({progress['fraction']:.0%})" if progress["fraction"] is not None else ""
    eta = f", ETA {format_duration(progress['eta_s'])}" if progress["eta_s"] is not None else ""
    loss = f", loss {progress['loss']:.4f}" if progress["loss"] is not None else ""
    val = f", val loss {progress['val_loss']:.4f}" if progress["val_loss"] is not None else ""
    reasons = "; ".join(health["reasons"]) or "nothing to report"
    score = health["score"] if health["score"] is not None else "-"
    lines = [
        f"run         {report['run_dir']}: {report['state']}",
        f"progress    step {progress['step']}/{total}{done}{eta}{loss}{val}",
        f"health      {score}/100: {reasons}",
    ]
    if signals["steps_per_second"] is not None:
        lines.append(
            f"throughput  {signals['steps_per_second']:.2f} steps/s, "
            f"{signals['samples_per_second']:,.0f} samples/s, "
            f"{signals['tokens_per_second']:,.0f} tokens/s"
        )
        lines.append(f"comm        grad sync {signals['grad_sync_share']:.0%} of step time")
    checkpoint = report["checkpoint"]
    at_risk = signals["steps_at_risk"]
    risk = f"; {at_risk} step(s) at risk" if at_risk is not None else ""
    if signals["expected_lost_s"] is not None:
        lost = format_duration(signals["expected_lost_s"])
        risk += f"; a failure loses {lost} of work on average"
    if checkpoint is None:
        lines.append(f"recovery    no checkpoint yet{risk}")
    else:
        lines.append(
            f"recovery    checkpoint at step {checkpoint['step']}, "
            f"{format_duration(checkpoint['seconds_ago'])} ago{risk}"
        )
    usage = report["usage"]
    if usage["goodput"] is not None:
        cost = f", cost {usage['cost']:,.2f}" if usage["cost"] is not None else ""
        lines.append(
            f"goodput     {usage['goodput']:.0%} ({usage['useful_steps']} useful of "
            f"{usage['steps_computed']} steps computed), {usage['device_hours']:.3f} "
            f"device-hours{cost}"
        )
    cache = report.get("data_cache")
    if cache:
        lines.append(
            f"data cache  {cache['hits']} hits, {cache['misses']} downloads "
            f"({cache['bytes_fetched'] / 2**20:,.1f} MiB), {cache['evictions']} evictions, "
            f"{cache['corrupt']} corrupt; {cache['bytes'] / 2**20:,.1f} MiB cached"
        )
    recoveries = ", ".join(
        f"{r['total_s']:.1f} s" + (" warm" if r["warm_start"] else "")
        for r in report["recoveries"]
        if r["total_s"] is not None
    )
    lines.append(
        f"restarts    {report['restarts']}" + (f" (recoveries: {recoveries})" if recoveries else "")
    )
    stragglers = report["stragglers"]
    now = ", ".join(f"rank {rank}" for rank in stragglers["now"]) or "none"
    named = "; ".join(
        f"rank {s['rank']} on {s['host']} at step {s['step']} ({s['phase']}, {s['ratio']:.1f}×)"
        for s in stragglers["named"][-3:]
    )
    lines.append(f"stragglers  {now}" + (f" (named: {named})" if named else ""))
    lines.append("recent events")
    for event in report["recent_events"]:
        step = f"step {event['step']}" if event["step"] is not None else ""
        ago = format_duration(event["seconds_ago"])
        lines.append(f"  {ago:>8} ago  {step:<11} {event['event']}")
    return lines


@data_app.command("prepare")
def data_prepare(
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Directory to create, or an object store URL (s3://b/prefix)."
        ),
    ],
    corpus: Annotated[
        str, typer.Option("--corpus", help="'stdlib', a folder, or a glob of text files.")
    ] = "stdlib",
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Share of files held out.")
    ] = 0.02,
    max_bytes: Annotated[
        int | None, typer.Option(min=1, help="Read at most this many bytes of text.")
    ] = None,
    shard_tokens: Annotated[int, typer.Option(min=1024, help="Tokens per shard file.")] = 16
    * 2**20,
) -> None:
    """Tokenize text files (byte-level) into memory-mapped shards with a validation split."""
    from steadytrain.data import prepare_corpus

    index = prepare_corpus(
        corpus, output, val_fraction=val_fraction, max_bytes=max_bytes, shard_tokens=shard_tokens
    )
    typer.echo(
        f"prepared {output}: {index.num_tokens('train'):,} train tokens in "
        f"{len(index.splits['train'])} shard(s), {index.num_tokens('val'):,} validation tokens"
    )


@checkpoints_app.command("list")
def checkpoints_list(run_dir: RunDirArg) -> None:
    """List checkpoints with step, time, size and world size (manifests only, fast)."""
    from steadytrain.checkpoint import inspect_checkpoints

    statuses = inspect_checkpoints(run_dir, verify=False)
    if not statuses:
        typer.echo(f"no checkpoints in {run_dir}")
        return
    for status in statuses:
        typer.echo(_status_line(status))


@checkpoints_app.command("verify")
def checkpoints_verify(run_dir: RunDirArg) -> None:
    """Recompute every checksum and check compatibility with the run's config.yaml."""
    from steadytrain.checkpoint import inspect_checkpoints

    statuses = inspect_checkpoints(run_dir, verify=True)
    for status in statuses:
        typer.echo(_status_line(status))
        for problem in status.problems:
            typer.echo(f"    PROBLEM: {problem}")
    good = [status for status in statuses if status.good]
    resume_line = f"resume would use {good[-1].location}" if good else "resume would start fresh"
    bad = len(statuses) - len(good)
    if bad:
        typer.echo(f"verify FAILED: {bad} of {len(statuses)} checkpoint(s) bad; {resume_line}")
        raise typer.Exit(EXIT_CHECKPOINT_BAD)
    typer.echo(f"verify OK: {len(statuses)} checkpoint(s) intact and compatible; {resume_line}")


def _status_line(status: CheckpointStatus) -> str:
    import datetime

    if status.manifest is None:
        return f"{status.name}  INCOMPLETE  {'; '.join(status.problems)}"
    saved = datetime.datetime.fromtimestamp(status.manifest.time).isoformat(timespec="seconds")
    verdict = "good" if status.good else "BAD"
    return (
        f"{status.name}  step {status.step}  {saved}  {status.total_bytes / 2**20:.1f} MiB  "
        f"world size {status.manifest.world_size}  {verdict}  {status.location}"
    )


def _passthrough(overrides: list[str] | None, run_dir: Path | None) -> list[str]:
    args = [arg for override in overrides or [] for arg in ("--set", override)]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    return args


_launched_workers = False  # this process ran `train --nproc`'s launcher (its workers are gone)


def main() -> None:
    """Entry point: user errors become one line on stderr and their exit code."""
    code = _exit_code_of(app)  # typer reports usage errors with exit code 2
    if _launched_workers:
        # Nothing is left to tear down: the workers and their forkserver are reaped, every
        # file is written. Finalizing an interpreter that imported torch takes ~0.5 s.
        from steadytrain.distributed import exit_process

        exit_process(code)
    sys.exit(code)


def _exit_code_of(run: Callable[[], object]) -> int:
    """Run ``run``; return the exit code (tracebacks printed as Python prints them)."""
    try:
        run()
    except SystemExit as exiting:
        return _exit_code(exiting.code)
    except UserError as error:
        if not error.reported_elsewhere:
            print(f"steadytrain: error{_rank_label()}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception:  # a bug, or user code failing: the traceback is the report
        traceback.print_exc()
        return EXIT_INTERNAL
    return 0


def _exit_code(code: object) -> int:
    """``SystemExit.code`` as a process exit status (None: 0; a message: printed, 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return EXIT_INTERNAL


def _rank_label() -> str:
    rank = os.environ.get("RANK", "0")
    return f" [rank {rank}]" if rank != "0" else ""
