"""The memory planner against measurement: predicted and measured bytes per component, on CPU.

For a few sizes of the default GPT, in both precisions, one process trains with the project's
own model, loss and optimizer (``build_model``, ``next_token_loss``, ``build_optimizer``) in the
loop's order (forward under autocast when bf16, backward, clip, AdamW step, ``zero_grad``) and
measures, against ``plan_memory`` at world size 1 (a single process: no DDP), except where said:

- parameters, gradients, optimizer state: the bytes of those tensors (Adam's two moments; its
  scalar ``step`` counters, 4 bytes per parameter tensor, are left out and listed);
- activations: the peak of live tensor storage during a micro-batch's forward and backward
  after a first one (under gradient accumulation, as the planner counts), the parameters'
  gradients left out (they have their own row); under bf16 the planner's autocast weight
  copies are added to its activations, since they are allocated there too;
- optimizer step temporaries: the peak of new storage during a second AdamW step, with the
  foreach implementation that AdamW uses by default on CUDA (on CPU it steps tensor by tensor);
- DDP's gradient buckets: what a one-rank gloo DDP keeps beside the gradients after a
  backward (bucket sizes do not depend on the world size), against the planner at world size
  2: with ``parallel``'s defaults, and with ``gradient_as_bucket_view`` (the gradients are
  then views into the buckets: nothing beside them);
- PowerSGD's state (``parallel.comm_hook: powersgd``, rank 1, plain for the first two syncs as
  steadytrain runs it): the bytes of its error feedback and P, Q after a compressed step;
- the step's peak: model states plus the peak of new storage over a whole training step of two
  micro-batches (gradients alive during the second one's forward, as the planner assumes);
- FSDP2 at world size 4, as the planner assumes it (``fully_shard`` per block, then the root;
  bf16 gathers under bf16), in this one process over a fake process group (its collectives
  move no data; every buffer is allocated as on a real rank): one rank's shards, and its peak
  over a micro-batch after a first one and the optimizer step.

Live storage is counted with ``LiveTensorBytes``, a ``TorchDispatchMode``: every tensor an
operator returns on storage that none of its inputs had is an allocation, and a weak reference
to that storage says when it is freed; a storage resized in place (FSDP2 frees and refills
its unsharded parameters so) counts by its change in size. That sees forward, backward
(autograd runs CPU backward on the calling thread) and the optimizer alike, counts each
storage once however many views share it, and leaves out kernel-internal scratch, which on
CPU (oneDNN, flash attention's per-thread buffers) says nothing about a GPU. The headroom is
not measured: CPU has no caching allocator. Under bf16, CPU autocast differs from CUDA's in
one way that shows: it runs LayerNorm in bf16 on a bf16 input (FSDP's bf16 residual stream)
where CUDA autocast runs it in fp32 and saves an fp32 copy, which the planner counts.

    .venv/bin/python benchmarks/memory_plan.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import weakref
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from steadytrain.config import Config, ParallelConfig, config_from_dict
from steadytrain.model import build_model, next_token_loss
from steadytrain.plan import MemoryPlan, plan_memory
from steadytrain.train import build_optimizer, gpt_shape

# (name, model.kwargs, seq_len, micro_batch_size): the tiny example, a deeper one, and one
# wider than its vocabulary (its activation peak is in the last block, not at the loss).
SIZES = (
    ("tiny", {"num_layers": 2, "width": 128, "num_heads": 4}, 128, 8),
    ("deeper", {"num_layers": 4, "width": 256, "num_heads": 8}, 128, 4),
    ("wide", {"num_layers": 2, "width": 512, "num_heads": 8}, 64, 4),
)
PRECISIONS = ("fp32", "bf16")
GPU_MEMORY_GB = 80  # irrelevant to the comparison; plan_memory needs a budget
FSDP_WORLD_SIZE = 4
POWERSGD_RANK = 1


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage allocated inside it and still alive, over time.

    An operator's output whose storage is not one of its inputs' is a new allocation; it is
    freed when its storage is (a weak reference's callback). A storage resized in place
    (``UntypedStorage.resize_``, which FSDP2 uses to free and refill its unsharded
    parameters, and which no dispatch mode sees) counts by its change in size. ``peak``
    replays the record, optionally leaving out storages named by ``serials_of``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._events: list[tuple[int, int]] = []  # (storage serial, change in bytes)
        self._alive: dict[int, list[Any]] = {}  # id(storage) -> [serial, bytes counted, finalizer]
        self._num_storages = 0  # storages seen: the next one's serial
        self._resize: Any = None

    def __enter__(self) -> LiveTensorBytes:
        self._resize = original = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            before = storage.nbytes()
            result = original(storage, size)
            self._count(storage, storage.nbytes() - before)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(kind, DTensor) for kind in types):
            return NotImplemented  # DTensor runs first; its local operators come back here
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        result = func(*args, **kwargs)
        for tensor in _tensors(result):
            storage = tensor.untyped_storage()
            if id(storage) not in inputs and id(storage) not in self._alive:
                self._count(storage, storage.nbytes())
        return result

    def _count(self, storage: torch.UntypedStorage, change: int) -> None:
        key = id(storage)
        if key not in self._alive:
            if change == 0:
                return
            finalizer = weakref.finalize(storage, self._freed, key)
            self._alive[key] = [self._num_storages, 0, finalizer]
            self._num_storages += 1
        entry = self._alive[key]
        entry[1] += change
        self._events.append((entry[0], change))

    def _freed(self, key: int) -> None:
        serial, counted, _ = self._alive.pop(key)
        if counted:
            self._events.append((serial, -counted))

    def serials_of(self, tensors: Iterable[torch.Tensor | None]) -> set[int]:
        """Serials of the tracked storages under ``tensors`` (those allocated inside)."""
        keys = {id(t.untyped_storage()) for t in tensors if t is not None}
        return {entry[0] for key, entry in self._alive.items() if key in keys}

    def peak(self, *, leaving_out: AbstractSet[int] = frozenset()) -> int:
        live = peak = 0
        for serial, change in self._events:
            if serial not in leaving_out:
                live += change
                peak = max(peak, live)
        return peak

    def live(self) -> int:
        return sum(change for _, change in self._events)


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor))


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the tensors' elements; of a DTensor, this rank's shard."""
    total = 0
    for tensor in tensors:
        if tensor is not None:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            total += local.numel() * local.element_size()
    return total


