"""The settled sharded save and restore of ``checkpoint_io_sharded.py``: launching its workers
under torchrun, the ratios to the disk of each round, the medians and the report."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from checkpoint_io_measurements import GB
from overhead import run_logged
from steadytrain.checkpoint import RESTORE_PHASES

LAYOUTS = ("fsdp", "ddp")
WORKER = Path(__file__).resolve().with_name("checkpoint_io_sharded.py")


def settled_io(
    *, nproc: int, rounds: int, size_mb: float, scratch: Path, read_threads: int | None = None
) -> dict[str, Any]:
    """Run the workers under torchrun (``--nproc`` ranks); every round and the medians."""
    result = scratch / "settled.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        f"--result={result}",
        f"--scratch={scratch / 'settled'}",
        f"--rounds={rounds}",
        f"--size-mb={size_mb}",
        *([f"--read-threads={read_threads}"] if read_threads else []),
    ]
    launch = run_logged(command, log_path=scratch / "settled.log")
    measured = json.loads(result.read_text())
    shutil.rmtree(scratch / "settled", ignore_errors=True)
    return {
        **summarize(measured["rounds"], nproc=nproc),
        "read_threads": measured["read_threads"],
        "launch": launch,
    }


def summarize(rounds: list[dict[str, Any]], *, nproc: int) -> dict[str, Any]:
    """Per round the ratios to the disk of the round; per layout the medians."""
    for measured in rounds:
        disk = measured["disk"]
        for side in LAYOUTS:
            run = measured[side]
            run["save_ratio"] = run["bytes"] / run["save_s"] / GB / disk["write_gbps"]
            run["load_ratio"] = run["bytes"] / run["restore_s"] / GB / disk["read_gbps"]
            run["load_over_floor"] = run["floor_s"] / run["restore_s"]

    def median(*keys: Any) -> float:
        values = []
        for measured in rounds:
            value: Any = measured
            for key in keys:
                value = value[key]
            values.append(float(value))
        return statistics.median(values)

    layouts = {
        side: {
            key: median(side, key)
            for key in (
                "save_s",
                "restore_s",
                "floor_s",
                "save_ratio",
                "load_ratio",
                "load_over_floor",
            )
        }
        for side in LAYOUTS
    }
    for side in LAYOUTS:
        layouts[side]["per_rank"] = [
            {
                "restore_s": median(side, "per_rank", rank, "restore", "seconds"),
                "floor_s": median(side, "per_rank", rank, "floor_s"),
                "gc_s": median(side, "per_rank", rank, "restore", "gc_s"),
                "rounds_with_gc_over_20ms": sum(
                    r[side]["per_rank"][rank]["restore"]["gc_s"] > 0.02 for r in rounds
                ),
                "phases_s": {
                    phase: median(side, "per_rank", rank, "restore", "phases_s", phase)
                    for phase in RESTORE_PHASES
                },
            }
            for rank in range(nproc)
        ]
    disk = {key: median("disk", key) for key in ("write_gbps", "read_gbps")}
    return {"rounds": rounds, "disk": disk, "layouts": layouts}


def print_settled(summary: dict[str, Any]) -> None:
    """One line per round, then the medians and each rank's phases."""
    print("\nsettled (long-lived workers, memory touched first, cold cache), per round:")
    for r in summary["rounds"]:
        disk = r["disk"]
        others = r["others_cpu_share"]
        line = (
            f"  round {r['round']} (others {'?' if others is None else f'{others:.0%}'} CPU): "
            f"disk W {disk['write_gbps']:.2f} R {disk['read_gbps']:.2f}"
        )
        for side in LAYOUTS:
            run = r[side]
            line += (
                f"; {side} save {run['save_s']:.3f} s ({run['save_ratio']:.2f}x), restore "
                f"{run['restore_s']:.3f} s ({run['load_ratio']:.2f}x, floor {run['floor_s']:.3f})"
            )
        print(line)
    for side, row in summary["layouts"].items():
        print(
            f"  {side}: save {row['save_ratio']:.2f} x disk write, load {row['load_ratio']:.2f} "
            f"x disk read ({row['restore_s']:.3f} s; floor {row['floor_s']:.3f} s = "
            f"{row['load_over_floor']:.2f} of the restore)"
        )
        for rank, per in enumerate(row["per_rank"]):
            phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in per["phases_s"].items())
            print(
                f"    rank {rank}: {per['restore_s'] * 1000:.0f} ms ({phases}; gc "
                f"{per['gc_s'] * 1000:.0f}, over 20 ms in {per['rounds_with_gc_over_20ms']} "
                f"rounds); floor {per['floor_s'] * 1000:.0f} ms"
            )
