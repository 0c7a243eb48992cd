"""The sharded save and restore measured as ``checkpoint_io.py`` measures DDP's, at 2 ranks.

``fsdp_vs_ddp.py`` times the restore of a fresh resume, whose new processes fault in new
memory (slow on a VM whose host takes freed memory back). This measures it under the
conditions the checkpoint I/O target is defined in: long-lived workers, memory touched and
freed right before (``Settle``), the checkpoint's files dropped from the page cache, the save
and the restore each timed on their own, and the disk probed in the same round.

Each rank builds the benchmark's GPT (``checkpoint_io``'s width, ``--size-mb``) as training
does (``start_runtime`` + ``ParallelModel``), under FSDP2 and under DDP, each with
steadytrain's AdamW after one real step. Each round, in alternating order: the disk (rank 0;
the others wait), then per layout a synchronous save through the real checkpointer
(``after_step(now=True)``), its restore through ``restore_checkpoint`` into a fresh optimizer
and the model's existing (overwritten) weights, as a resume does, checked bit for bit against
the saved state, and the floor: the same files read by each rank with plain reads into new
memory, all ranks at once. Per rank: the restore's seconds by phase
(``Restored.phase_seconds``) and the seconds the cyclic garbage collector ran inside it.

    .venv/bin/python benchmarks/checkpoint_io_sharded.py [--rounds 5] [--size-mb 300]

starts the workers itself (``fsdp_vs_ddp.py`` does, through ``settled_io``); they also run
under torchrun: ``python -m torch.distributed.run --standalone --nproc-per-node 2
benchmarks/checkpoint_io_sharded.py --result OUT.json --scratch DIR``.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpoint_io_measurements import (
    NUM_HEADS,
    WIDTH,
    Settle,
    drop_from_cache,
    files_in,
    measure_disk,
    num_layers_for,
    resident_bytes,
    wait_for_quiet,
)
from fsdp_vs_ddp_probes import files_of_rank
from overhead import machine_cpu_ticks

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"
LAYOUTS = ("fsdp", "ddp")
SETTLE_FACTOR = 4  # memory each rank touches and frees before an operation, x checkpoint


class Events:
    """The smallest ``EventSink``: keeps what the protocol reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