def adam_moment_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of Adam's moments (exp_avg, exp_avg_sq), and of its scalar step counters."""
    moments = counters = 0
    for state in optimizer.state.values():
        moments += tensor_bytes([state["exp_avg"], state["exp_avg_sq"]])
        counters += tensor_bytes([state["step"]])
    return moments, counters


@dataclass
class Run:
    """One size and precision: the model, its optimizer, and a micro-batch maker."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    def micro_batch(self) -> torch.Tensor:
        train, data = self.config.train, self.config.data
        # Memory depends on the shapes only, so random token ids stand in for the corpus.
        return torch.randint(
            0, 256, (train.micro_batch_size, data.seq_len + 1), generator=self.generator
        )

    @contextmanager
    def autocast(self) -> Iterator[None]:
        bf16 = self.config.train.precision == "bf16"
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            yield

    def forward_backward(
        self, batch: torch.Tensor, *, accum_steps: int = 1, module: nn.Module | None = None
    ) -> None:
        with self.autocast():
            loss = next_token_loss(module or self.model, batch) / accum_steps
        loss.backward()

    def optimizer_step(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(
            self.model.parameters(), self.config.train.grad_clip, norm
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_run(
    kwargs: dict[str, int],
    *,
    seq_len: int,
    micro_batch_size: int,
    precision: str,
    fsdp_mesh: Any = None,
) -> Run:
    """The project's model and AdamW for one size; sharded with FSDP2 over ``fsdp_mesh``."""
    config = config_from_dict(
        {
            "model": {"kwargs": kwargs},
            "data": {"seq_len": seq_len},
            "train": {"micro_batch_size": micro_batch_size, "precision": precision},
        }
    )
    torch.manual_seed(config.seed)
    model = build_model(config)
    if fsdp_mesh is not None:
        shard_as_planned(model, mesh=fsdp_mesh, precision=precision)
    optimizer = build_optimizer(model, config.train)
    for group in optimizer.param_groups:
        group["foreach"] = True  # what AdamW defaults to on CUDA
    return Run(config, model, optimizer, torch.Generator().manual_seed(config.seed))


