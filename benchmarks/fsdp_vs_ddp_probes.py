"""What ``fsdp_vs_ddp.py`` measures beside the runs' own files: the workers' peak memory, and
the load's floor (the same bytes, cold, into new memory, in fresh processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from checkpoint_io_measurements import drop_from_cache, resident_bytes

POLL_S = 0.05  # how often each worker's VmHWM is read


# ---------------------------------------------------------------------------------------------
# Peak memory of the workers
# ---------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _peak_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class WorkerPeaks:
    """Peak resident memory of every training worker this process starts while it runs.

    Workers are the descendants of this process that multiprocessing started (forked from the
    launcher's forkserver, or spawned); ranks are numbered by start time, since the agent
    starts local rank 0 first. ``VmHWM`` only grows, so the last reading before a worker
    exits is its peak up to ``POLL_S`` before the exit.
    """

    def __init__(self) -> None:
        self._peaks: dict[int, int] = {}
        self._started: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def by_rank(self) -> list[int]:
        """Each worker's peak in bytes, in the order the workers started."""
        order = sorted(self._peaks, key=lambda pid: (self._started[pid], pid))
        return [self._peaks[pid] for pid in order]

    def _poll(self) -> None:
        ticks = 0
        while not self._done.is_set():
            if ticks % 10 == 0:  # new workers appear rarely; their memory changes all the time
                self._find_workers()
            for pid in list(self._started):
                peak = _peak_rss_bytes(pid)
                if peak is not None:
                    self._peaks[pid] = max(peak, self._peaks.get(pid, 0))
            ticks += 1
            self._done.wait(POLL_S)

    def _find_workers(self) -> None:
        parents: dict[int, tuple[int, int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
                parents[int(entry.name)] = stat
        for pid, (parent, started) in parents.items():
            if pid in self._started or not self._descends_from_us(pid, parents):
                continue
            command, parent_command = _cmdline(pid), _cmdline(parent)
            forked = "multiprocessing.forkserver" in command and "forkserver" in parent_command
            if forked or "multiprocessing.spawn" in command:
                self._started[pid] = started

    @staticmethod
    def _descends_from_us(pid: int, parents: dict[int, tuple[int, int]]) -> bool:
        ours = os.getpid()
        while pid in parents and pid > 1:
            pid = parents[pid][0]
            if pid == ours:
                return True
        return False


# ---------------------------------------------------------------------------------------------
# The load's floor: the same bytes, cold, into new memory, in fresh processes
# ---------------------------------------------------------------------------------------------

# Standard library only, so that nothing but the read touches new memory. Each file goes into
# its own private anonymous mapping (huge pages advised), as steadytrain's reader allocates.
READ_PROBE = r"""
import json, mmap, os, sys, time
delay, paths = float(sys.argv[1]), sys.argv[2:]
time.sleep(delay)
started, regions = time.perf_counter(), []
for path in paths:
    size = os.path.getsize(path)
    region = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    view, filled = memoryview(region), 0
    with open(path, "rb", buffering=0) as handle:
        while filled < size:
            filled += handle.readinto(view[filled : filled + 16 * 2**20])
    regions.append(region)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def files_of_rank(paths: list[Path], rank: int) -> list[Path]:
    """What a rank's resume reads: its own ``rank-N*`` files and every file of no rank."""
    own = f"rank-{rank:05d}"
    return [p for p in paths if p.name.startswith(own) or not p.name.startswith("rank-")]


def load_floor(paths: list[Path], *, nproc: int, delay_s: float) -> dict[str, Any]:
    """Seconds for ``nproc`` fresh processes to read their ranks' files cold, concurrently."""
    os.sync()
    drop_from_cache(paths)
    cached = resident_bytes(paths)
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", READ_PROBE, str(delay_s), *map(str, files_of_rank(paths, r))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]
    seconds = [json.loads(probe.communicate()[0])["seconds"] for probe in probes]
    if any(probe.returncode for probe in probes):
        sys.exit("fsdp_vs_ddp: a read probe failed")
    return {"seconds": max(seconds), "per_rank_s": seconds, "cached_bytes_before": cached}
