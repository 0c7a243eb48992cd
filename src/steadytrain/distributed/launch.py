"""Start N worker processes on this machine with torchrun's elastic agent (``--nproc N``).

The workers are ordinary torchrun workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR… set by
the agent); each runs the same ``steadytrain`` command without ``--nproc``. A worker that
fails on user input prints its own one-line error and exits 2; the launcher then exits 2
too instead of printing the agent's multi-page failure report.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from types import FrameType

from steadytrain.config import EXIT_INTERNAL, EXIT_REQUEUE, EXIT_USAGE

_AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
LAUNCHER_PID_VARIABLE = "STEADYTRAIN_LAUNCHER_PID"
SHARE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def launch_local_workers(
    *,
    nproc: int,
    worker_args: Sequence[str],
    max_restarts: int = 0,
    shutdown_timeout_s: float = 30.0,
) -> int:
    """Run ``python -m steadytrain WORKER_ARGS`` as ``nproc`` ranks; return the exit code.

    A worker that fails makes the agent restart the whole group, up to ``max_restarts``
    times; the workers resume from the newest good checkpoint. SIGTERM (or SIGUSR1) to
    this launcher is passed to the workers as SIGTERM; they checkpoint at the next step
    and exit, given ``shutdown_timeout_s`` before the agent kills them, and the launcher
    exits ``EXIT_REQUEUE``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in _AGENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())  # inherited by the workers
    # Workers that share the agent's rendezvous store read the previous group's addresses
    # after a restart and fail to connect (pytorch issue #135712): rank 0 hosts a fresh
    # store for each group instead.
    os.environ.setdefault(SHARE_STORE_VARIABLE, "1")
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"steadytrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        shutdown_timeout=math.ceil(shutdown_timeout_s),
    )
    # The agent turns SIGTERM into an orderly shutdown (SIGTERM to every worker); SIGUSR1,
    # which SLURM sends before a time limit, would otherwise kill the launcher outright.
    signal.signal(signal.SIGUSR1, _shut_down_as_on_sigterm)
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)("-m", "steadytrain", *worker_args)
    except SignalException:
        print(
            "steadytrain: stopped by a signal; the workers saved a checkpoint if they could "
            f"(exit code {EXIT_REQUEUE}: run the same command again)",
            file=sys.stderr,
        )
        return EXIT_REQUEUE
    except ChildFailedError as error:
        code = _exit_code_of(error)
        if code == EXIT_REQUEUE:
            print(
                f"steadytrain: preempted (exit code {code}); run the same command again to "
                "resume from the checkpoint just saved",
                file=sys.stderr,
            )
        elif code != EXIT_USAGE:
            print(
                f"steadytrain: a worker failed (exit code {code}); its output is above",
                file=sys.stderr,
            )
        return code
    return 0


def _shut_down_as_on_sigterm(number: int, frame: FrameType | None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException("launcher got SIGUSR1", sigval=signal.SIGTERM)


def exit_with_launcher(*, poll_seconds: float = 0.1) -> None:
    """In a worker started by ``--nproc``: die when the launcher dies, even by ``kill -9``.

    Orphaned workers would otherwise train on, and race a resumed run for the same run
    directory. A daemon thread watches the parent; nothing happens outside ``--nproc``.
    """
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE)
    if launcher is None or str(os.getppid()) != launcher:
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="steadytrain-launcher-watch", daemon=True).start()


def _exit_code_of(error: object) -> int:
    """Exit 2 if any worker reported a user error; else the code of the first to fail."""
    failures = getattr(error, "failures", {}).values()
    codes = [failure.exitcode for failure in sorted(failures, key=lambda f: f.timestamp)]
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    for code in codes:
        if code < 0:  # killed by signal -code: the shell's convention
            return 128 - code
        if code > 0:
            return int(code)
    return EXIT_INTERNAL
