"""The checkpoint interval: Young's and Daly's optimum, the exact goodput under exponential
failures, and a seeded Monte Carlo simulation of it, for synchronous and asynchronous saves.

Times are in seconds. A job computes for an interval τ between checkpoints; failures arrive as
a Poisson process at the system MTBF M; a failure loses the work since the last *durable*
checkpoint and costs a restart R (which a failure can interrupt too). Goodput is the long-run
share of wall time that ends up as durable progress (docs/planning.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SECONDS_PER_HOUR = 3600.0
# Failures simulated per interval: the standard error of a goodput is then 0.1-0.3% of it
# in the regimes docs/planning.md shows, well inside the 1% the tests hold the simulator to.
DEFAULT_NUM_FAILURES = 20_000


def system_mtbf_seconds(node_mtbf_hours: float, *, num_nodes: int) -> float:
    """The job's MTBF: any node failing stops a synchronous job, so failure rates add."""
    return node_mtbf_hours * SECONDS_PER_HOUR / num_nodes


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum (1974): √(2·C·M)."""
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


def daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum (2006): √(2CM)·[1 + ⅓·√(C/2M) + ⅑·C/2M] − C for C < 2M,
    and M itself for C ≥ 2M."""
    if checkpoint_s >= 2.0 * mtbf_s:
        return mtbf_s
    ratio = checkpoint_s / (2.0 * mtbf_s)
    correction = 1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0
    return young_interval(checkpoint_s, mtbf_s) * correction - checkpoint_s


def async_interval(*, stall_s: float, write_s: float, mtbf_s: float) -> float:
    """The optimum of asynchronous saves: Daly's with the stall as the cost per checkpoint,
    but never shorter than the write, nor than M when the write is longer than M.

    Below the write, each snapshot waits for the write in flight, so checkpoints come every
    write + stall whatever τ is, each holding only τ of work: goodput there is proportional
    to τ·e^(−τ/M), which grows with τ up to τ = M. Hence the floor min(write, M).
    """
    return float(max(daly_interval(stall_s, mtbf_s), min(write_s, mtbf_s)))


@dataclass(frozen=True)
class Schedule:
    """When checkpoints become durable after a (re)start: the first ``first_durable_s`` after
    it, then one every ``period_s``; each holds ``interval_s`` more seconds of work."""

    interval_s: float
    first_durable_s: float
    period_s: float


def sync_schedule(interval_s: float, *, checkpoint_s: float) -> Schedule:
    """Compute τ, then save for C with training blocked: durable at k·(τ + C)."""
    return Schedule(interval_s, interval_s + checkpoint_s, interval_s + checkpoint_s)


def async_schedule(interval_s: float, *, stall_s: float, write_s: float) -> Schedule:
    """Compute τ, block S for the snapshot, then write for C while training goes on.

    Snapshot k ends at s_k and is durable at s_k + C. At most one write is in flight, so
    snapshot k+1 starts τ after s_k or when write k ends, whichever is later: s_1 = τ + S and
    s_(k+1) = s_k + max(τ, C) + S. A failure before s_k + C loses snapshot k as well: what a
    failure can lose is the work since the previous durable snapshot, C longer than with a
    synchronous save of the same cycle.
    """
    return Schedule(interval_s, interval_s + stall_s + write_s, max(interval_s, write_s) + stall_s)


def exact_goodput(schedule: Schedule, *, mtbf_s: float, restart_s: float) -> float:
    """The long-run goodput of ``schedule`` under exponential failures, exactly.

    A failure renews the process: a life lasts U ~ Exp(M), then a restart takes M·(e^(R/M) − 1)
    on average (a failure during it starts it over). A life keeps τ of work per checkpoint
    durable before it ends: τ·Σ_k P(U ≥ D₁ + (k−1)·P) = τ·e^(−D₁/M) / (1 − e^(−P/M)). Goodput is
    that over the mean life and restart, M·e^(R/M). Synchronously (D₁ = P = τ + C) it is
    τ / (M·e^(R/M)·(e^((τ+C)/M) − 1)), Daly's exact formula; asynchronously (C ≤ τ) it is the
    same with the stall S for C, times e^(−C/M): the price of the longer exposure.
    """
    kept = schedule.interval_s * math.exp(-schedule.first_durable_s / mtbf_s)
    kept /= -math.expm1(-schedule.period_s / mtbf_s)
    return kept / (mtbf_s * math.exp(restart_s / mtbf_s))


@dataclass(frozen=True)
class SimulatedGoodput:
    goodput: float
    standard_error: float  # of ``goodput``, from the spread over the simulated lives


def simulate_goodput(
    schedule: Schedule,
    *,
    mtbf_s: float,
    restart_s: float,
    num_failures: int = DEFAULT_NUM_FAILURES,
    seed: int = 0,
) -> SimulatedGoodput:
    """Goodput over ``num_failures`` simulated failures (the same seed, the same failures).

    Each life after a (re)start runs until the next failure of the Poisson process (an
    exponential draw: the process is memoryless); it keeps the work of the checkpoints the
    schedule made durable before that moment and loses the rest; then the restart runs, and
    failures that strike during it (exponential draws too) start it over. Goodput is the work
    kept over the wall time, summed over all lives. Every interval of a sweep sees the same
    failures for a seed (common random numbers), so the curve is smooth and its maximum stable.
    """
    rng = np.random.default_rng(seed)
    lives = rng.exponential(mtbf_s, num_failures)
    restarts = _restart_seconds(rng, restart_s=restart_s, mtbf_s=mtbf_s, count=num_failures)
    durable = np.floor((lives - schedule.first_durable_s) / schedule.period_s) + 1.0
    kept = schedule.interval_s * np.maximum(durable, 0.0)
    wall = lives + restarts
    goodput = float(kept.sum() / wall.sum())
    # A ratio of sums: its standard error by the delta method, from each life's residual.
    residuals = kept - goodput * wall
    variance = float(np.sum(residuals**2)) / (num_failures * (num_failures - 1))
    return SimulatedGoodput(goodput, math.sqrt(variance) / float(wall.mean()))


def _restart_seconds(
    rng: np.random.Generator, *, restart_s: float, mtbf_s: float, count: int
) -> np.ndarray:
    """Each restart's wall time: R, plus the time spent in restarts a failure cut short."""
    total = np.zeros(count)
    pending = np.arange(count)
    while pending.size:
        failure = rng.exponential(mtbf_s, pending.size)
        struck = failure < restart_s
        total[pending[~struck]] += restart_s
        total[pending[struck]] += failure[struck]
        pending = pending[struck]
    return total