def shard_as_planned(model: nn.Module, *, mesh: Any, precision: str) -> None:
    """FSDP2 as the planner assumes it: each block, then the root; bf16 gathers under bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def plan_for(
    run: Run, *, world_size: int = 1, parallel: ParallelConfig | None = None
) -> MemoryPlan:
    shape = gpt_shape(run.model)
    assert shape is not None
    return plan_memory(
        sum(p.numel() for p in run.model.parameters()),
        world_size=world_size,
        gpu_memory_gb=GPU_MEMORY_GB,
        precision=run.config.train.precision,
        shape=shape,
        micro_batch_size=run.config.train.micro_batch_size,
        seq_len=run.config.data.seq_len,
        parallel=parallel,
    )


def measure_activations(run: Run) -> int:
    """Peak live bytes of a micro-batch's forward and backward after a first one (under
    gradient accumulation, as the planner counts), the parameters' gradients left out."""
    run.forward_backward(run.micro_batch(), accum_steps=2)
    batch = run.micro_batch()
    with LiveTensorBytes() as live:
        run.forward_backward(batch, accum_steps=2)
    return live.peak(leaving_out=live.serials_of(p.grad for p in run.model.parameters()))


def measure_step(run: Run) -> tuple[int, int]:
    """A whole step of two micro-batches, after one step has made the optimizer state: the
    peak of all live tensor bytes (states held before plus storage new inside), and the peak
    of new storage during the optimizer step alone."""
    for _ in range(2):
        run.forward_backward(run.micro_batch(), accum_steps=2)
    run.optimizer_step()
    moments, counters = adam_moment_bytes(run.optimizer)
    held = tensor_bytes(run.model.parameters()) + moments + counters
    batches = [run.micro_batch() for _ in range(2)]
    with LiveTensorBytes() as step:
        for batch in batches:
            run.forward_backward(batch, accum_steps=2)
        with LiveTensorBytes() as optimizer:
            run.optimizer_step()
    return held + step.peak(), optimizer.peak()


def wrap_ddp(run: Run, parallel: ParallelConfig) -> tuple[DistributedDataParallel, Any]:
    """DDP over the current group with ``parallel``'s settings, as ``ParallelModel`` wraps
    it, and PowerSGD as steadytrain's hook runs it (plain for its first two syncs); with
    PowerSGD's state (None for the other hooks)."""
    ddp = DistributedDataParallel(
        run.model,
        bucket_cap_mb=parallel.bucket_cap_mb,
        gradient_as_bucket_view=parallel.gradient_as_bucket_view,
    )
    state = None
    if parallel.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=parallel.powersgd_rank,
            start_powerSGD_iter=2,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp, state


@contextmanager
def group_of_one() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure_ddp_buckets(run: Run, parallel: ParallelConfig) -> int:
    """What a one-rank DDP keeps beside the gradients after a backward (bucket sizes do not
    depend on the world size): its buckets, or nothing when the gradients are views into
    them (then the gradients' own storage is the buckets')."""
    with group_of_one(), LiveTensorBytes() as live:
        ddp, _ = wrap_ddp(run, parallel)
        run.forward_backward(run.micro_batch(), module=ddp)
        gradients = tensor_bytes(p.grad for p in run.model.parameters())
        kept = live.live() - gradients
        run.optimizer.zero_grad(set_to_none=True)
        del ddp
    return kept


def measure_powersgd_state(run: Run, parallel: ParallelConfig) -> int:
    """The bytes PowerSGD's state holds after its first compressed step on a one-rank DDP:
    the error feedback and the P and Q factors of every bucket."""
    with group_of_one():
        ddp, state = wrap_ddp(run, parallel)
        for _ in range(3):  # two plain syncs, then a compressed one
            run.forward_backward(run.micro_batch(), module=ddp)
            run.optimizer.zero_grad(set_to_none=True)
        held = sum(
            tensor_bytes(memory.values())
            for memory in (state.error_dict, state.p_memory_dict, state.q_memory_dict)
        )
        del ddp
    return held


