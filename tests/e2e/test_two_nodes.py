"""A two-node job simulated on one machine: one node's agent killed and started again.

Two ``torchrun`` agents (one per "node", one worker each) meet through a c10d rendezvous on
loopback and train into one run directory, as two hosts on a shared file system would. Node 1
is lost by ``kill -9`` (its agent and its worker: torchrun sets no parent-death signal, so a
killed agent's worker would train on) and started again with the same command line, as a
scheduler would. The surviving agent sees its worker's collective fail, restarts it, and the
two agents form a new group that resumes from the newest good checkpoint and finishes with
the weights of an uninterrupted run.

The torchrun options that matter, and why (timings measured on 2 busy cores):

- ``--rdzv-conf is_host=true`` on node 0 and ``is_host=false`` on node 1: on one machine both
  agents match the endpoint's address, so without it whichever binds the port first hosts the
  rendezvous store. The store lives in the hosting agent, so the node that is killed must not
  be the one hosting it: losing that node ends the job in any c10d setup.
- ``--local-addr 127.0.0.<node + 1>``: the rendezvous gives ranks in the sorted order of
  (address, agent pid), and pids wrap (pid_max is 32768 here: a restarted agent got pid 1536
  against the survivor's 31566, and would have become rank 0); distinct addresses keep node 0
  rank 0 in every round, as distinct hosts would. Rank 0 publishes its address as the
  workers' ``MASTER_ADDR``. (``--node-rank`` would not help: only the static rendezvous reads
  it.)
- ``keep_alive_interval=1,keep_alive_max_attempt=2``: the killed agent stays a participant of
  the finished round until its heartbeat is 2 s old (15 s with the defaults, 5 s x 3), and no
  new round starts before then: the survivor's rendezvous took 11 s with the defaults, 7 s
  (the replacement agent's start-up) with these.
- ``join_timeout=60``: how long an agent waits for the other node in a new round before it
  gives up (default 600 s); bounds the test when recovery fails. ``last_call_timeout`` plays
  no part: with ``--nnodes 2`` (min = max) a round completes as soon as both have joined.
- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: without it (pytorch issue #135712) the replacement
  agent, joining in round 1, waits for round 1's ``MASTER_ADDR`` key, which the surviving
  rank-0 agent never writes (it reuses round 0's); both agents fail after the store's 60 s
  read timeout.
- ``--max-restarts 3``: the surviving agent spends one restart on the failed group.
- ``dist.cpu_threads=1`` (a steadytrain setting, in both runs): threads default to cores /
  local ranks, so one rank per node computes with twice the threads of ``--nproc 2`` and the
  weights differ in the last bits (the loss first at step 9); with equal threads the two
  launches are bit-identical.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.jobs import (
    assert_audit_ok,
    checkpoint_overrides,
    final_weights,
    train,
)
from tests.helpers import (
    REPO,
    TINY_CONFIG,
    as_set_args,
    cli_env,
    events,
    free_port,
    wait_for_step,
)

pytestmark = pytest.mark.slow
NUM_NODES = 2
KILL_AT_STEP = 6  # past the first checkpoint (every 4 steps), well before the last (24)
RDZV_TIMEOUTS = "keep_alive_interval=1,keep_alive_max_attempt=2,join_timeout=60"
FINISH_TIMEOUT_S = 120


class Node:
    """One simulated host: a torchrun agent with one worker, logging to ``LOG_DIR``."""

    def __init__(self, *, node_rank: int, command: list[str], log_dir: Path) -> None:
        self.node_rank = node_rank
        self.command = command
        self.log_dir = log_dir
        self.agents: list[subprocess.Popen[str]] = []

    @property
    def agent(self) -> subprocess.Popen[str]:
        return self.agents[-1]

    def start(self) -> None:
        log = self.log_dir / f"node{self.node_rank}-agent{len(self.agents)}.log"
        with log.open("w") as output:
            self.agents.append(
                subprocess.Popen(
                    self.command,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
                    cwd=REPO,
                )
            )

    def fail(self) -> None:
        """Lose the node as a host is lost: ``kill -9`` its agent and its worker."""
        children = Path(f"/proc/{self.agent.pid}/task/{self.agent.pid}/children")
        workers = [int(pid) for pid in children.read_text().split()]
        assert workers, f"node {self.node_rank}'s agent has no worker to kill"
        self.agent.kill()  # first, so that it cannot restart the worker
        self.agent.wait()
        for worker in workers:  # each leads its own session (torchrun's doing), with its children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker, signal.SIGKILL)

    def output(self) -> str:
        return "\n".join(
            f"--- {log.name}:\n{log.read_text()[-4000:]}"
            for log in sorted(self.log_dir.glob(f"node{self.node_rank}-agent*.log"))
        )


def agent_command(
    *, node_rank: int, port: int, run_id: str, run_dir: Path, overrides: list[str]
) -> list[str]:
    """The command line a scheduler runs on node ``node_rank``, the same on every start."""
    is_host = "true" if node_rank == 0 else "false"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={NUM_NODES}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={is_host},{RDZV_TIMEOUTS}",
        f"--local-addr=127.0.0.{node_rank + 1}",
        "--max-restarts=3",
        "-m",
        "steadytrain",
        "train",
        str(TINY_CONFIG),
        "--run-dir",
        str(run_dir),
        *as_set_args(overrides),
    ]


def kill_everything_of(run_id: str, nodes: list[Node]) -> None:
    """Kill -9 every agent, then every worker of ``run_id`` (torchrun tags them with it)."""
    for node in nodes:
        for agent in node.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    tag = f"TORCHELASTIC_RUN_ID={run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)


def test_one_node_killed_and_restarted_resumes_bit_identical(
    text_corpus: Path, data_cache: Path, tmp_path: Path
) -> None:
    overrides = [*checkpoint_overrides(text_corpus, data_cache), "dist.cpu_threads=1"]
    reference = tmp_path / "reference"
    uninterrupted = train(reference, overrides)
    assert uninterrupted.returncode == 0, uninterrupted.output

    run_dir = tmp_path / "run"
    run_id = f"two-nodes-{uuid.uuid4().hex[:8]}"
    port = free_port()
    nodes = [
        Node(
            node_rank=node_rank,
            command=agent_command(
                node_rank=node_rank,
                port=port,
                run_id=run_id,
                run_dir=run_dir,
                overrides=overrides,
            ),
            log_dir=tmp_path,
        )
        for node_rank in range(NUM_NODES)
    ]
    host, victim = nodes
    try:
        for node in nodes:
            node.start()
        wait_for_step(run_dir, KILL_AT_STEP, host.agent)
        killed_at = time.time()
        victim.fail()
        assert not (run_dir / "final").exists(), "the run finished before the kill"
        victim.start()
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        for node in nodes:
            try:
                node.agent.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {node.node_rank} still running after {FINISH_TIMEOUT_S} s")
    finally:
        kill_everything_of(run_id, nodes)

    codes = [node.agent.returncode for node in nodes]
    assert codes == [0] * NUM_NODES, "\n".join([f"exit codes {codes}", *map(Node.output, nodes)])
    resumed = [event for event in events(run_dir, "resume") if event["time"] > killed_at]
    assert resumed, "no resume after the kill"
    saved_before = [
        event["step"]
        for event in events(run_dir, "checkpoint_saved")
        if event["time"] < resumed[0]["time"]
    ]
    assert resumed[0]["step"] == max(saved_before), (resumed, saved_before)
    assert resumed[0]["world_size"] == NUM_NODES, resumed
    assert final_weights(run_dir) == final_weights(reference)
    assert_audit_ok(run_dir)
