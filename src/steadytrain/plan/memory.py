"""Per-rank memory of a run under DDP and FSDP2, and which of the two to use (docs/planning.md).

Pure arithmetic over what the caller supplies: the parameter count, for the default GPT its
shape (the CLI reads both from the model built on the meta device), and ``config.parallel``.
It models steadytrain as it trains:

- Parameters stay fp32: ``train.precision: bf16`` is autocast, so the parameters are the fp32
  master weights and there is no separate master copy. Gradients have the parameters' dtype;
  AdamW keeps two fp32 moments. With the weights that is 16 bytes per parameter, the
  mixed-precision Adam figure of the ZeRO paper (Rajbhandari et al. 2020: 2 + 2 + 12 there).
- DDP keeps its own flat copy of the gradients in its buckets, unless
  ``parallel.gradient_as_bucket_view`` makes the gradients views into them; a single process
  trains without DDP, and without buckets.
- DDP's communication hook (``parallel.comm_hook``, PyTorch's hooks): ``powersgd`` keeps, per
  bucket, its error feedback (gradient-sized, fp32) and its low-rank P and Q from step to
  step, and clones each bucket while it is in flight; ``fp16`` and ``bf16`` make a 2-byte
  copy of each bucket in flight. Every bucket is counted as in flight at once, the bound when
  communication falls behind backward; ``allreduce`` works in place.
- On CUDA, AdamW defaults to its foreach implementation, whose ``sqrt(v)`` intermediate is a
  parameter-sized fp32 list of tensors during the optimizer step.
- FSDP2 as it will run (``fully_shard`` on each block, then on the root; under bf16
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; a reduce-scatter every
  micro-step): fp32 parameters, gradients and Adam moments sharded evenly over the ranks
  (per-parameter padding ignored), plus the unsharded units in flight
  (``fsdp_forward_backward``). ``config.parallel`` is DDP's and does not apply.

The peak adds everything alive at once: the model states and the hook's state, then the
larger of forward/backward (communication buffers, autocast weight copies, and the larger of
the activations and the hook's copies in flight: they peak at opposite ends of backward) and
the optimizer step (DDP's buckets, the foreach temporaries). Gradients count in forward too,
as under gradient accumulation; with a single micro-step the true peak is lower by up to the
gradients. The total adds a headroom for the caching allocator's fragmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

from steadytrain.config import ConfigError, ParallelConfig
from steadytrain.plan.gpt_memory import (
    BF16,
    FP32,
    Activations,
    GPTShape,
    Precision,
    fsdp_forward_backward,
    gpt_activations,
    powersgd_factor_elements,
)

GB = 10**9  # decimal, as GPU memory is sold: an "80 GB" GPU is gpu_memory_bytes = 80 * GB
# Reserved beyond the peak for the CUDA caching allocator's fragmentation (docs/planning.md).
DEFAULT_HEADROOM = 0.10
PRECISIONS = ("fp32", "bf16")
Strategy = Literal["ddp", "fsdp"]
# The search for the fewest ranks at which FSDP fits gives up beyond this.
MAX_WORLD_SIZE = 2**24
# The ranges of a plan's inputs: wide enough for any run, and no float overflows.
MAX_PARAMS = 10**18
MAX_MICRO_BATCH = 2**31
MAX_GPU_MEMORY_GB = 10**6
MAX_HEADROOM = 10.0


@dataclass(frozen=True)
class StrategyMemory:
    """Per-rank bytes under one strategy; None where the model's shape is needed but unknown
    (``peak`` then counts it as 0: a lower bound)."""

    strategy: Strategy
    parameters: int
    gradients: int
    optimizer_state: int  # Adam's two moments (no master copy: the parameters are fp32)
    communication_buffers: int | None  # DDP's gradient buckets; FSDP's units in flight
    buffers_persist: bool  # through the optimizer step (DDP's buckets do)
    hook_state: int  # PowerSGD's error feedback and P, Q: kept from step to step
    hook_temporaries: int  # the hook's copies of the buckets in flight, in backward
    weight_copies: int | None  # autocast's bf16 copies of the matmul weights
    activations: int | None  # FSDP: those alive at its forward/backward peak
    optimizer_temporaries: int  # foreach AdamW's sqrt(v)
    headroom: float

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def complete(self) -> bool:
        """Whether every term is known (otherwise ``peak`` and ``total`` are lower bounds)."""
        return None not in (self.communication_buffers, self.weight_copies, self.activations)

    @property
    def peak(self) -> int:
        """Bytes alive at once: the model states and the hook's state, then the larger of
        forward/backward and the optimizer step."""
        buffers = self.communication_buffers or 0
        in_backward = max(self.activations or 0, self.hook_temporaries)
        forward_backward = buffers + (self.weight_copies or 0) + in_backward
        optimizer_step = (buffers if self.buffers_persist else 0) + self.optimizer_temporaries
        return self.model_states + self.hook_state + max(forward_backward, optimizer_step)

    @property
    def total(self) -> int:
        """The peak with the allocator headroom: what the GPU must hold."""
        return round(self.peak * (1 + self.headroom))

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.update(peak=self.peak, total=self.total, complete=self.complete)
        return fields


@dataclass(frozen=True)
class ModelMemory:
    """What both strategies' memory follows from, but the world size and DDP's settings."""

    num_params: int
    precision: Precision
    shape: GPTShape | None  # the default GPT's, or None (unknown)
    activations: Activations | None  # one micro-batch's, when the shape is known
    headroom: float


def ddp_memory(model: ModelMemory, *, world_size: int, parallel: ParallelConfig) -> StrategyMemory:
    """Every rank holds the whole model, its gradients (twice, unless they are views into
    the buckets), Adam's moments and what the communication hook keeps; under bf16 autocast
    also bf16 copies of the matmul weights."""
    weights, shape = FP32 * model.num_params, model.shape
    copies: int | None = 0
    if model.precision == "bf16":
        copies = BF16 * shape.matmul_weights if shape is not None else None
    distributed = world_size > 1  # a single process trains without DDP
    buckets = weights if distributed and not parallel.gradient_as_bucket_view else 0
    hook_state, hook_temporaries = (
        comm_hook_bytes(model.num_params, shape=shape, parallel=parallel) if distributed else (0, 0)
    )
    return StrategyMemory(
        strategy="ddp",
        parameters=weights,
        gradients=weights,
        optimizer_state=2 * weights,
        communication_buffers=buckets,
        buffers_persist=True,
        hook_state=hook_state,
        hook_temporaries=hook_temporaries,
        weight_copies=copies,
        activations=model.activations.peak if model.activations is not None else None,
        optimizer_temporaries=weights,
        headroom=model.headroom,
    )


def comm_hook_bytes(
    num_params: int, *, shape: GPTShape | None, parallel: ParallelConfig
) -> tuple[int, int]:
    """What DDP's communication hook holds per rank: its state kept from step to step, and
    its copies of the buckets in flight during backward (all of them: the bound).

    From PyTorch's hooks: ``fp16``/``bf16`` send ``bucket.to(dtype)``, a 2-byte copy;
    ``powersgd`` keeps a bucket-sized fp32 error per bucket and its P and Q factors, and
    clones each bucket to compute the next error. P and Q need the shape; without it they are
    left out (a few thousandths of the gradient at rank 1).
    """
    if parallel.comm_hook in ("fp16", "bf16"):
        return 0, BF16 * num_params
    if parallel.comm_hook == "powersgd":
        factors = (
            powersgd_factor_elements(shape, rank=parallel.powersgd_rank) if shape is not None else 0
        )
        return FP32 * (num_params + factors), FP32 * num_params
    return 0, 0


def fsdp_memory(model: ModelMemory, *, world_size: int) -> StrategyMemory:
    """Each rank holds 1/world_size of the fp32 weights, gradients and moments, plus the
    unsharded units in flight; the bf16 gathered weights need no autocast copies."""
    shard = -(-FP32 * model.num_params // world_size)  # rounded up
    buffers, at_peak = None, None
    if model.shape is not None and model.activations is not None:
        buffers, at_peak = fsdp_forward_backward(
            model.shape, model.activations, precision=model.precision
        )
    return StrategyMemory(
        strategy="fsdp",
        parameters=shard,
        gradients=shard,
        optimizer_state=2 * shard,
        communication_buffers=buffers,
        buffers_persist=False,
        hook_state=0,
        hook_temporaries=0,
        weight_copies=0,
        activations=at_peak,
        optimizer_temporaries=shard,
        headroom=model.headroom,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Both strategies' per-rank memory for one run, and the recommendation."""

    num_params: int
    world_size: int
    gpu_memory_bytes: int
    precision: Precision
    micro_batch_size: int
    seq_len: int | None  # None: the model's shape is unknown, so activations are too
    shape: GPTShape | None
    gradient_as_bucket_view: bool  # config.parallel's, for DDP
    comm_hook: str
    ddp: StrategyMemory
    fsdp: StrategyMemory
    recommended: Strategy | None  # None when neither fits
    reason: str  # the recommendation in one sentence
    fsdp_min_world_size: int | None  # the fewest ranks at which FSDP fits (None: none)

    def rows(self) -> list[tuple[str, int | None, int | None]]:
        """(component, DDP bytes, FSDP bytes) in the order the CLI shows them."""
        ddp, fsdp = self.ddp, self.fsdp
        return [
            ("parameters (fp32)", ddp.parameters, fsdp.parameters),
            ("gradients (fp32)", ddp.gradients, fsdp.gradients),
            ("optimizer state (Adam m, v)", ddp.optimizer_state, fsdp.optimizer_state),
            ("communication buffers", ddp.communication_buffers, fsdp.communication_buffers),
            ("comm hook state", ddp.hook_state, fsdp.hook_state),
            ("comm hook copies in flight", ddp.hook_temporaries, fsdp.hook_temporaries),
            ("autocast weight copies", ddp.weight_copies, fsdp.weight_copies),
            ("activations", ddp.activations, fsdp.activations),
            ("optimizer step temporaries", ddp.optimizer_temporaries, fsdp.optimizer_temporaries),
            ("peak", ddp.peak, fsdp.peak),
            (f"total (+{ddp.headroom:.0%} headroom)", ddp.total, fsdp.total),
        ]

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        for name, memory in (("ddp", self.ddp), ("fsdp", self.fsdp)):
            fields[name] = {**memory.to_dict(), "fits": memory.total <= self.gpu_memory_bytes}
        return fields


