"""Load what a run trained, as a resume loads it: the run's own config and model factory,
weights verified (checksums where a manifest records them), never unpickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from steadytrain.checkpoint import (
    CorruptCheckpoint,
    checkpoint_name,
    checkpoint_storage,
    load_final_weights,
    read_checkpoint_part,
    step_of,
)
from steadytrain.config import (
    DEFAULT_MODEL_FACTORY,
    EXIT_CHECKPOINT_BAD,
    Config,
    ConfigError,
    UserError,
    load_config,
)
from steadytrain.model import GPT, build_model

FINAL_WEIGHTS = Path("final") / "model.safetensors"


class ServeRefused(UserError):
    """The weights asked for cannot be served: missing, corrupted, or not this model's."""

    exit_code = EXIT_CHECKPOINT_BAD


@dataclass(frozen=True)
class ServedModel:
    """A loaded model in evaluation mode on its device, and what the server needs to know."""

    model: nn.Module
    config: Config
    source: str  # where the weights came from
    step: int | None  # the checkpoint's step; None for the final weights
    device: torch.device
    causal: bool  # right-padding a row does not change its results
    generates: bool  # the default byte-level GPT: /v1/generate is served
    max_seq_len: int | None  # the longest context the model takes (None: unknown)
    vocab_size: int | None  # token ids must be below it (None: unknown)


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """``RUN_DIR/config.yaml`` with ``serve.*`` overrides applied.

    Raises:
        ConfigError: no config.yaml there, an override outside ``serve.``, or a bad value.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir}: no config.yaml; give the run directory a training run wrote (its "
            "--run-dir)"
        )
    for override in overrides:
        if not override.startswith("serve."):
            raise ConfigError(
                f"--set {override}: serve takes only serve.* settings; the model and its "
                "weights are the run's own"
            )
    # The run is where it is now (it may have been copied or moved since it was trained):
    # its default checkpoint location follows it.
    return load_config(path, overrides=[*overrides, f"run_dir={json.dumps(str(run_dir))}"])


def resolve_device(config: Config) -> torch.device:
    """``serve.device`` (auto: CUDA when present).

    Raises:
        ConfigError: cuda asked for where there is none.
    """
    wanted = config.serve.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("serve.device: cuda, but no CUDA device is visible; use auto or cpu")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def load_served_model(
    config: Config, *, run_dir: Path, checkpoint_step: int | None = None
) -> ServedModel:
    """Build the run's model and load its final weights (or checkpoint ``checkpoint_step``).

    Raises:
        ServeRefused: the weights are missing, corrupted, or do not fit the model.
        ConfigError: no committed checkpoint at ``checkpoint_step``; a bad ``serve.device``.
        FactoryError: the run's model factory cannot be called.
    """
    device = resolve_device(config)
    model = build_model(config)
    if checkpoint_step is None:
        source = str(run_dir / FINAL_WEIGHTS)
        if not (run_dir / FINAL_WEIGHTS).is_file():
            raise ServeRefused(
                f"{source}: missing, so the run has not finished; serve one of its committed "
                "checkpoints with --checkpoint STEP"
            )
        try:
            weights = load_final_weights(run_dir / FINAL_WEIGHTS)
        except CorruptCheckpoint as error:
            raise ServeRefused(f"{error}; serve a checkpoint with --checkpoint STEP") from None
    else:
        source, weights = _checkpoint_weights(config, checkpoint_step)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ServeRefused(
            f"{source}: does not fit the model {config.model.factory} builds from the run's "
            f"model.kwargs ({first_line})"
        ) from None
    model.to(device).eval()
    gpt = model if isinstance(model, GPT) else None
    causal = config.serve.causal
    return ServedModel(
        model=model,
        config=config,
        source=source,
        step=checkpoint_step,
        device=device,
        causal=(config.model.factory == DEFAULT_MODEL_FACTORY) if causal is None else causal,
        generates=config.model.factory == DEFAULT_MODEL_FACTORY and gpt is not None,
        max_seq_len=gpt.max_seq_len if gpt is not None else None,
        vocab_size=gpt.token_embedding.num_embeddings if gpt is not None else None,
    )


def check_checkpoint_exists(config: Config, step: int) -> None:
    """Refuse a step with no checkpoint at once, before anything starts.

    Raises:
        ConfigError: naming the steps there are.
    """
    storage = checkpoint_storage(config)
    names = storage.checkpoint_names()
    if checkpoint_name(step) not in names:
        steps = ", ".join(str(step_of(found)) for found in names) or "none"
        raise ConfigError(
            f"--checkpoint {step}: no checkpoint at that step in {storage.describe('')} "
            f"(steps there: {steps})"
        )


def _checkpoint_weights(config: Config, step: int) -> tuple[str, dict[str, torch.Tensor]]:
    check_checkpoint_exists(config, step)
    storage = checkpoint_storage(config)
    name = checkpoint_name(step)
    try:
        _, weights = read_checkpoint_part(storage, name, part="model")
    except CorruptCheckpoint as error:
        raise ServeRefused(
            f"checkpoint {storage.describe(name)} is not intact ({error}); serve another "
            "with --checkpoint STEP ('steadytrain checkpoints verify' lists the good ones)"
        ) from None
    except OSError as error:
        raise ServeRefused(
            f"cannot read checkpoint {storage.describe(name)} ({type(error).__name__}: "
            f"{error}); fix the cause and rerun"
        ) from None
    return storage.describe(name), weights
