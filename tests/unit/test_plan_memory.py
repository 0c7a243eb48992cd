"""The memory planner (``steadytrain plan memory``): hand-computed cases, the boundaries of
"fits", config.parallel's settings, the CLI in process, and a check against what a real
forward of the tiny default model saves for backward."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from steadytrain.cli.app import app
from steadytrain.config import ConfigError, ParallelConfig, load_config
from steadytrain.model import build_model, next_token_loss
from steadytrain.plan import GB, GPTShape, plan_memory
from steadytrain.train import build_optimizer, gpt_shape
from tests.helpers import TINY_CONFIG

SEVEN_B = 7_000_000_000
# A 7B-class model of the default GPT's architecture: 32 layers, width 4096, 32 heads,
# a 32,000-token vocabulary, 2,048 positions.
GPT_7B = GPTShape(num_layers=32, width=4096, num_heads=32, vocab_size=32_000, max_seq_len=2048)


def test_mixed_precision_adam_is_16_bytes_per_parameter_as_in_the_zero_paper() -> None:
    plan = plan_memory(SEVEN_B, world_size=64, gpu_memory_gb=80, precision="bf16")
    # steadytrain's bf16 keeps fp32 weights (4 B) and gradients (4 B) and two fp32 Adam
    # moments (8 B): 16 B per parameter, as ZeRO's 2 + 2 + 12. 7e9 × 16 B = 112 GB.
    assert (plan.ddp.parameters, plan.ddp.gradients, plan.ddp.optimizer_state) == (
        28 * GB,
        28 * GB,
        56 * GB,
    )
    assert plan.ddp.model_states == 112 * GB
    assert plan.fsdp.model_states == 112 * GB // 64 == 1_750_000_000  # 1.75 GB per rank
    # Without the model's shape: DDP's buckets (a second 28 GB of gradients) and foreach
    # Adam's sqrt(v) (28 GB) are known; activations and FSDP's gathered units are not.
    assert plan.ddp.communication_buffers == 28 * GB
    assert plan.ddp.hook_state == plan.ddp.hook_temporaries == 0  # the mean all-reduce hook
    assert plan.ddp.optimizer_temporaries == 28 * GB
    assert plan.fsdp.communication_buffers is None and plan.ddp.activations is None
    assert plan.ddp.peak == 112 * GB + 28 * GB + 28 * GB  # the optimizer step's peak
    assert plan.ddp.total == 184_800_000_000  # 168 GB × 1.1
    # FSDP: 1.75 GB + the step's 0.4375 GB of temporaries = 2.1875 GB, × 1.1 = 2.40625 GB.
    assert plan.fsdp.total == 2_406_250_000
    assert plan.recommended == "fsdp"
    assert plan.reason == (
        "recommended: fsdp (parallel.strategy: fsdp) — DDP needs at least "
        "184.8 GB per rank, more than 80 GB; FSDP needs at least 2.406 GB (activations and "
        "FSDP's gathered layers not counted: the model's shape is unknown)"
    )


def test_a_7b_gpt_with_its_shape_counts_fsdp_units_activations_and_autocast_copies() -> None:
    # Parameters: a block has 12·4096² + 13·4096 = 201,379,840; the root (two embeddings of
    # 32,000 and 2,048 rows, the final norm, the head) (2·32,000 + 2,048 + 2)·4096 = 270,540,800.
    num_params = 32 * 201_379_840 + 270_540_800
    assert GPT_7B.num_params == num_params == 6_714_695_680
    plan = plan_memory(
        num_params,
        world_size=64,
        gpu_memory_gb=80,
        precision="bf16",
        shape=GPT_7B,
        micro_batch_size=1,
        seq_len=2048,
    )
    # Activations, b·s = 2048 tokens: per block 36 B per token and width element (fp32
    # LayerNorm inputs 8, bf16 matmul inputs and intermediates 28) + 16 B per token of
    # LayerNorm statistics + 4 B per token and head of log-sum-exp = 302,284,800, × 32;
    # 8 B per position id; then at the loss (fp32, 4 B): the final LayerNorm input
    # 4·2048·4096 and statistics 8·2048, the bf16 head input 2·2048·4096, the int64 targets
    # 8·2048, and three 2048 × 32,000 tensors (log-softmax and its two gradients).
    per_block = 36 * 2048 * 4096 + 16 * 2048 + 4 * 2048 * 32
    loss_part = 6 * 2048 * 4096 + 16 * 2048 + 3 * 4 * 2048 * 32_000
    assert plan.ddp.activations == 32 * per_block + 8 * 2048 + loss_part == 10_509_926_400
    # Autocast's bf16 copies of every Linear weight: 32 · 12 · 4096² + 32,000 · 4096.
    assert plan.ddp.weight_copies == 2 * (32 * 12 * 4096**2 + 32_000 * 4096) == 13_147_045_888
    assert plan.fsdp.weight_copies == 0  # FSDP gathers bf16 weights: nothing to copy
    # FSDP per rank, bf16 (2 B): the units in flight and the activations at three moments.
    # 1. The loss's backward: the root gathered, every activation.
    root, block, head = 270_540_800, 201_379_840, 32_000 * 4096
    at_loss_moment = 2 * root + 10_509_926_400
    # 2. The last block's backward: the root, that block and the next (prefetched) gathered,
    # the head's gradient; activations: the blocks' saved tensors (9,673,129,984) and the
    # block's gradients in flight: the residual's (fp32) 4·2048·4096, fc2's weight gradient's
    # fp32 cast 4·4·4096², larger than its bf16 input and weight gradients 2·4·(2048·4096 +
    # 4096²).
    units = 2 * root + 2 * (2 * block + head)
    in_last_block = 9_673_129_984 + 4 * 2048 * 4096 + 4 * 4 * 4096**2
    # 3. The next block's: the last block's saved tensors freed, its fp32 (4 B)
    # reduce-scatter input in flight.
    in_next_block = units + 4 * block + in_last_block - per_block
    assert in_next_block > max(at_loss_moment, units + in_last_block)
    assert plan.fsdp.communication_buffers == units + 4 * block == 2_414_264_320
    assert plan.fsdp.activations == in_last_block - per_block == 9_672_835_072
    # With 16 B × 6,714,695,680 / 64 = 1,678,673,920 of states; forward and backward outweigh
    # the optimizer step's 419,668,480 of temporaries.
    assert plan.fsdp.peak == 1_678_673_920 + in_next_block == 13_765_773_312
    assert plan.fsdp.total == round(13_765_773_312 * 1.1)
    # DDP: the optimizer step (buckets + temporaries, 2 × 26.86 GB) outweighs forward and
    # backward (buckets + copies + activations).
    assert plan.ddp.peak == 16 * num_params + 2 * 4 * num_params == 161_152_696_320
    assert plan.reason == (
        "recommended: fsdp (parallel.strategy: fsdp) — DDP needs 177.3 GB per "
        "rank, more than 80 GB; FSDP needs 15.14 GB"
    )


def test_fp32_adam_on_one_process_holds_no_buckets_and_names_the_ranks_it_needs() -> None:
    plan = plan_memory(SEVEN_B, world_size=1, gpu_memory_gb=80, precision="fp32")
    # fp32 Adam: 4 + 4 + 8 = 16 B per parameter too; one process trains without DDP.
    assert plan.ddp.model_states == 112 * GB
    assert plan.ddp.communication_buffers == 0
    assert plan.ddp.weight_copies == 0  # no autocast
    assert plan.ddp.total == round((112 + 28) * GB * 1.1)  # 154 GB
    # FSDP over W ranks needs 1.1 × 140 GB / W: 77 GB at W = 2, within 80 GB.
    assert plan.fsdp_min_world_size == 2
    assert plan.recommended is None
    # Activations were not counted, so nothing is said about activation checkpointing.
    assert plan.reason == (
        "neither fits: FSDP needs at least 154 GB per rank at world size 1 (activations and "
        "FSDP's gathered layers not counted: the model's shape is unknown); use more ranks (≥ 2)"
    )


def test_ddp_is_recommended_when_it_fits() -> None:
    tiny = GPTShape(num_layers=2, width=128, num_heads=4, vocab_size=256, max_seq_len=128)
    plan = plan_memory(
        tiny.num_params, world_size=2, gpu_memory_gb=80, shape=tiny, micro_batch_size=8
    )
    # 478,720 parameters × 16 B = 7,659,520 B of states, 1,914,880 B of buckets; activations
    # (fp32, 1024 tokens): 2 blocks × 8,421,376 + 1,024 + 4,210,688 at the loss = 21,054,464.
    assert tiny.num_params == 478_720
    assert plan.ddp.activations == 21_054_464
    assert plan.ddp.total == round((7_659_520 + 1_914_880 + 21_054_464) * 1.1)
    assert plan.reason == "recommended: ddp — it needs 0.03369 GB per rank, within 80 GB"


def test_neither_fits_at_any_world_size_when_activations_alone_do_not() -> None:
    plan = plan_memory(
        GPT_7B.num_params,
        world_size=8,
        gpu_memory_gb=80,
        precision="bf16",
        shape=GPT_7B,
        micro_batch_size=64,
    )
    assert plan.ddp.activations is not None and plan.ddp.activations > 80 * GB
    assert plan.recommended is None and plan.fsdp_min_world_size is None
    assert plan.reason.startswith("neither fits: FSDP needs ")
    assert plan.reason.endswith(
        "per rank at world size 8, and more than 80 GB at any world size; use activation "
        "checkpointing or a smaller micro-batch"
    )


def test_the_fewest_ranks_named_are_the_fewest_at_which_fsdp_fits() -> None:
    settings = dict(gpu_memory_gb=24, precision="bf16", shape=GPT_7B, micro_batch_size=1)
    named = plan_memory(GPT_7B.num_params, world_size=1, **settings).fsdp_min_world_size
    assert named is not None and named > 2
    assert plan_memory(GPT_7B.num_params, world_size=named, **settings).recommended == "fsdp"
    assert plan_memory(GPT_7B.num_params, world_size=named - 1, **settings).recommended is None


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (dict(world_size=0), "world_size must be from 1 to 16,777,216, not 0"),
        (dict(gpu_memory_gb=-1.0), "GPU memory must be a positive number of GB up to 1,000,"),
        (dict(gpu_memory_gb=1e300), "GPU memory must be a positive number of GB up to"),
        (dict(gpu_memory_gb=float("nan")), "GPU memory must be a positive number of GB up to"),
        (dict(headroom=1e308), "headroom must be a number from 0 to 10"),
        (dict(headroom=-0.1), "headroom must be a number from 0 to 10"),
        (dict(micro_batch_size=2**40), "micro_batch_size must be from 1 to"),
        (dict(precision="fp16"), "precision: 'fp16' is not one of fp32, bf16"),
        (dict(shape=GPT_7B, seq_len=4096), "seq_len 4096 is not within 1 and the model's max_seq"),
    ],
)
def test_a_value_that_cannot_describe_a_run_is_refused(
    settings: dict[str, object], problem: str
) -> None:
    arguments: dict[str, object] = {"world_size": 8, "gpu_memory_gb": 80.0, **settings}
    with pytest.raises(ConfigError, match=problem):
        plan_memory(SEVEN_B, **arguments)  # type: ignore[arg-type]


def test_a_total_equal_to_the_budget_fits_and_one_byte_more_does_not() -> None:
    # fp32 on one process, shape unknown: 16 B of states + 4 B of foreach temporaries per
    # parameter, no headroom. 4e9 parameters need 80e9 B: exactly an 80 GB GPU.
    exact = plan_memory(4_000_000_000, world_size=1, gpu_memory_gb=80, headroom=0)
    assert exact.ddp.total == 80 * GB
    assert exact.recommended == "ddp"
    assert exact.reason == (
        "recommended: ddp — it needs at least 80 GB per rank, within 80 GB (activations not "
        "counted: the model's shape is unknown)"
    )
    over = plan_memory(4_000_000_001, world_size=1, gpu_memory_gb=80, headroom=0)
    assert over.ddp.total == over.fsdp.total == 80 * GB + 20
    assert over.recommended is None and over.fsdp_min_world_size == 2
    # Over the budget, the figure takes the digits that tell it from the budget.
    assert over.reason == (
        "neither fits: FSDP needs at least 80.00000002 GB per rank at world size 1 (activations "
        "and FSDP's gathered layers not counted: the model's shape is unknown); use more ranks "
        "(≥ 2)"
    )


def test_nothing_fits_at_any_world_size_without_advice_on_uncounted_activations() -> None:
    plan = plan_memory(9 * 10**17, world_size=1, gpu_memory_gb=1)
    assert plan.recommended is None and plan.fsdp_min_world_size is None
    assert plan.reason.endswith(
        "not counted: the model's shape is unknown), and more than 1 GB even at 16,777,216 "
        "ranks: the model states alone do not fit"
    )
    assert "checkpointing" not in plan.reason


TINY = GPTShape(num_layers=2, width=128, num_heads=4, vocab_size=256, max_seq_len=128)
TINY_PARAMS = 478_720
TINY_WEIGHTS = 4 * TINY_PARAMS  # 1,914,880 B: one fp32 copy of the parameters


def tiny_plan(**parallel: Any) -> Any:
    return plan_memory(
        TINY_PARAMS,
        world_size=2,
        gpu_memory_gb=80,
        shape=TINY,
        micro_batch_size=8,
        parallel=ParallelConfig(**parallel),
    )


def test_gradients_as_bucket_views_hold_no_second_copy() -> None:
    default, views = tiny_plan(), tiny_plan(gradient_as_bucket_view=True)
    assert default.ddp.communication_buffers == TINY_WEIGHTS
    assert views.ddp.communication_buffers == 0
    assert views.ddp.gradients == TINY_WEIGHTS  # the gradients themselves, in the buckets
    assert default.ddp.peak - views.ddp.peak == TINY_WEIGHTS
    assert views.fsdp == default.fsdp  # DDP's setting: FSDP is unchanged


def test_powersgd_keeps_its_error_feedback_and_factors_and_clones_buckets_in_flight() -> None:
    plan = tiny_plan(comm_hook="powersgd", powersgd_rank=1)
    # Rank 1 compresses every n×m matrix with 2·(n + m) < n·m; P and Q hold n + m each. A
    # block's qkv 384×128 (512), proj 128×128 (256), the MLP's 512×128 and 128×512 (640
    # each): 2,048, two blocks 4,096; the embeddings 256×128 and 128×128 and the head 256×128:
    # 384 + 256 + 384 = 1,024. 5,120 fp32 elements = 20,480 B, with the parameter-sized error.
    assert plan.ddp.hook_state == TINY_WEIGHTS + 20_480
    assert plan.ddp.hook_temporaries == TINY_WEIGHTS  # each bucket cloned while in flight
    # The clones peak at the end of backward, the activations (21 MB) at its start: the
    # larger of the two counts, not their sum.
    ddp = plan.ddp
    assert ddp.activations is not None and ddp.activations > ddp.hook_temporaries
    assert ddp.peak == ddp.model_states + ddp.hook_state + TINY_WEIGHTS + ddp.activations
    assert tiny_plan().ddp.peak == ddp.peak - ddp.hook_state
    # Half-precision hooks send a 2-byte copy of each bucket, and keep nothing.
    for hook in ("fp16", "bf16"):
        half = tiny_plan(comm_hook=hook).ddp
        assert (half.hook_state, half.hook_temporaries) == (0, 2 * TINY_PARAMS)
    # One process trains without DDP: no buckets, no hook.
    alone = plan_memory(
        TINY_PARAMS, world_size=1, gpu_memory_gb=80, parallel=ParallelConfig(comm_hook="powersgd")
    )
    assert (alone.ddp.communication_buffers, alone.ddp.hook_state) == (0, 0)


# The command line ---------------------------------------------------------------------------


def test_plan_memory_with_a_config_counts_the_real_models_parameters() -> None:
    args = ["plan", "memory", "--config", str(TINY_CONFIG), "--world-size", "2"]
    result = CliRunner().invoke(app, [*args, "--gpu-memory-gb", "80", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    config = load_config(TINY_CONFIG)
    built = build_model(config)  # normally, on the CPU, initialized
    assert report["num_params"] == sum(p.numel() for p in built.parameters()) == 478_720
    assert report["shape"] == {
        "num_layers": 2,
        "width": 128,
        "num_heads": 4,
        "vocab_size": 256,
        "max_seq_len": config.data.seq_len,
    }
    assert report["precision"] == config.train.precision
    assert report["micro_batch_size"] == config.train.micro_batch_size
    assert report["recommended"] == "ddp" and report["ddp"]["fits"] is True
    overridden = CliRunner().invoke(
        app, [*args, "--gpu-memory-gb", "80", "--micro-batch", "2", "--precision", "bf16"]
    )
    assert overridden.exit_code == 0, overridden.output
    assert "micro-batch 2 × 128 tokens; world size 2, bf16" in overridden.output
    assert "total (+10% headroom)" in overridden.output
    assert overridden.output.rstrip().endswith("within 80 GB")


def test_plan_memory_cli_headroom_and_parallel_settings() -> None:
    args = ["plan", "memory", "--params", "7e9", "--world-size", "64", "--gpu-memory-gb", "80"]
    result = CliRunner().invoke(app, [*args, "--headroom", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # 168 GB at DDP's peak (see above), + 25%.
    assert report["ddp"]["headroom"] == 0.25
    assert report["ddp"]["total"] == 210 * GB and report["ddp"]["fits"] is False
    shown = CliRunner().invoke(app, [*args, "--headroom", "0.25"])
    (total_row,) = [row for row in shown.stdout.splitlines() if "total (+25% headroom)" in row]
    assert total_row.split("│")[2].strip() == "210"
    config = ["plan", "memory", "--config", str(TINY_CONFIG), "--world-size", "2"]
    views = CliRunner().invoke(
        app,
        [*config, "--gpu-memory-gb", "80", "--set", "parallel.gradient_as_bucket_view=true"],
    )
    assert views.exit_code == 0, views.output
    assert "DDP comm hook allreduce, gradients as bucket views" in views.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "7e9", "--world-size", "0"], "world_size must be from 1 to"),
        (["--world-size", "8"], "give the model as --params N or"),
        (["--params", "-3", "--world-size", "8"], "--params: -3.0 is"),
        (["--params", "7e9", "--world-size", "8", "--headroom", "1e308"], "headroom must be"),
    ],
)
def test_bad_input_is_a_config_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["plan", "memory", *args, "--gpu-memory-gb", "80"])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception).startswith(message)
    huge = CliRunner().invoke(
        app, ["plan", "memory", "--params", "7e9", "--world-size", "8", "--gpu-memory-gb", "1e300"]
    )
    assert isinstance(huge.exception, ConfigError)


# Against a real forward ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_what_a_real_forward_saves_for_backward_is_what_the_plan_counts(precision: str) -> None:
    # autograd's saved-tensor hooks see every tensor forward keeps for backward: each new
    # storage once, the parameters and the batch left out. The planner's activations at the
    # loss are those plus the loss's two logits-sized gradients; under bf16 its autocast
    # weight copies are saved too. (benchmarks/memory_plan.py measures the whole peak.)
    config = load_config(TINY_CONFIG, overrides=[f"train.precision={precision}"])
    torch.manual_seed(config.seed)
    model = build_model(config)
    shape = gpt_shape(model)
    assert shape is not None
    batch = torch.randint(0, 256, (config.train.micro_batch_size, config.data.seq_len + 1))
    not_activations = {p.untyped_storage().data_ptr() for p in model.parameters()}
    not_activations.add(batch.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in not_activations:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        next_token_loss(model, batch)
    plan = plan_memory(
        sum(p.numel() for p in model.parameters()),
        world_size=1,
        gpu_memory_gb=80,
        precision=precision,
        shape=shape,
        micro_batch_size=config.train.micro_batch_size,
        seq_len=config.data.seq_len,
    )
    assert plan.ddp.activations is not None and plan.ddp.weight_copies is not None
    tokens = config.train.micro_batch_size * config.data.seq_len
    loss_gradients = 2 * 4 * tokens * shape.vocab_size
    predicted = plan.ddp.activations - loss_gradients + plan.ddp.weight_copies
    # Exact but for the loss's scalar weight total (4 bytes).
    assert 0 <= sum(saved.values()) - predicted <= 8


def test_planned_model_states_are_the_bytes_a_real_step_holds() -> None:
    config = load_config(TINY_CONFIG)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = build_optimizer(model, config.train)
    batch = torch.randint(0, 256, (config.train.micro_batch_size, config.data.seq_len + 1))
    next_token_loss(model, batch).backward()
    optimizer.step()
    plan = plan_memory(sum(p.numel() for p in model.parameters()), world_size=1, gpu_memory_gb=80)
    # Parameters, gradients and Adam's moments: exact. Adam's step counters (one 4-byte
    # scalar per parameter tensor) are not counted.
    parameters = list(model.parameters())
    assert plan.ddp.parameters == sum(p.numel() * p.element_size() for p in parameters)
    assert plan.ddp.gradients == sum(
        p.grad.numel() * p.grad.element_size() for p in parameters if p.grad is not None
    )
    states = list(optimizer.state.values())
    moments = sum(
        s[k].numel() * s[k].element_size() for s in states for k in ("exp_avg", "exp_avg_sq")
    )
    assert plan.ddp.optimizer_state == moments
    assert all(s["step"].numel() == 1 for s in states)