def plan_memory(
    num_params: int,
    *,
    world_size: int,
    gpu_memory_gb: float,
    precision: str = "fp32",
    shape: GPTShape | None = None,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    parallel: ParallelConfig | None = None,
) -> MemoryPlan:
    """Per-rank memory under DDP and FSDP for ``num_params`` parameters, and which to use.

    Args:
        gpu_memory_gb: one GPU's memory in decimal GB (what the run may use of it).
        shape: the default GPT's shape, for activations, autocast copies and FSDP's units;
            None for a model whose shape is unknown (those terms are then unknown).
        seq_len: tokens per sample (default: ``shape.max_seq_len``).
        parallel: DDP's gradient views and communication hook (default: the config's).

    Raises:
        ConfigError: for a value that cannot describe a run (one line, what to change).
    """
    checked = _checked_precision(precision)
    _check_run(num_params, world_size, micro_batch_size, gpu_memory_gb, headroom)
    parallel = parallel or ParallelConfig()
    gpu_memory_bytes = round(gpu_memory_gb * GB)
    activations: Activations | None = None
    if shape is not None:
        seq_len = _checked_seq_len(shape, seq_len)
        activations = gpt_activations(
            shape, micro_batch_size=micro_batch_size, seq_len=seq_len, precision=checked
        )

    model = ModelMemory(num_params, checked, shape, activations, headroom)
    ddp = ddp_memory(model, world_size=world_size, parallel=parallel)
    fsdp = fsdp_memory(model, world_size=world_size)
    min_ranks = _fewest_ranks(
        lambda ranks: fsdp_memory(model, world_size=ranks).total <= gpu_memory_bytes
    )
    recommended, reason = recommend(
        ddp, fsdp, gpu_memory_bytes=gpu_memory_bytes, world_size=world_size, min_ranks=min_ranks
    )
    return MemoryPlan(
        num_params=num_params,
        world_size=world_size,
        gpu_memory_bytes=gpu_memory_bytes,
        precision=checked,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len if shape is not None else None,
        shape=shape,
        gradient_as_bucket_view=parallel.gradient_as_bucket_view,
        comm_hook=parallel.comm_hook,
        ddp=ddp,
        fsdp=fsdp,
        recommended=recommended,
        reason=reason,
        fsdp_min_world_size=min_ranks,
    )