class GcTime:
    """Seconds the cyclic garbage collector ran while the block ran (``gc.callbacks``)."""

    def __enter__(self) -> GcTime:
        self.seconds, self.collections, self._started = 0.0, 0, 0.0
        gc.callbacks.append(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._record)

    def _record(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1


class OthersCpu:
    """The share of the machine's CPU that processes other than the ranks used in the block
    (``/proc/stat`` less every rank's own CPU time; a collective: every rank enters it)."""

    def __enter__(self) -> OthersCpu:
        self.share: float | None = None
        self._before = machine_cpu_ticks(), _own_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        after, ours = machine_cpu_ticks(), [0.0] * dist.get_world_size()
        dist.all_gather_object(ours, _own_seconds() - self._before[1])
        if after is None or self._before[0] is None:
            return
        total, busy, steal = (a - b for a, b in zip(after, self._before[0], strict=True))
        ticks = sum(ours) * os.sysconf("SC_CLK_TCK")
        self.share = max(0.0, (busy - steal - ticks) / max(1, total))


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Layout:
    """One strategy's model, optimizer and checkpointer on this rank, as training builds them."""

    def __init__(self, strategy: str, *, args: argparse.Namespace, runtime: Any) -> None:
        from steadytrain.checkpoint import LocalStorage, PeriodicCheckpointer, RunIdentity
        from steadytrain.config import load_config
        from steadytrain.distributed import ParallelModel
        from steadytrain.model.gpt import GPT
        from steadytrain.train.optim import build_optimizer

        self.strategy, self.rank = strategy, runtime.rank
        kwargs = f"{{num_layers: {args.num_layers}, width: {WIDTH}, num_heads: {NUM_HEADS}}}"
        self.config = load_config(
            args.config,
            overrides=[
                f"model.kwargs={kwargs}",
                f"parallel.strategy={strategy}",
                "dist.backend=gloo",
                "checkpoint.every_steps=1",
                "checkpoint.keep_last=1",
                "checkpoint.async_save=false",
            ],
        )
        torch.manual_seed(0)  # every rank builds the same weights, as training does
        parallel = ParallelModel(
            GPT(**self.config.model.kwargs), runtime=runtime, config=self.config
        )
        self.model, self.sharded = parallel.unwrapped, parallel.sharded
        self.optimizer = build_optimizer(self.model, self.config.train)
        tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
        logits = parallel.module(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.saved = local_state(self.model, self.optimizer)
        self.storage = LocalStorage(Path(args.scratch) / strategy, read_threads=args.read_threads)
        self.identity = RunIdentity(
            config=self.config, world_size=runtime.world_size, global_batch_size=2
        )
        self.checkpointer = PeriodicCheckpointer(
            self.storage,
            self.contents(self.optimizer),
            identity=self.identity,
            rank=self.rank,
            events=Events(),
        )

    def contents(self, optimizer: torch.optim.Optimizer) -> Any:
        from steadytrain.checkpoint import CheckpointContents
        from steadytrain.distributed import ModelState, OptimizerState, ProcessRng

        return CheckpointContents(
            replicated={
                "model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, optimizer),
            },
            per_rank={"rng": ProcessRng()},
            sharded=self.sharded,
        )

    def save(self, step: int) -> tuple[float, Path]:
        started = time.perf_counter()
        outcome = self.checkpointer.after_step(step=step, final=False, now=True)
        seconds = time.perf_counter() - started
        if outcome is None or not outcome.committed:
            sys.exit(f"checkpoint_io_sharded: the {self.strategy} save was not committed")
        return seconds, Path(outcome.location)

    def restore(self) -> dict[str, Any]:
        """``restore_checkpoint`` into a fresh optimizer, as a resume; checked, then dropped."""
        from steadytrain.checkpoint import ResumeRequest, restore_checkpoint
        from steadytrain.train.optim import build_optimizer

        optimizer = build_optimizer(self.model, self.config.train)  # no moments yet
        contents, events = self.contents(optimizer), Events()
        with GcTime() as collector:
            started = time.perf_counter()
            restored = restore_checkpoint(
                self.storage,
                contents,
                identity=self.identity,
                request=ResumeRequest(),
                rank=self.rank,
                events=events,
            )
            seconds = time.perf_counter() - started
        if restored is None:
            sys.exit(f"checkpoint_io_sharded: nothing restored ({events.events})")
        if local_state(self.model, optimizer) != self.saved:
            sys.exit(f"checkpoint_io_sharded: the {self.strategy} restore differs from the save")
        return {
            "seconds": seconds,
            "phases_s": restored.phase_seconds,
            "gc_s": collector.seconds,
            "gc_collections": collector.collections,
        }


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    """This rank's local values of every weight and moment, as bytes (compared exactly)."""
    from torch.distributed.tensor import DTensor

    def local(tensor: torch.Tensor) -> bytes:
        value = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return value.detach().reshape(-1).view(torch.uint8).numpy().tobytes()

    found = {f"model/{name}": local(p) for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    for parameter, state in optimizer.state.items():
        for field, value in state.items():
            found[f"optimizer/{names[id(parameter)]}/{field}"] = local(value)
    return found


def overwrite(model: torch.nn.Module) -> None:
    """Overwrite the weights, so that a restore that loads nothing fails the check."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for parameter in model.parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            local.fill_(0.5)


def plain_read(paths: list[Path]) -> float:
    """Seconds to read ``paths`` into new memory (one private mapping per file, huge pages
    advised, as steadytrain's reader allocates), 16 MiB at a time, nothing checked."""
    started, regions = time.perf_counter(), []
    for path in paths:
        size = path.stat().st_size
        region = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        view, filled = memoryview(region), 0
        with open(path, "rb", buffering=0) as handle:
            while filled < size:
                filled += handle.readinto(view[filled : filled + 16 * 2**20])
        regions.append((view, region))
    return time.perf_counter() - started


def cold(paths: list[Path], *, rank: int) -> int | None:
    """Drop ``paths`` from the page cache (rank 0, for all ranks); bytes still resident."""
    if rank == 0:
        os.sync()
        drop_from_cache(paths)
    return resident_bytes(paths) if rank == 0 else None


def measure_layout(layout: Layout, *, number: int, settle: Settle) -> dict[str, Any]:
    """Save, restore and the plain-read floor of one layout, every rank at once."""
    settle()
    dist.barrier()
    save_s, location = layout.save(100 + number)
    paths = files_in(location)
    overwrite(layout.model)
    cached = cold(paths, rank=layout.rank)
    settle()
    dist.barrier()
    restore = layout.restore()
    cached_floor = cold(paths, rank=layout.rank)
    settle()
    dist.barrier()
    floor_s = plain_read(files_of_rank(paths, layout.rank))
    mine = {"save_s": save_s, "restore": restore, "floor_s": floor_s}
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    return {
        "bytes": sum(path.stat().st_size for path in paths),
        "cached_bytes_before": [cached, cached_floor],
        "per_rank": per_rank,
        "save_s": max(r["save_s"] for r in per_rank),
        "restore_s": max(r["restore"]["seconds"] for r in per_rank),
        "floor_s": max(r["floor_s"] for r in per_rank),
    }


def run_worker(args: argparse.Namespace) -> None:
    from steadytrain.config import load_config
    from steadytrain.distributed import start_runtime, stop_runtime

    runtime = start_runtime(load_config(args.config, overrides=["dist.backend=gloo"]))
    layouts = {strategy: Layout(strategy, args=args, runtime=runtime) for strategy in LAYOUTS}
    _, probe = layouts["fsdp"].save(1)
    num_bytes = sum(path.stat().st_size for path in files_in(probe))
    settle = Settle(SETTLE_FACTOR * num_bytes, enabled=True)
    rounds = []
    for number in range(args.rounds):
        order = ("disk", *LAYOUTS) if number % 2 == 0 else (*LAYOUTS[::-1], "disk")
        measured: dict[str, Any] = {"round": number + 1, "order": list(order)}
        with OthersCpu() as others:
            for side in order:
                if side != "disk":
                    measured[side] = measure_layout(layouts[side], number=number, settle=settle)
                elif runtime.rank == 0:
                    measured["disk"] = measure_disk(
                        Path(args.scratch), num_bytes=num_bytes, prepare=settle
                    )
                dist.barrier()
        measured["others_cpu_share"] = others.share
        rounds.append(measured)
    if runtime.rank == 0:
        result = {"rounds": rounds, "read_threads": layouts["fsdp"].storage.read_threads}
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    stop_runtime()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--size-mb", type=float, default=300, help="checkpoint size, about")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (when it starts them)")
    parser.add_argument("--read-threads", type=int, default=None, help="LocalStorage's")
    parser.add_argument(
        "--max-wait", type=float, default=60, help="seconds to wait for a quiet machine first"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--result", default=None, help="(worker) rank 0 writes its rounds here")
    parser.add_argument("--scratch", default=None, help="(worker) checkpoint directory")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mb <= 0:
        parser.error("--rounds and --size-mb must be positive")
    args.num_layers = num_layers_for(args.size_mb)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.result is not None:  # a torchrun worker
        run_worker(args)
        return 0
    from checkpoint_io_sharded_report import print_settled, settled_io

    print(f"checkpoint_io_sharded: waiting for a quiet machine: {wait_for_quiet(args.max_wait)}")

    scratch = Path(tempfile.mkdtemp(prefix=".scratch-sharded-io-", dir=Path(__file__).parent))
    try:
        summary = settled_io(
            nproc=args.nproc,
            rounds=args.rounds,
            size_mb=args.size_mb,
            scratch=scratch,
            read_threads=args.read_threads,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_settled(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
