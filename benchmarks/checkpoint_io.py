"""Checkpoint I/O: steadytrain's save and restore against the disk itself and ``torch.save``.

Measured in one run, on one file system (a scratch directory under ``benchmarks/``), with a
``steadytrain.model.gpt.GPT`` and its AdamW moments after one optimizer step:

- the disk: a file of the checkpoint's size written with large buffered writes + fsync, then
  read back after ``posix_fadvise(DONTNEED)`` dropped it from the page cache;
- steadytrain's save through the real protocol (``snapshot_parts`` -> ``to_files`` ->
  ``save_checkpoint`` on ``LocalStorage``), synchronous (from the live tensors) and with an
  async save's host copy first, and its restore as a resume does it (header check, then
  ``read_parts`` with checksums + ``load_state_dict``), each against the disk's bandwidth;
  and ``checkpoints verify`` (every checksum);
- the peer: ``torch.save`` + fsync and ``torch.load(weights_only=True)`` of the same state;
- the training stall: ``steadytrain train`` (one process) saving every N steps with
  ``checkpoint.async_save`` true and false; ``checkpoint_s`` at the save steps is how long
  training was blocked.

Rounds are interleaved because the machine is shared and noisy; each ratio uses the
measurements of its own round, and the verdicts are medians of the per-round ratios. A round
starts once other processes leave the CPU idle (at most ``--max-wait`` seconds) and reports
the share they used meanwhile. Before each measured operation pending writes are flushed and
memory is touched (``Settle``; ``--no-settle`` skips it).

    .venv/bin/python benchmarks/checkpoint_io.py [--size-mb N] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint_io_measurements import (
    DISK_CHUNK_BYTES,
    GB,
    NUM_HEADS,
    WIDTH,
    ForeignCpu,
    Settle,
    build_state,
    measure_disk,
    num_layers_for,
    run_training,
    steadytrain_restore,
    steadytrain_save,
    torch_load,
    torch_save,
    wait_for_quiet,
)
from overhead import NOISY_FOREIGN_SHARE
from steadytrain.checkpoint import LocalStorage

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"
TARGET_SAVE_RATIO = 0.70  # steadytrain save GB/s / disk write GB/s, at least
TARGET_LOAD_RATIO = 0.70  # steadytrain load GB/s / disk read GB/s, at least
TARGET_STALL_RATIO = 0.10  # async blocking / sync blocking at a save step, at most


# ---------------------------------------------------------------------------------------------
# The training stall: steadytrain train with sync and async saves
# ---------------------------------------------------------------------------------------------


def stall_overrides(args: argparse.Namespace, *, scratch: Path) -> list[str]:
    """One process, the benchmark's model, a small corpus, a save every ``--save-every`` steps."""
    return [
        f"model.kwargs={{num_layers: {args.num_layers}, width: {WIDTH}, num_heads: {NUM_HEADS}}}",
        f"data.corpus={scratch / 'corpus'}",
        f"data.cache_dir={scratch / 'data-cache'}",
        "data.seq_len=32",
        "data.ledger=false",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "train.warmup_steps=2",
        f"train.max_steps={2 * args.save_every}",
        "train.eval_batches=0",
        f"checkpoint.every_steps={args.save_every}",
        "checkpoint.keep_last=1",
        "log.every_steps=1",
        "log.console=false",
        "deterministic=false",
    ]


def write_corpus(directory: Path) -> None:
    """A small text corpus (this package's own source), so preparing it takes a moment."""
    directory.mkdir(parents=True)
    for number, path in enumerate(sorted((REPO_ROOT / "src" / "steadytrain").rglob("*.py"))):
        shutil.copyfile(path, directory / f"{number:03d}_{path.name}")


# ---------------------------------------------------------------------------------------------
# Rounds, summary and report
# ---------------------------------------------------------------------------------------------