# What the recommendation says when the model's shape is unknown.
NOT_COUNTED_DDP = " (activations not counted: the model's shape is unknown)"
NOT_COUNTED_FSDP = (
    " (activations and FSDP's gathered layers not counted: the model's shape is unknown)"
)


def recommend(
    ddp: StrategyMemory,
    fsdp: StrategyMemory,
    *,
    gpu_memory_bytes: int,
    world_size: int,
    min_ranks: int | None,
) -> tuple[Strategy | None, str]:
    """The strategy to use and why, in one sentence: DDP when it fits (simpler, faster), FSDP
    when only it fits, otherwise what would make FSDP fit."""
    budget = format_gb(gpu_memory_bytes)

    def needs(memory: StrategyMemory) -> str:
        figure = format_against(memory.total, gpu_memory_bytes)
        return figure if memory.complete else f"at least {figure}"

    if ddp.total <= gpu_memory_bytes:
        unknown = "" if ddp.complete else NOT_COUNTED_DDP
        return "ddp", (
            f"recommended: ddp — it needs {needs(ddp)} per rank, within {budget}{unknown}"
        )
    unknown = "" if fsdp.complete else NOT_COUNTED_FSDP
    if fsdp.total <= gpu_memory_bytes:
        return "fsdp", (
            f"recommended: fsdp (parallel.strategy: fsdp) — DDP needs {needs(ddp)} per rank, "
            f"more than {budget}; FSDP needs {needs(fsdp)}{unknown}"
        )
    fsdp_needs = f"FSDP needs {needs(fsdp)} per rank at world size {world_size}{unknown}"
    if not fsdp.complete:  # activations were not counted: advise only on what was
        if min_ranks is not None:
            return None, f"neither fits: {fsdp_needs}; use more ranks (≥ {min_ranks})"
        return None, (
            f"neither fits: {fsdp_needs}, and more than {budget} even at {MAX_WORLD_SIZE:,} "
            "ranks: the model states alone do not fit"
        )
    if min_ranks is not None:
        return None, (
            f"neither fits: {fsdp_needs}; use more ranks (≥ {min_ranks}), activation "
            "checkpointing or a smaller micro-batch"
        )
    return None, (
        f"neither fits: {fsdp_needs}, and more than {budget} at any world size; use activation "
        "checkpointing or a smaller micro-batch"
    )


