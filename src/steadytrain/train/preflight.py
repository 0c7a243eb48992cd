"""Check a config for a given world size without training (``validate``, and ``--nproc``)."""

from __future__ import annotations

from pathlib import Path

import torch

from steadytrain.config import (
    Config,
    batch_layout,
    identity_fingerprint,
    powersgd_start_step,
    resolve_callable,
)
from steadytrain.data import (
    GlobalPositionSampler,
    TokenWindowDataset,
    build_datasets,
    ensure_corpus,
    is_prepared,
    is_remote,
    prepared_corpus_dir,
    read_index,
    resolve_source_files,
    sample_order,
)
from steadytrain.distributed import check_compile, check_gradient_sync, planned_backend
from steadytrain.model import build_model, resolve_loss_fn


def preflight(config: Config, *, world_size: int, prepare_corpus: bool) -> list[str]:
    """Everything that can be checked before workers start; returns a description of the plan.

    The model is built on the meta device, so this is cheap for any model size.

    Raises:
        UserError: the first problem found, as one line naming the field and the fix.
    """
    layout = batch_layout(config, world_size=world_size)
    check_gradient_sync(config.parallel, backend=planned_backend(config), layout=layout)
    check_compile(config, device_type="cuda" if planned_backend(config) == "nccl" else "cpu")
    with torch.device("meta"):
        model = build_model(config)
    resolve_loss_fn(config)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    lines = [
        f"identity fingerprint {identity_fingerprint(config)}",
        f"model {config.model.factory}: {num_params:,} parameters",
        f"batch: {world_size} rank(s) × {layout.micro_batch_size} micro-batch × "
        f"{layout.grad_accum_steps} accumulation = {layout.global_batch_size} samples per step",
        _gradient_sync_line(config, world_size=world_size),
    ]
    lines.append(
        _check_data(
            config, global_batch_size=layout.global_batch_size, prepare_corpus=prepare_corpus
        )
    )
    return lines


def _gradient_sync_line(config: Config, *, world_size: int) -> str:
    parallel = config.parallel
    checkpointing = ", activation checkpointing" if parallel.activation_checkpointing else ""
    if world_size == 1:
        if checkpointing:  # it applies to one process as well
            return "gradient sync: none with 1 rank (the other parallel settings apply from 2)" + (
                checkpointing
            )
        return "gradient sync: none with 1 rank (the parallel settings apply from 2)"
    if parallel.strategy == "fsdp":
        precision = (
            "bf16 parameters, fp32 reduction" if config.train.precision == "bf16" else "fp32"
        )
        return (
            f"gradient sync: FSDP2, parameters, gradients and optimizer state sharded over "
            f"{world_size} ranks, reduce-scatter, {precision}{checkpointing}"
        )
    hook = {
        "allreduce": "mean all-reduce",
        "fp16": "fp16-compressed all-reduce",
        "bf16": "bf16-compressed all-reduce",
        "powersgd": f"PowerSGD rank {parallel.powersgd_rank} from step "
        f"{powersgd_start_step(config)}",
    }[parallel.comm_hook]
    buckets = (
        "25 MiB buckets (1 MiB first)"
        if parallel.bucket_cap_mb is None
        else f"{parallel.bucket_cap_mb:g} MiB buckets"
    )
    extras = [
        name
        for name, enabled in (
            ("gradients as bucket views", parallel.gradient_as_bucket_view),
            ("static graph", parallel.static_graph),
        )
        if enabled
    ]
    return "gradient sync: DDP, " + ", ".join([hook, buckets, *extras]) + checkpointing


def _check_data(config: Config, *, global_batch_size: int, prepare_corpus: bool) -> str:
    data = config.data
    if data.dataset_factory is not None:
        resolve_callable(data.dataset_factory, field="data.dataset_factory")
        return f"data: dataset factory {data.dataset_factory}"
    if data.sources is not None:
        datasets = build_datasets(config)
        sampler = GlobalPositionSampler(
            num_samples=len(datasets.train),  # type: ignore[arg-type]
            global_batch_size=global_batch_size,
            seed=config.seed,
            order=sample_order(data, datasets.train),
        )
        return f"data: {datasets.description}; {sampler.steps_per_epoch} steps per epoch"
    directory = prepared_corpus_dir(data)
    if prepare_corpus or is_remote(data.corpus):  # a remote corpus: only its index is read
        index = ensure_corpus(data)
    elif is_prepared(directory):
        index = read_index(directory)
    else:
        _, files = resolve_source_files(data.corpus)
        return f"data: {len(files)} source files in {data.corpus!r}, prepared at first use"
    train = TokenWindowDataset(index, split="train", seq_len=data.seq_len)
    sampler = GlobalPositionSampler(
        num_samples=len(train),
        global_batch_size=global_batch_size,
        seed=config.seed,
        order=sample_order(data, train),
    )
    where = Path(index.directory) if index.url is None else f"{index.url} (streamed)"
    window = (
        ""
        if data.shuffle_window_shards is None
        else (
            f", shuffled within windows of {data.shuffle_window_shards} of "
            f"{len(train.shards)} shards"
        )
    )
    return (
        f"data: {len(train):,} samples in {where}; "
        f"{sampler.steps_per_epoch} steps per epoch, tail of {sampler.tail_size}{window}"
    )