def io_round(
    args: argparse.Namespace, *, number: int, scratch: Path, state: dict[str, Any]
) -> dict[str, Any]:
    """Disk, steadytrain and torch.save/load once each; the order flips every other round."""
    model, optimizer, target = state["model"], state["optimizer"], state["target"]
    storage = LocalStorage(scratch / "checkpoints")
    # A save allocates the snapshot, the serialized bytes and the page cache: 4x is enough.
    settle = Settle(4 * state["checkpoint_bytes"], enabled=args.settle)
    measured: dict[str, Any] = {}
    order = (
        ("disk", "steadytrain", "torch") if number % 2 == 0 else ("torch", "steadytrain", "disk")
    )
    with ForeignCpu() as cpu:
        for side in order:
            if side == "disk":
                measured["disk"] = measure_disk(
                    scratch, num_bytes=state["checkpoint_bytes"], prepare=settle
                )
            elif side == "steadytrain":
                settle()
                save_copy = steadytrain_save(
                    model, optimizer, storage, step=100 + number, copy=True
                )
                storage.delete(Path(save_copy.pop("location")).name)
                measured["save_copy"] = save_copy
                settle()
                save = steadytrain_save(model, optimizer, storage, step=number + 1)
                location = Path(save.pop("location"))
                measured["save"] = save
                measured["restore"] = steadytrain_restore(
                    location, model=target, source=model, prepare=settle
                )
                storage.delete(location.name)
            else:
                path = scratch / "torch_state.pt"
                settle()
                measured["torch_save"] = torch_save(model, optimizer, path)
                measured["torch_load"] = torch_load(
                    path, model=target, source=model, prepare=settle
                )
                path.unlink()
    disk, save, restore = measured["disk"], measured["save"], measured["restore"]
    measured["ratios"] = {
        "save": save["gbps"] / disk["write_gbps"],
        "save_copy": measured["save_copy"]["gbps"] / disk["write_gbps"],
        "torch_save": measured["torch_save"]["gbps"] / disk["write_gbps"],
        "load": restore["load_gbps"] / disk["read_gbps"],
        "verify": restore["verify_gbps"] / disk["read_gbps"],
        "torch_load": measured["torch_load"]["gbps"] / disk["read_gbps"],
    }
    return {
        "order": list(order),
        "foreign_cpu_share": cpu.share,
        "memory_first_touch_gbps": [round(speed, 2) for speed in settle.first_touch_gbps],
        **measured,
    }


def stall_round(
    args: argparse.Namespace, *, number: int, scratch: Path, overrides: list[str]
) -> dict[str, Any]:
    """``steadytrain train`` with sync and with async saves, in alternating order."""
    order = ("sync", "async") if number % 2 == 0 else ("async", "sync")
    measured: dict[str, Any] = {}
    for variant in order:
        measured[variant] = run_training(
            config=args.config,
            save_every=args.save_every,
            overrides=overrides,
            run_dir=scratch / f"round{number + 1}-{variant}",
            async_save=variant == "async",
        )
        shutil.rmtree(scratch / f"round{number + 1}-{variant}", ignore_errors=True)
    sync, async_ = measured["sync"], measured["async"]
    measured["stall_ratio"] = async_["mean_blocked_s"] / sync["mean_blocked_s"]
    measured["between_saves_ratio"] = (
        async_["mean_step_between_saves_s"] / sync["mean_step_between_saves_s"]
    )
    measured["fit_ratio"] = async_["fit_seconds"] / sync["fit_seconds"]
    return {"order": list(order), **measured}


def measure(args: argparse.Namespace, *, scratch: Path) -> dict[str, Any]:
    """Build the state once, then interleave rounds of I/O and of training runs."""
    from steadytrain.config import load_config
    from steadytrain.data import ensure_corpus

    model, optimizer = build_state(args.num_layers)
    target, _ = build_state(args.num_layers)  # restores go here, never into ``model``
    probe = steadytrain_save(model, optimizer, LocalStorage(scratch / "probe"), step=0)
    shutil.rmtree(scratch / "probe")
    state = {
        "model": model,
        "optimizer": optimizer,
        "target": target,
        "checkpoint_bytes": probe["bytes"],
    }
    print(
        f"  state: GPT {args.num_layers} layers x width {WIDTH}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, checkpoint "
        f"{probe['bytes'] / 1e6:,.1f} MB",
        flush=True,
    )
    overrides = stall_overrides(args, scratch=scratch)
    if args.save_every:
        write_corpus(scratch / "corpus")
        # Prepare the corpus once, so no measured run pays for it.
        ensure_corpus(load_config(args.config, overrides=overrides).data)
    rounds = []
    for number in range(args.rounds):
        quiet = wait_for_quiet(args.max_wait)
        measured = {"round": number + 1, "machine_before": quiet}
        measured["io"] = io_round(args, number=number, scratch=scratch, state=state)
        if args.save_every:
            measured["stall"] = stall_round(
                args, number=number, scratch=scratch, overrides=overrides
            )
        rounds.append(measured)
        print_round(measured)
    return summarize(args, rounds, state=state)


