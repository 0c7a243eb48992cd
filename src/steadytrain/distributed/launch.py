"""Start N worker processes on this machine with torchrun's elastic agent (``--nproc N``).

The workers are ordinary torchrun workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR… set by
the agent). They are forked from a multiprocessing *forkserver* that imported torch and
steadytrain once, when the first group started: a group the agent restarts after a failure
starts without importing anything again, which is most of what a fresh process would spend
before its first step. A worker that fails on user input prints its own one-line error and
exits 2; the launcher then exits 2 too instead of printing the agent's multi-page failure
report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from steadytrain.config import EXIT_DATA_UNAVAILABLE, EXIT_INTERNAL, EXIT_REQUEUE, EXIT_USAGE
from steadytrain.distributed.runtime import run_exit_handlers

_AGENT_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.multiprocessing",
)
WORKER_NAME_PREFIX = "steadytrain-r"  # + rank: the worker's name in ps, top, /proc/PID/comm
SHARE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def launch_local_workers(
    *,
    nproc: int,
    entrypoint: Callable[[int, list[str]], None],
    worker_args: Sequence[str],
    preload: Sequence[str] = (),
    max_restarts: int = 0,
    shutdown_timeout_s: float = 30.0,
) -> int:
    """Run ``entrypoint(LAUNCHER_PID, WORKER_ARGS)`` in ``nproc`` ranks; return the exit code.

    ``entrypoint`` is a module-level function (the forkserver imports it by name); it
    calls ``become_local_worker(LAUNCHER_PID)`` first and ends with ``end_local_worker``.
    The modules in ``preload`` are imported once by the forkserver, so every worker, first
    group or restarted, is forked with them already imported. A caller may start that
    forkserver earlier (``multiprocessing.forkserver.ensure_running`` with the same
    preload), so that its imports run beside its own work; it is stopped here.

    A worker that fails makes the agent restart the whole group, up to ``max_restarts``
    times; the workers resume from the newest good checkpoint. SIGTERM (or SIGUSR1) to
    this launcher is passed to the workers as SIGTERM; they checkpoint at the next signal
    check and exit, given ``shutdown_timeout_s`` before the agent kills them, and the launcher
    exits ``EXIT_REQUEUE``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in _AGENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Already running when the caller started it early (it reads no setting set below).
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    # Workers that share the agent's rendezvous store read the previous group's addresses
    # after a restart and fail to connect (pytorch issue #135712): rank 0 hosts a fresh
    # store for each group instead. Read by the agent, in this process.
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
        start_method="forkserver",
        shutdown_timeout=math.ceil(shutdown_timeout_s),
    )
    # The agent turns SIGTERM into an orderly shutdown (SIGTERM to every worker); SIGUSR1,
    # which SLURM sends before a time limit, would otherwise kill the launcher outright.
    signal.signal(signal.SIGUSR1, _shut_down_as_on_sigterm)
    try:
        elastic_launch(launch_config, entrypoint=entrypoint)(os.getpid(), list(worker_args))
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
        elif code not in (EXIT_USAGE, EXIT_DATA_UNAVAILABLE):  # a worker said why in one line
            print(
                f"steadytrain: a worker failed (exit code {code}); its output is above",
                file=sys.stderr,
            )
        return code
    finally:
        stop_worker_forkserver()
    return 0


def stop_worker_forkserver() -> None:
    """Stop and reap this process's forkserver, so that nothing the launcher started
    outlives it (and the workers' CPU time counts as its children's).

    The standard library has no public call for this; ``ForkServer._stop`` closes the
    "alive" pipe the server watches and waits for it to finish its imports, notice, and
    finalize an interpreter with torch loaded (over a second here). The server holds no
    state of ours and has reaped every worker the agent saw exit, so it is killed instead;
    a straggling worker, reparented, still dies with the launcher (``become_local_worker``).
    """
    server: Any = multiprocessing.forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    try:
        server._stop()  # closes the pipe, reaps the server, removes its socket file
    except ChildProcessError:  # reaped already (a SIGCHLD handler of the caller's)
        server._forkserver_pid = None