def format_gb(num_bytes: int, *, digits: int = 4) -> str:
    """``112 GB``, ``1.75 GB``, ``0.0331 GB``, ``2,048 GB``: bytes in decimal GB, to
    ``digits`` significant digits (whole GB from 1,000 on, unless more digits are asked)."""
    value = Decimal(num_bytes) / GB  # exact: GB is a power of ten
    if value >= 1000:
        decimals = max(0, digits - len(str(int(value))))
        return f"{value:,.{decimals}f} GB"
    return f"{float(value):.{digits}g} GB" if digits <= 15 else f"{value:.{digits}g} GB"


def format_against(num_bytes: int, budget: int) -> str:
    """``num_bytes`` in GB with the digits it takes for a figure over ``budget`` never to
    read as the budget itself (``80.00000002 GB``, not ``80 GB``)."""
    digits = 4
    while num_bytes > budget and format_gb(num_bytes, digits=digits) == format_gb(
        budget, digits=digits
    ):
        digits += 1
    return format_gb(num_bytes, digits=digits)


def _fewest_ranks(fits: Callable[[int], bool]) -> int | None:
    """The smallest world size at which ``fits(world_size)`` holds (it only gains with more
    ranks), or None when it fails even at ``MAX_WORLD_SIZE``."""
    if not fits(MAX_WORLD_SIZE):
        return None
    low, high = 1, MAX_WORLD_SIZE
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return low


def _checked_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return "bf16" if precision == "bf16" else "fp32"


def _check_run(
    num_params: int, world_size: int, micro_batch_size: int, gpu_memory_gb: float, headroom: float
) -> None:
    for name, value, most in (
        ("num_params", num_params, MAX_PARAMS),
        ("world_size", world_size, MAX_WORLD_SIZE),
        ("micro_batch_size", micro_batch_size, MAX_MICRO_BATCH),
    ):
        if not 1 <= value <= most:
            raise ConfigError(f"{name} must be from 1 to {most:,}, not {value}")
    if not 0 < gpu_memory_gb <= MAX_GPU_MEMORY_GB:  # False for NaN
        raise ConfigError(
            f"GPU memory must be a positive number of GB up to {MAX_GPU_MEMORY_GB:,}, not "
            f"{gpu_memory_gb:g}"
        )
    if not 0 <= headroom <= MAX_HEADROOM:
        raise ConfigError(
            f"headroom must be a number from 0 to {MAX_HEADROOM:g} (0.1: 10%), not {headroom:g}"
        )


def _checked_seq_len(shape: GPTShape, seq_len: int | None) -> int:
    seq_len = shape.max_seq_len if seq_len is None else seq_len
    if not 1 <= seq_len <= shape.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} is not within 1 and the model's max_seq_len {shape.max_seq_len}; "
            "change the sequence length or model.kwargs.max_seq_len"
        )
    return seq_len