def print_round(measured: dict[str, Any]) -> None:
    io, ratios = measured["io"], measured["io"]["ratios"]
    line = (
        f"  round {measured['round']}: disk W {io['disk']['write_gbps']:.2f} "
        f"R {io['disk']['read_gbps']:.2f} GB/s; save {io['save']['gbps']:.2f} GB/s "
        f"({ratios['save']:.2f}x), load {io['restore']['load_gbps']:.2f} GB/s "
        f"({ratios['load']:.2f}x)"
    )
    if "stall" in measured:
        stall = measured["stall"]
        line += (
            f"; blocked sync {stall['sync']['mean_blocked_s']:.3f} s, async "
            f"{stall['async']['mean_blocked_s']:.3f} s ({stall['stall_ratio']:.3f}x)"
        )
    print(line, flush=True)


def median_of(rounds: list[dict[str, Any]], *keys: str) -> float:
    """The median over rounds of ``round[keys[0]][keys[1]]...``."""
    values: list[float] = []
    for measured in rounds:
        value: Any = measured
        for key in keys:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def summarize(
    args: argparse.Namespace, rounds: list[dict[str, Any]], *, state: dict[str, Any]
) -> dict[str, Any]:
    """Settings, machine, every round, medians, the save/load profile and the verdicts."""
    medians: dict[str, Any] = {
        "disk_write_gbps": median_of(rounds, "io", "disk", "write_gbps"),
        "disk_read_gbps": median_of(rounds, "io", "disk", "read_gbps"),
        "save_gbps": median_of(rounds, "io", "save", "gbps"),
        "save_copy_gbps": median_of(rounds, "io", "save_copy", "gbps"),
        "torch_save_gbps": median_of(rounds, "io", "torch_save", "gbps"),
        "load_gbps": median_of(rounds, "io", "restore", "load_gbps"),
        "verify_gbps": median_of(rounds, "io", "restore", "verify_gbps"),
        "torch_load_gbps": median_of(rounds, "io", "torch_load", "gbps"),
        "ratios": {
            key: median_of(rounds, "io", "ratios", key) for key in rounds[0]["io"]["ratios"]
        },
        "save_profile_s": {
            key: median_of(rounds, "io", "save", key)
            for key in ("snapshot_s", "checksum_s", "write_fsync_commit_s", "seconds")
        },
        "save_copy_snapshot_s": median_of(rounds, "io", "save_copy", "snapshot_s"),
        "load_profile_s": {
            key: median_of(rounds, "io", "restore", key)
            for key in ("check_s", "read_s", "load_state_dict_s", "seconds", "verify_s")
        },
    }
    verdicts = {
        "save": medians["ratios"]["save"] >= TARGET_SAVE_RATIO,
        "load": medians["ratios"]["load"] >= TARGET_LOAD_RATIO,
    }
    if "stall" in rounds[0]:
        medians["stall"] = {
            key: median_of(rounds, "stall", *key.split("."))
            for key in (
                "sync.mean_blocked_s",
                "async.mean_blocked_s",
                "stall_ratio",
                "between_saves_ratio",
                "fit_ratio",
            )
        }
        verdicts["stall"] = medians["stall"]["stall_ratio"] <= TARGET_STALL_RATIO
    cached = [r["io"]["disk"]["cached_bytes_before_read"] for r in rounds]
    return {
        "benchmark": "checkpoint_io",
        "settings": {
            "size_mb": args.size_mb,
            "num_layers": args.num_layers,
            "width": WIDTH,
            "num_heads": NUM_HEADS,
            "num_parameters": sum(p.numel() for p in state["model"].parameters()),
            "checkpoint_bytes": state["checkpoint_bytes"],
            "rounds": args.rounds,
            "save_every_steps": args.save_every,
            "config": str(args.config),
            "disk_chunk_bytes": DISK_CHUNK_BYTES,
            "settle": args.settle,
            "steadytrain": args.provenance,
            "reads": reads_described(cached),
        },
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        },
        "rounds": rounds,
        "medians": medians,
        "targets": {
            "save_ratio_at_least": TARGET_SAVE_RATIO,
            "load_ratio_at_least": TARGET_LOAD_RATIO,
            "stall_ratio_at_most": TARGET_STALL_RATIO,
        },
        "within_target": verdicts,
    }