def measure_fsdp(
    kwargs: dict[str, int], *, seq_len: int, micro_batch_size: int, precision: str
) -> tuple[int, int]:
    """FSDP2 in one process over a fake process group of ``FSDP_WORLD_SIZE`` ranks (its
    collectives move no data, but every buffer is allocated as on a real rank): the bytes of
    one rank's shards (parameters, gradients, Adam's moments), and its peak over a
    micro-batch after a first one and the optimizer step (the shards plus new storage)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FSDP_WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (FSDP_WORLD_SIZE,))
        run = build_run(
            kwargs,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            precision=precision,
            fsdp_mesh=mesh,
        )
        for _ in range(2):
            run.forward_backward(run.micro_batch(), accum_steps=2)
        run.optimizer_step()  # the optimizer state exists from here on
        run.forward_backward(run.micro_batch(), accum_steps=2)
        parameters = list(run.model.parameters())
        moments, counters = adam_moment_bytes(run.optimizer)
        shards = moments + tensor_bytes([*parameters, *(p.grad for p in parameters)])
        batch = run.micro_batch()
        with LiveTensorBytes() as live:
            run.forward_backward(batch, accum_steps=2)
            run.optimizer_step()
    finally:
        dist.destroy_process_group()
    return shards, shards + counters + live.peak()


def compare(name: str, kwargs: dict[str, int], seq_len: int, micro: int, precision: str) -> dict:
    run = build_run(kwargs, seq_len=seq_len, micro_batch_size=micro, precision=precision)
    plan = plan_for(run)
    ddp = plan.ddp  # world size 1: one process, no DDP wrapper
    activations = measure_activations(run)
    gradients = tensor_bytes(p.grad for p in run.model.parameters())
    run.optimizer_step()
    moments, counters = adam_moment_bytes(run.optimizer)
    step_peak, step_temporaries = measure_step(run)
    buckets = measure_ddp_buckets(run, ParallelConfig())
    views = ParallelConfig(gradient_as_bucket_view=True)
    bucket_views = measure_ddp_buckets(run, views)
    powersgd = ParallelConfig(comm_hook="powersgd", powersgd_rank=POWERSGD_RANK)
    powersgd_state = measure_powersgd_state(run, powersgd)
    rows = {
        "parameters": (ddp.parameters, tensor_bytes(run.model.parameters())),
        "gradients": (ddp.gradients, gradients),
        "optimizer state": (ddp.optimizer_state, moments),
        "activations": ((ddp.activations or 0) + (ddp.weight_copies or 0), activations),
        "optimizer step temporaries": (ddp.optimizer_temporaries, step_temporaries),
        "DDP buckets (world size 2)": (
            plan_for(run, world_size=2).ddp.communication_buffers,
            buckets,
        ),
        "DDP buckets, gradient views": (
            plan_for(run, world_size=2, parallel=views).ddp.communication_buffers,
            bucket_views,
        ),
        f"PowerSGD state (rank {POWERSGD_RANK})": (
            plan_for(run, world_size=2, parallel=powersgd).ddp.hook_state,
            powersgd_state,
        ),
        "step peak": (ddp.peak, step_peak),
    }
    fsdp = plan_for(run, world_size=FSDP_WORLD_SIZE).fsdp
    shards, fsdp_peak = measure_fsdp(
        kwargs, seq_len=seq_len, micro_batch_size=micro, precision=precision
    )
    rows[f"FSDP states (world size {FSDP_WORLD_SIZE})"] = (fsdp.model_states, shards)
    rows[f"FSDP step peak (world size {FSDP_WORLD_SIZE})"] = (fsdp.peak, fsdp_peak)
    return {
        "name": name,
        "precision": precision,
        "kwargs": kwargs,
        "seq_len": seq_len,
        "micro_batch_size": micro,
        "num_params": plan.num_params,
        "adam_step_counter_bytes": counters,
        "rows": {
            row: {
                "predicted": predicted,
                "measured": measured,
                "error": _error(predicted, measured),
            }
            for row, (predicted, measured) in rows.items()
        },
    }


def _error(predicted: int | None, measured: int) -> float | None:
    if predicted is None or measured == 0:
        return None
    return (predicted - measured) / measured


ROW = "{:<8} {:<5} {:<28} {:>13} {:>12} {:>8}"


def print_table(results: list[dict]) -> None:
    print(ROW.format("model", "prec", "component", "predicted MB", "measured MB", "error"))
    for result in results:
        for row, values in result["rows"].items():
            error = f"{values['error']:+.2%}" if values["error"] is not None else "-"
            predicted, measured = values["predicted"] / 1e6, values["measured"] / 1e6
            print(
                ROW.format(
                    result["name"],
                    result["precision"],
                    row,
                    f"{predicted:.3f}",
                    f"{measured:.3f}",
                    error,
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Write every measured number here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = [
        compare(name, kwargs, seq_len, micro, precision)
        for name, kwargs, seq_len, micro in SIZES
        for precision in PRECISIONS
    ]
    print_table(results)
    seconds = time.perf_counter() - started
    print(
        f"\n{len(results)} runs in {seconds:.0f} s; torch {torch.__version__}, {platform.machine()}"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
