"""The process's place in the job: torchrun environment, device, process group, threads."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from steadytrain.config import Config, ConfigError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_joined_group_of_many = False  # set once this process has been part of a multi-rank group


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the job and what it computes on."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when torchrun (or a compatible launcher) has set this process's rank variables."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world_size_from_env(default: int = 1) -> int:
    return int(os.environ.get("WORLD_SIZE", default))


def start_runtime(config: Config) -> Runtime:
    """Join the process group described by the environment (a group of one outside torchrun).

    NCCL on CUDA with one device per local rank; gloo on CPU with threads split between the
    local ranks so they do not oversubscribe the cores.
    """
    global _joined_group_of_many
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device, backend = _choose_device_and_backend(config, local_rank=local_rank)
    if device.type == "cpu":
        torch.set_num_threads(config.dist.cpu_threads or _cores_per_rank(local_world_size))
    timeout = datetime.timedelta(seconds=config.dist.timeout_s)
    if backend == "nccl":
        enable_nccl_debugging(config.run_dir)  # read when the process group is created
    if not dist.is_initialized():
        if under_torchrun():
            _joined_group_of_many = world_size > 1
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
                **_store_of_this_restart(world_size=world_size, rank=rank, timeout=timeout),
            )
        else:
            # A group of one keeps every code path (collectives included) identical.
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return Runtime(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


def _store_of_this_restart(
    *, rank: int, world_size: int, timeout: datetime.timedelta
) -> dict[str, Any]:
    """``init_process_group`` arguments that keep a restarted group to its own store keys.

    When the workers share torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE``), its
    keys outlive a restart of the group, and a restarted rank can read the previous group's
    addresses before its peer overwrites them and fail to connect (pytorch issue #135712).
    A prefix of the run and restart count keeps every group to its own keys; on one machine
    every worker sees the same count. Otherwise (``env://``) rank 0 serves a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"steadytrain/{run_id}/restart-{restart}/", agent_store)
    return {"store": store, "rank": rank, "world_size": world_size}


def nccl_debug_environment(run_dir: str | Path) -> dict[str, str]:
    """NCCL's watchdog and flight recorder, dumping into ``RUN_DIR/hangs`` (Contract 4).

    Tear the process down on a failed or timed-out collective (3: without cleaning up the
    communicators, which can hang themselves), keep the last 2000 collectives, dump them on
    a timeout to ``RUN_DIR/hangs/nccl_trace_rank_<rank>``, and name the rank that did not
    join. Under torchrun the agent already sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (to 1,
    which tears down too) unless the launching environment has it.
    """
    hangs = Path(run_dir).resolve() / "hangs"  # the watchdog's folder (fault.hang_dump_dir)
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(hangs / "nccl_trace_rank_"),
        "TORCH_NCCL_DESYNC_DEBUG": "1",
    }


def enable_nccl_debugging(run_dir: str | Path) -> None:
    """Set ``nccl_debug_environment`` where the user has not set the variable already."""
    environment = nccl_debug_environment(run_dir)
    Path(environment["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    for name, value in environment.items():
        os.environ.setdefault(name, value)


def stop_runtime() -> None:
    """Leave the process group; safe to call when none was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def joined_group_of_many() -> bool:
    """True once this process has joined a process group of more than one rank."""
    return _joined_group_of_many


_KEPT: list[object] = []


def keep_until_exit(obj: object) -> None:
    """Never free ``obj`` (a DDP module, the training parts) in this process.

    Freeing the last reference to a gloo process group (DDP's reducer holds one, async saves
    hold a side group) runs its destructor, which joins gloo's run-loop thread while holding
    the GIL; if that thread is just then dropping a finished collective's tensors it waits for
    the GIL, and the process hangs at the end of a run that succeeded (seen with ``--nproc``
    workers returning from their entry function). Processes of a multi-rank group leave
    through ``os._exit`` (``exit_process``, or the forkserver's child after its function), so
    nothing is lost by keeping them.
    """
    _KEPT.append(obj)


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` now, without interpreter finalization.

    For a worker that has been in a multi-rank gloo group, and for ``--nproc``'s launcher
    once its workers are reaped (where finalizing an interpreter with torch loaded only
    costs time). Once DDP has used a group, gloo's worker threads outlive
    ``destroy_process_group`` (torch keeps a reference to the group), and a worker thread
    that drops a finished collective's tensors while the interpreter finalizes must take the
    GIL, cannot, and aborts the whole process ("terminate called without an active
    exception", exit code 134) after training succeeded. Skipping finalization closes that
    window. ``atexit`` handlers still run first (logging's flush, multiprocessing's reaping
    of loader workers, user code's own), while the interpreter is whole. Every file
    steadytrain writes is flushed or fsynced as it goes.
    """
    run_exit_handlers()
    os._exit(code)


def run_exit_handlers() -> None:
    """What interpreter finalization would run first, minus the teardown: ``atexit``
    handlers, then flushing stdout and stderr."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken pipe: nothing left
            stream.flush()


def barrier(*, timeout_s: float | None = None) -> None:
    """Wait for every rank; with ``timeout_s``, give up quietly after that long."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    if timeout_s is None:
        dist.barrier()
        return
    with contextlib.suppress(RuntimeError):  # a peer is gone: nothing left to wait for
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))


def planned_backend(config: Config) -> str:
    """The collective backend ``start_runtime`` picks on this machine: NCCL where CUDA is
    available (unless gloo is asked for), gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and config.dist.backend != "gloo" else "gloo"


def _choose_device_and_backend(config: Config, *, local_rank: int) -> tuple[torch.device, str]:
    if config.dist.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "dist.backend: 'nccl' needs CUDA, which this machine lacks; use 'auto' or 'gloo'"
        )
    if planned_backend(config) == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _cores_per_rank(local_world_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))
