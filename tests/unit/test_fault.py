"""The agreed step decision's policy, preemption flags and the grace deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from steadytrain.config import EXIT_REQUEUE, ConfigError
from steadytrain.fault import (
    PreemptionSignals,
    StepAction,
    StepDecision,
    StepGuard,
    StopReason,
    plan_faults,
    same_weights,
)
from steadytrain.train.state import TrainState


def guard(*, max_consecutive: int = 2, max_rollbacks: int = 1) -> StepGuard:
    return StepGuard(
        rank=0,
        world_size=2,
        device=torch.device("cpu"),
        max_consecutive_nonfinite=max_consecutive,
        max_rollbacks=max_rollbacks,
    )


FINE = [[0, 0], [0, 0], [0, 0]]  # rows: preempt, loss non-finite, gradient non-finite
NAN_ON_RANK_1 = [[0, 0], [0, 1], [1, 1]]


def test_finite_steps_commit_and_a_signal_on_one_rank_stops_all() -> None:
    decider = guard()
    assert decider.decide_from(FINE).action is StepAction.COMMIT
    decision = decider.decide_from([[0, 1], [0, 0], [0, 0]])
    assert (decision.action, decision.stop) == (StepAction.COMMIT, StopReason.PREEMPTED)
    assert decision.preempted_ranks == (1,)


def test_nonfinite_skips_then_rolls_back_then_diverges() -> None:
    decider = guard(max_consecutive=2, max_rollbacks=1)
    first = decider.decide_from(NAN_ON_RANK_1)
    assert (first.action, first.stop, first.nonfinite_loss_ranks) == (StepAction.SKIP, None, (1,))
    assert first.gradient_nonfinite and first.consecutive_nonfinite == 1
    assert decider.decide_from(NAN_ON_RANK_1).action is StepAction.ROLL_BACK
    decider.rolled_back(rollbacks_before=decider.counters.num_rollbacks)
    assert decider.decide_from(NAN_ON_RANK_1).action is StepAction.SKIP  # a fresh run
    assert decider.decide_from(FINE).action is StepAction.COMMIT  # a finite step ends it
    assert decider.decide_from(NAN_ON_RANK_1).action is StepAction.SKIP
    last = decider.decide_from(NAN_ON_RANK_1)  # no rollback left
    assert (last.action, last.stop) == (StepAction.SKIP, StopReason.DIVERGED)


def test_decide_reads_the_agreed_gradient_norm_and_a_nonfinite_loss_poisons_it() -> None:
    decider = StepGuard(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        max_consecutive_nonfinite=3,
        max_rollbacks=0,
        inject_nonfinite_at=[(7, 0), (8, 1)],
    )
    one = torch.tensor(1.0)
    assert decider.decide(step=0, preempt_requested=False, loss=one, grad_norm=one).action is (
        StepAction.COMMIT
    )
    # A finite loss's backward starts from the scale: the gradients of loss × scale, to the
    # bit; a non-finite one's from NaN, so its gradients are NaN and the all-reduced gradient
    # norm tells every rank.
    weight = torch.tensor(3.0, requires_grad=True)
    (weight * 0.1 / 3).backward()
    divided, weight.grad = weight.grad, None
    loss = weight * 0.1
    loss.backward(decider.backward_seed(loss, step=0, scale=1 / 3))
    assert weight.grad is not None and torch.equal(weight.grad, divided)
    weight.grad = None
    for bad in (weight * float("inf"), weight * float("nan")):
        bad.backward(decider.backward_seed(bad, step=0, scale=0.5))
        assert weight.grad is not None and weight.grad.isnan().all()
        weight.grad = None
    half = torch.tensor(1.0, dtype=torch.bfloat16)
    assert decider.backward_seed(half, step=0, scale=0.5).dtype == torch.bfloat16
    nan_loss = decider.decide(
        step=1,
        preempt_requested=False,
        loss=torch.tensor(float("nan")),
        grad_norm=torch.tensor(float("nan")),
    )
    assert (nan_loss.action, nan_loss.nonfinite_loss_ranks) == (StepAction.SKIP, (0,))
    inf_norm = decider.decide(
        step=2, preempt_requested=True, loss=one, grad_norm=torch.tensor(float("inf"))
    )
    assert inf_norm.gradient_nonfinite and inf_norm.nonfinite_loss_ranks == ()
    assert (inf_norm.action, inf_norm.stop) == (StepAction.SKIP, StopReason.PREEMPTED)
    # Injected faults: step 7 on this rank (0), step 8 on another rank only.
    assert decider.backward_seed(one, step=7, scale=1.0).isnan()
    assert decider.backward_seed(one, step=8, scale=1.0).item() == 1.0


def test_preemption_signals_are_checked_about_every_signal_check_s() -> None:
    now = [0.0]
    decider = StepGuard(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        max_consecutive_nonfinite=3,
        max_rollbacks=1,
        signal_check_s=1.0,
        clock=lambda: now[0],
    )
    one, nan = torch.tensor(1.0), torch.tensor(float("nan"))

    def step(number: int, *, signal: bool = False, grad_norm: torch.Tensor = one) -> StepDecision:
        now[0] = number * 0.125  # seconds per step: a check every 8 steps
        return decider.decide(step=number, preempt_requested=signal, loss=one, grad_norm=grad_norm)

    assert step(0, signal=True).stop is StopReason.PREEMPTED  # the first step is a check
    assert step(1, signal=True).stop is StopReason.PREEMPTED  # no pace yet: the next step
    assert [step(n, signal=True).stop for n in range(2, 9)] == [None] * 7
    assert step(9, signal=True).stop is StopReason.PREEMPTED  # 8 steps after the last check
    assert step(10, signal=True).stop is None
    # A non-finite step is always a check, and a rollback checks at the next step.
    assert step(11, signal=True, grad_norm=nan).stop is StopReason.PREEMPTED
    decider.rolled_back(rollbacks_before=0)
    assert step(5, signal=True).stop is StopReason.PREEMPTED


def test_a_preemption_signal_only_sets_a_flag_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    signals = PreemptionSignals(["SIGUSR1", "SIGUSR2"])
    try:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first one's clock
        assert signals.requested and signals.received == "SIGUSR2"
        assert signals.received_at is not None
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


DEADLINE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from steadytrain.fault import GraceDeadline
    marker = Path(sys.argv[1])
    deadline = GraceDeadline(grace_s=float(sys.argv[2]), since=None,
                             on_expiry=lambda: marker.write_text("expired"))
    time.sleep(float(sys.argv[3]))  # the save
    deadline.cancel()
    print("saved")
    """
)


