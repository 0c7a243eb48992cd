"""``train.compile``: operational, refused where it cannot work, and names left unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steadytrain.config import ConfigError, identity_fingerprint, load_config
from steadytrain.distributed import check_compile
from steadytrain.distributed.compiling import compile_in_place
from steadytrain.model import build_model
from tests.helpers import TINY_CONFIG


def test_compile_is_operational() -> None:
    base = load_config(TINY_CONFIG)
    compiled = load_config(TINY_CONFIG, overrides=["train.compile=true"])
    assert compiled.train.compile and not base.train.compile
    assert identity_fingerprint(compiled) == identity_fingerprint(base)


def test_compile_with_activation_checkpointing_is_refused_in_one_line() -> None:
    config = load_config(
        TINY_CONFIG, overrides=["train.compile=true", "parallel.activation_checkpointing=true"]
    )
    with pytest.raises(ConfigError) as refused:
        check_compile(config, device_type="cpu")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("train.compile: "), message
    assert "parallel.activation_checkpointing" in message
    # Either alone is fine.
    check_compile(load_config(TINY_CONFIG, overrides=["train.compile=true"]), device_type="cpu")
    eager = ["parallel.activation_checkpointing=true"]
    check_compile(load_config(TINY_CONFIG, overrides=eager), device_type="cpu")


def test_compile_on_cpu_without_a_cpp_compiler_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(TINY_CONFIG, overrides=["train.compile=true"])
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without c++, g++ or clang++
    with pytest.raises(ConfigError, match=r"^train\.compile: on CPU .* no C\+\+ compiler"):
        check_compile(config, device_type="cpu")
    check_compile(config, device_type="cuda")  # inductor generates Triton there


def test_compiling_in_place_keeps_every_name() -> None:
    config = load_config(TINY_CONFIG)
    model = build_model(config)
    names = list(model.state_dict())
    assert compile_in_place(model) is model  # graphs are built at the first call, not here
    assert list(model.state_dict()) == names
    assert [name for name, _ in model.named_parameters()] == names
    # What compile_in_place avoids: the wrapper torch.compile returns renames everything.
    wrapped = torch.compile(build_model(config))
    assert list(wrapped.state_dict()) == [f"_orig_mod.{name}" for name in names]