def reads_described(cached: list[int | None]) -> str:
    """From ``fincore``'s count after ``posix_fadvise(DONTNEED)``: 0 bytes means cold."""
    if any(count is None for count in cached):
        return "cache state unknown (no fincore)"
    if all(count == 0 for count in cached):
        return "cold"
    return f"partly cached ({cached} bytes resident before the reads)"


def source_provenance() -> dict[str, Any]:
    """Which steadytrain was measured: its path, and the repository's commit and edits."""
    import steadytrain

    package = Path(steadytrain.__file__).resolve().parent

    def git(*command: str) -> str:
        found = subprocess.run(
            ["git", *command], cwd=package, capture_output=True, text=True, check=False
        )
        return found.stdout.strip()

    return {
        "path": str(package),
        "commit": git("rev-parse", "HEAD") or None,
        "modified_files": git("status", "--porcelain", "--", ".").splitlines(),
    }


def share(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f}"


def print_report(summary: dict[str, Any]) -> None:
    """Three per-round tables (save, load, stall), the medians, the profile and verdicts."""
    settings, rounds, medians = summary["settings"], summary["rounds"], summary["medians"]
    print(
        f"\ncheckpoint {settings['checkpoint_bytes'] / 1e6:,.1f} MB (GPT {settings['num_layers']}"
        f"x{settings['width']}, {settings['num_parameters']:,} parameters + AdamW moments); "
        f"GB/s = 1e9 bytes/s; reads {settings['reads']}"
    )
    header = (
        f"{'round':>5}  {'disk write':>10}  {'st save':>7}  {'ratio':>5}  {'+ copy':>6}  "
        f"{'ratio':>5}  {'torch.save':>10}  {'ratio':>5}  {'others CPU %':>12}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rounds:
        io = r["io"]
        mark = "*" if (io["foreign_cpu_share"] or 0) > NOISY_FOREIGN_SHARE else " "
        print(
            f"{r['round']:>4}{mark}  {io['disk']['write_gbps']:>10.2f}  "
            f"{io['save']['gbps']:>7.2f}  {io['ratios']['save']:>5.2f}  "
            f"{io['save_copy']['gbps']:>6.2f}  {io['ratios']['save_copy']:>5.2f}  "
            f"{io['torch_save']['gbps']:>10.2f}  "
            f"{io['ratios']['torch_save']:>5.2f}  {share(io['foreign_cpu_share']):>12}"
        )
    header = (
        f"{'round':>5}  {'disk read':>9}  {'st load':>7}  {'ratio':>5}  {'verify':>6}  "
        f"{'ratio':>5}  {'torch.load':>10}  {'ratio':>5}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rounds:
        io, ratios = r["io"], r["io"]["ratios"]
        print(
            f"{r['round']:>5}  {io['disk']['read_gbps']:>9.2f}  "
            f"{io['restore']['load_gbps']:>7.2f}  {ratios['load']:>5.2f}  "
            f"{io['restore']['verify_gbps']:>6.2f}  {ratios['verify']:>5.2f}  "
            f"{io['torch_load']['gbps']:>10.2f}  {ratios['torch_load']:>5.2f}"
        )
    if "stall" in medians:
        print_stall(summary)
    print_verdicts(summary)


def print_stall(summary: dict[str, Any]) -> None:
    every = summary["settings"]["save_every_steps"]
    header = (
        f"{'round':>5}  {'order':<11}  {'sync blocked s':>14}  {'async blocked s':>15}  "
        f"{'ratio':>5}  {'step ms between saves (s/a)':>27}  {'others CPU % (s/a)':>18}"
    )
    print(f"\ntraining stall: checkpoint_s at the save steps ({every}, {2 * every})")
    print(header + "\n" + "-" * len(header))
    for r in summary["rounds"]:
        stall = r["stall"]
        sync, async_ = stall["sync"], stall["async"]
        between = (
            f"{sync['mean_step_between_saves_s'] * 1000:.0f}/"
            f"{async_['mean_step_between_saves_s'] * 1000:.0f}"
        )
        others = f"{share(sync.get('foreign_cpu_share'))}/{share(async_.get('foreign_cpu_share'))}"
        print(
            f"{r['round']:>5}  {', '.join(stall['order']):<11}  "
            f"{' '.join(f'{s:.3f}' for s in sync['blocked_s'].values()):>14}  "
            f"{' '.join(f'{s:.3f}' for s in async_['blocked_s'].values()):>15}  "
            f"{stall['stall_ratio']:>5.3f}  {between:>27}  {others:>18}"
        )


def print_verdicts(summary: dict[str, Any]) -> None:
    medians, ok = summary["medians"], summary["within_target"]
    ratios, profile = medians["ratios"], medians["save_profile_s"]

    def verdict(name: str) -> str:
        return "within target" if ok[name] else "MISSES target"

    print(
        f"\nmedians: disk write {medians['disk_write_gbps']:.2f} GB/s, read "
        f"{medians['disk_read_gbps']:.2f} GB/s"
    )
    print(
        f"save   {medians['save_gbps']:.2f} GB/s = {ratios['save']:.2f} x disk write "
        f"({verdict('save')} >= {TARGET_SAVE_RATIO}); with an async save's copy "
        f"{medians['save_copy_gbps']:.2f} GB/s = {ratios['save_copy']:.2f} x; torch.save "
        f"{medians['torch_save_gbps']:.2f} GB/s = {ratios['torch_save']:.2f} x"
    )
    print(
        f"load   {medians['load_gbps']:.2f} GB/s = {ratios['load']:.2f} x disk read "
        f"({verdict('load')} >= {TARGET_LOAD_RATIO}); verify {medians['verify_gbps']:.2f} GB/s "
        f"= {ratios['verify']:.2f} x; torch.load {medians['torch_load_gbps']:.2f} GB/s = "
        f"{ratios['torch_load']:.2f} x"
    )
    total = profile["seconds"]
    print(
        "save profile (median s, share of the save): "
        + ", ".join(
            f"{key.removesuffix('_s')} {profile[key]:.3f} ({profile[key] / total:.0%})"
            for key in ("snapshot_s", "checksum_s", "write_fsync_commit_s")
        )
        + f"; an async save's host copy {medians['save_copy_snapshot_s']:.3f}"
    )
    load = medians["load_profile_s"]
    print(
        f"load profile (median s of {load['seconds']:.3f}): check manifest + sizes "
        f"{load['check_s']:.3f}, read + checksum {load['read_s']:.3f}, load_state_dict "
        f"{load['load_state_dict_s']:.3f}; verify {load['verify_s']:.3f}"
    )
    if "stall" in medians:
        stall = medians["stall"]
        print(
            f"stall  async {stall['async.mean_blocked_s']:.3f} s / sync "
            f"{stall['sync.mean_blocked_s']:.3f} s = {stall['stall_ratio']:.3f} "
            f"({verdict('stall')} <= {TARGET_STALL_RATIO}); steps between saves async/sync "
            f"{stall['between_saves_ratio']:.2f} x, whole fit() {stall['fit_ratio']:.2f} x"
        )
    if any((r["io"]["foreign_cpu_share"] or 0) > NOISY_FOREIGN_SHARE for r in summary["rounds"]):
        print(
            f"* other processes used over {NOISY_FOREIGN_SHARE:.0%} of the CPU during this "
            "round's I/O; its numbers are noisy (rerun on a quiet machine to confirm)"
        )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300, help="checkpoint size, about")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--save-every",
        type=int,
        default=20,
        help="training-stall runs save every N steps (0: skip them)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=180, help="seconds to wait for a quiet machine per round"
    )
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="no sync + memory warm-up before each measured operation (see Settle)",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base steadytrain YAML")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mb <= 0 or args.save_every < 0:
        parser.error("--rounds and --size-mb must be positive, --save-every not negative")
    args.config = args.config.resolve()
    args.num_layers = num_layers_for(args.size_mb)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.provenance = source_provenance()  # before the run: others may commit meanwhile
    # Same file system as the repository (and so as a run directory under it).
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-checkpoint-io-", dir=Path(__file__).parent))
    print(f"checkpoint_io: {args.rounds} round(s) in {scratch}")
    started = time.perf_counter()
    try:
        summary = measure(args, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["wall_seconds"] = time.perf_counter() - started
    # Peak memory of this process (the training runs are separate processes).
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_report(summary)
    print(
        f"peak memory of the benchmark process: {summary['peak_rss_mb']:,.0f} MB; "
        f"{summary['wall_seconds']:.0f} s in all"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if args.check and not all(summary["within_target"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