@pytest.mark.parametrize(
    ("grace", "save_seconds", "code"),
    [(0.3, 5.0, EXIT_REQUEUE), (5.0, 0.1, 0), (0.0, 0.1, EXIT_REQUEUE)],
)
def test_a_save_outliving_the_grace_ends_the_process_with_the_requeue_code(
    tmp_path: Path, grace: float, save_seconds: float, code: int
) -> None:
    marker = tmp_path / "marker"
    completed = subprocess.run(
        [sys.executable, "-c", DEADLINE_SCRIPT, str(marker), str(grace), str(save_seconds)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == code, completed.stderr
    assert marker.exists() == (code == EXIT_REQUEUE)
    assert ("saved" in completed.stdout) == (code == 0)


def test_train_state_of_version_1_loads_with_no_skips_or_rollbacks() -> None:
    state = TrainState(num_skipped_steps=3, num_rollbacks=1)
    state.load_state_dict({"version": 1, "step": 7, "samples_seen": 70, "tokens_seen": 700})
    assert state == TrainState(step=7, samples_seen=70, tokens_seen=700)
    assert TrainState().state_dict()["version"] == 2


def test_fault_plans_are_seeded_distinct_and_checked() -> None:
    plan = dict(kinds=["kill", "term", "stop", "nan"], count=6, max_steps=30, nproc=2)
    first = plan_faults(**plan, seed=7, checkpoint_every=4)  # type: ignore[arg-type]
    assert first == plan_faults(**plan, seed=7, checkpoint_every=4)  # type: ignore[arg-type]
    assert first != plan_faults(**plan, seed=8, checkpoint_every=4)  # type: ignore[arg-type]
    steps = [fault.at_step for fault in first]
    assert steps == sorted(set(steps)) and steps[0] >= 2 and steps[-1] < 29
    assert all(f.rank is not None for f in first if f.kind in ("stop", "nan"))
    with pytest.raises(ConfigError, match="unknown kind"):
        plan_faults(kinds=["meteor"], count=1, seed=0, max_steps=30, nproc=2, checkpoint_every=4)
    with pytest.raises(ConfigError, match="room for 3 faults"):
        plan_faults(kinds=["kill"], count=4, seed=0, max_steps=6, nproc=2, checkpoint_every=4)


def test_same_weights_compares_bytes(tmp_path: Path) -> None:
    for name, content in (("a", b"1"), ("b", b"1"), ("c", b"2")):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "model.safetensors").write_bytes(content)
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert not same_weights(tmp_path / "a", tmp_path / "c")
    assert not same_weights(tmp_path / "a", tmp_path / "missing")
