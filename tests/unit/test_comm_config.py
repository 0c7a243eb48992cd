"""The ``parallel`` config section: what is identity, what is refused, and what it resolves to."""

from __future__ import annotations

import pytest

from steadytrain.config import (
    ConfigError,
    batch_layout,
    identity_differences,
    identity_fields,
    identity_fingerprint,
    load_config,
    powersgd_start_step,
)
from steadytrain.distributed import check_gradient_sync
from tests.helpers import TINY_CONFIG

# Change where and when gradients are summed, not their values: operational.
OPERATIONAL = [
    "parallel.strategy=fsdp",  # where the state lives: a DDP checkpoint resumes under FSDP
    "parallel.activation_checkpointing=true",  # recomputes the same activations
    "parallel.bucket_cap_mb=1",
    "parallel.gradient_as_bucket_view=true",
    "parallel.static_graph=true",
]
# Change the gradient itself (lossy compression): identity.
IDENTITY = ["parallel.comm_hook=fp16", "parallel.powersgd_rank=4", "parallel.powersgd_start_step=5"]


@pytest.mark.parametrize("override", OPERATIONAL)
def test_bucket_view_and_static_graph_may_change_on_resume(override: str) -> None:
    base = load_config(TINY_CONFIG)
    changed = load_config(TINY_CONFIG, overrides=[override])
    assert changed != base
    assert identity_fingerprint(changed) == identity_fingerprint(base)


@pytest.mark.parametrize("override", IDENTITY)
def test_the_hook_and_powersgd_settings_are_identity(override: str) -> None:
    base = load_config(TINY_CONFIG)
    changed = load_config(TINY_CONFIG, overrides=[override])
    assert identity_fingerprint(changed) != identity_fingerprint(base)
    differences = identity_differences(identity_fields(base), identity_fields(changed))
    assert [line.partition(":")[0] for line in differences] == [override.partition("=")[0]]


def test_static_graph_with_accumulation_is_refused_in_one_line() -> None:
    config = load_config(TINY_CONFIG, overrides=["parallel.static_graph=true"])  # 32 / (2 × 8)
    with pytest.raises(ConfigError) as refused:
        check_gradient_sync(
            config.parallel, backend="gloo", layout=batch_layout(config, world_size=2)
        )
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("parallel.static_graph: ")
    assert "accumulates 2 micro-steps at 2 ranks" in message
    assert "train.micro_batch_size=16" in message


@pytest.mark.parametrize(
    "override",
    [
        "parallel.comm_hook=powersgd",
        "parallel.bucket_cap_mb=4",
        "parallel.static_graph=true",
        "parallel.gradient_as_bucket_view=true",
    ],
)
@pytest.mark.parametrize("world_size", [1, 2])
def test_ddp_settings_are_refused_under_fsdp(override: str, world_size: int) -> None:
    config = load_config(TINY_CONFIG, overrides=["parallel.strategy=fsdp", override])
    with pytest.raises(ConfigError) as refused:
        check_gradient_sync(
            config.parallel, backend="gloo", layout=batch_layout(config, world_size=world_size)
        )
    message = str(refused.value)
    field = override.partition("=")[0]
    assert "\n" not in message
    assert message.startswith(f"{field}: "), message
    assert "parallel.strategy is 'fsdp'" in message and f"remove {field}" in message, message


@pytest.mark.parametrize(
    ("overrides", "world_size"),
    [
        (["parallel.strategy=fsdp", "parallel.activation_checkpointing=true"], 2),
        (["parallel.static_graph=true", "train.micro_batch_size=16"], 2),  # no accumulation
        (["parallel.static_graph=true"], 1),  # no DDP at all
        (["parallel.comm_hook=bf16"], 2),  # gloo sums bfloat16 in torch 2.13
        (["parallel.comm_hook=powersgd"], 4),
    ],
)
def test_settings_that_work_are_accepted(overrides: list[str], world_size: int) -> None:
    config = load_config(TINY_CONFIG, overrides=overrides)
    layout = batch_layout(config, world_size=world_size)
    check_gradient_sync(config.parallel, backend="gloo", layout=layout)


def test_powersgd_starts_when_the_warmup_ends_unless_told() -> None:
    assert powersgd_start_step(load_config(TINY_CONFIG)) == 20  # train.warmup_steps
    told = load_config(TINY_CONFIG, overrides=["parallel.powersgd_start_step=0"])
    assert powersgd_start_step(told) == 0


@pytest.mark.parametrize(
    ("override", "mentions"),
    [
        ("parallel.comm_hook=int8", "'powersgd'"),
        ("parallel.bucket_cap_mb=0", "greater than 0"),
        ("parallel.powersgd_rank=0", "greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_field(override: str, mentions: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(TINY_CONFIG, overrides=[override])
    message = str(refused.value)
    assert message.startswith(override.partition("=")[0]), message
    assert mentions in message, message
