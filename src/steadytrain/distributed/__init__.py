"""Torchrun environment, process group, agreed decisions, seeding, the parallel wrapper."""

from steadytrain.distributed.agree import (
    any_rank,
    broadcast_from_main,
    first_failure,
    gather_from_all,
    max_across_ranks,
    mean_across_ranks,
    rows_from_all,
    side_group,
    start_rows_from_all,
)
from steadytrain.distributed.comm_hooks import check_gradient_sync
from steadytrain.distributed.compiling import check_compile
from steadytrain.distributed.launch import (
    become_local_worker,
    end_local_worker,
    in_local_worker,
    launch_local_workers,
    local_worker_pids,
    name_worker_process,
    process_running,
    started_warm,
)
from steadytrain.distributed.parallel import GradSyncClock, ParallelModel
from steadytrain.distributed.runtime import (
    Runtime,
    barrier,
    exit_process,
    joined_group_of_many,
    keep_until_exit,
    planned_backend,
    start_runtime,
    stop_runtime,
    under_torchrun,
    world_size_from_env,
)
from steadytrain.distributed.seeding import (
    ProcessRng,
    capture_rng_state,
    rank_seed,
    restore_rng_state,
    seed_all,
    use_deterministic_kernels,
)
from steadytrain.distributed.state import ModelState, OptimizerState

__all__ = [
    "GradSyncClock",
    "ModelState",
    "OptimizerState",
    "ParallelModel",
    "ProcessRng",
    "Runtime",
    "any_rank",
    "barrier",
    "become_local_worker",
    "broadcast_from_main",
    "capture_rng_state",
    "check_compile",
    "check_gradient_sync",
    "end_local_worker",
    "exit_process",
    "first_failure",
    "gather_from_all",
    "in_local_worker",
    "joined_group_of_many",
    "keep_until_exit",
    "launch_local_workers",
    "local_worker_pids",
    "max_across_ranks",
    "mean_across_ranks",
    "name_worker_process",
    "planned_backend",
    "process_running",
    "rank_seed",
    "restore_rng_state",
    "rows_from_all",
    "seed_all",
    "side_group",
    "start_rows_from_all",
    "start_runtime",
    "started_warm",
    "stop_runtime",
    "under_torchrun",
    "use_deterministic_kernels",
    "world_size_from_env",
]
