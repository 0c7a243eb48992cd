"""Torchrun environment, process group, agreed decisions, seeding, the parallel wrapper."""

from steadytrain.distributed.agree import (
    any_rank,
    broadcast_from_main,
    first_failure,
    gather_from_all,
    max_across_ranks,
    mean_across_ranks,
    side_group,
)
from steadytrain.distributed.launch import exit_with_launcher, launch_local_workers
from steadytrain.distributed.parallel import GradSyncClock, ParallelModel
from steadytrain.distributed.runtime import (
    Runtime,
    barrier,
    exit_process,
    joined_group_of_many,
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

__all__ = [
    "GradSyncClock",
    "ParallelModel",
    "ProcessRng",
    "Runtime",
    "any_rank",
    "barrier",
    "broadcast_from_main",
    "capture_rng_state",
    "exit_process",
    "exit_with_launcher",
    "first_failure",
    "gather_from_all",
    "joined_group_of_many",
    "launch_local_workers",
    "max_across_ranks",
    "mean_across_ranks",
    "rank_seed",
    "restore_rng_state",
    "seed_all",
    "side_group",
    "start_runtime",
    "stop_runtime",
    "under_torchrun",
    "use_deterministic_kernels",
    "world_size_from_env",
]