def _shut_down_as_on_sigterm(number: int, frame: FrameType | None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException("launcher got SIGUSR1", sigval=signal.SIGTERM)


_local_worker = False
_started_warm = False


def become_local_worker(launcher: int, *, poll_seconds: float = 0.1) -> None:
    """First thing in a worker that ``launch_local_workers`` forked, given the launcher's pid.

    Puts the working directory first on ``sys.path`` as ``python -m`` would (user factories
    given as ``module:function`` import from it), and makes the worker die when the launcher
    dies, even by ``kill -9``: a daemon thread waits for the launcher's exit and kills the
    worker (the forkserver, the worker's parent, lives as long as its children, so a parent
    change cannot tell). Orphaned workers would otherwise train on, and race a resumed run
    for the same run directory.
    """
    global _local_worker, _started_warm
    _local_worker = True
    # Forked from a forkserver that had imported torch before this group: a restart by the
    # agent (the first group's forkserver imported it just before forking).
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    _started_warm = restarted and "torch" in sys.modules
    if sys.path[:1] != [os.getcwd()]:
        sys.path.insert(0, os.getcwd())

    def watch() -> None:
        _wait_for_exit_of(launcher, poll_seconds=poll_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="steadytrain-launcher-watch", daemon=True).start()


def _wait_for_exit_of(pid: int, *, poll_seconds: float) -> None:
    """Return once process ``pid`` has exited (a zombie counts): at once, through a pidfd,
    where the kernel has them (Linux 5.3); else by polling its state."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while process_running(pid):
            time.sleep(poll_seconds)
        return
    try:
        select.select([handle], [], [])  # readable once the process has exited
    finally:
        os.close(handle)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux ``/proc``); a zombie counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def in_local_worker() -> bool:
    """True in a worker forked by ``launch_local_workers`` (it ends with ``end_local_worker``)."""
    return _local_worker


def started_warm() -> bool:
    """True in a worker forked with torch already imported (``launch_local_workers``)."""
    return _started_warm


def end_local_worker(code: int) -> None:
    """End a forked worker with ``code``: exit now if it failed, else return to the agent.

    The agent counts a worker as finished only once its entry function has returned, so a
    successful worker returns; a failed one exits with its code. Neither finalizes the
    interpreter: the forkserver's child leaves with ``os._exit`` after the function (see
    ``runtime.exit_process`` for why that matters with gloo). ``atexit`` handlers, which
    that skips, run here.
    """
    run_exit_handlers()
    if code:
        os._exit(code)


def name_worker_process() -> None:
    """Name this torchrun worker ``steadytrain-rRANK`` in ps and top (Linux), as
    ``local_worker_pids`` finds it; ranks whose name would not fit 15 bytes stay unnamed."""
    name = f"{WORKER_NAME_PREFIX}{os.environ.get('RANK', '')}"
    if len(name) <= 15:
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text(name)


def local_worker_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the training workers a launcher (``--nproc``, or torchrun) runs now:
    its descendants named by ``name_worker_process``."""
    workers: dict[int, int] = {}
    pending, seen = [launcher_pid], set()
    while pending:
        pid = pending.pop()
        seen.add(pid)
        with contextlib.suppress(OSError, ValueError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if pid != launcher_pid and name.startswith(WORKER_NAME_PREFIX):
                workers[int(name.removeprefix(WORKER_NAME_PREFIX))] = pid
        for task in _tasks_of(pid):
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                pending += [int(child) for child in children if int(child) not in seen]
    return workers


def _tasks_of(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _exit_code_of(error: object) -> int:
    """Exit 7 or 2 if any worker reported a user error (a streamed corpus it cannot read
    outranks the ranks that only stopped with it); else the code of the first to fail."""
    failures = getattr(error, "failures", {}).values()
    codes = [failure.exitcode for failure in sorted(failures, key=lambda f: f.timestamp)]
    for user_error in (EXIT_DATA_UNAVAILABLE, EXIT_USAGE):
        if user_error in codes:
            return user_error
    for code in codes:
        if code < 0:  # killed by signal -code: the shell's convention
            return 128 - code
        if code > 0:
            return int(code)
    return EXIT_INTERNAL
