"""Typed configuration: every field validated at load time, each with a one-line description.

Fields are either *identity* fields, which change the math of a run (model shape, data,
seed, global batch, optimizer) and must match for a checkpoint to be restored, or
*operational* ones (logging, intervals, world size with the same global batch) that may
change between restarts. ``identity_field`` marks the former.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from steadytrain.config.errors import ConfigError

DEFAULT_MODEL_FACTORY = "steadytrain.model.gpt:build_gpt"


def identity_field(default: Any = ..., *, description: str, **constraints: Any) -> Any:
    """A field that is part of the run's identity (changes the math)."""
    return Field(
        default, description=description, json_schema_extra={"identity": True}, **constraints
    )


def operational_field(default: Any = ..., *, description: str, **constraints: Any) -> Any:
    """A field that may change between restarts of the same run."""
    return Field(default, description=description, **constraints)


REDACTED = "<redacted>"
SECRET_KEY_PARTS = ("key", "secret", "token", "password", "credential", "session")


def redact_secrets(value: Any) -> Any:
    """``value`` with every entry whose name looks secret replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {
            name: REDACTED
            if any(part in str(name).lower() for part in SECRET_KEY_PARTS)
            else redact_secrets(entry)
            for name, entry in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(entry) for entry in value]
    return value


def usable_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options minus redacted entries (read back from a saved config.yaml), so the
    environment's credentials apply instead."""
    usable: dict[str, Any] = {}
    for name, entry in options.items():
        if entry == REDACTED:
            continue
        usable[name] = usable_storage_options(entry) if isinstance(entry, dict) else entry
    return usable


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Section):
    factory: str = identity_field(
        DEFAULT_MODEL_FACTORY,
        description="'pkg.module:function' returning an nn.Module: (batch, seq) ids -> logits.",
        min_length=3,
    )
    kwargs: dict[str, Any] = identity_field(
        {"num_layers": 2, "width": 128, "num_heads": 4},
        description="Keyword arguments passed to the model factory.",
    )


class SourceConfig(_Section):
    corpus: str = identity_field(
        ..., description="A prepared shard directory or its object store URL.", min_length=1
    )
    weight: float = identity_field(1.0, description="Share of each epoch, relative.", gt=0)


class DataConfig(_Section):
    corpus: str = identity_field(
        "stdlib",
        description="'stdlib', a folder or glob of text files, a prepared shard directory, or "
        "the URL of one in an object store (s3://bucket/prefix).",
        min_length=1,
    )
    seq_len: int = identity_field(128, description="Tokens per training sample.", gt=1)
    val_fraction: float = identity_field(
        0.02, description="Share of corpus files held out for validation.", ge=0.0, lt=1.0
    )
    max_corpus_bytes: int | None = identity_field(
        None, description="Cap on raw bytes read when preparing a corpus (None: all).", gt=0
    )
    dataset_factory: str | None = identity_field(
        None,
        description="'pkg.module:function(split=..., **dataset_kwargs)' returning a map-style "
        "Dataset; replaces the token shards.",
    )
    dataset_kwargs: dict[str, Any] = identity_field(
        {}, description="Keyword arguments passed to the dataset factory."
    )
    sources: list[SourceConfig] | None = identity_field(
        None,
        description="A weighted mixture of prepared corpora, [{corpus, weight}], instead of "
        "data.corpus; the ledger and audit report each source.",
        min_length=1,
    )
    shuffle_window_shards: int | None = identity_field(
        None,
        description="Shuffle shards, then samples within windows of this many shards (None: "
        "one global permutation); a small window lets a streamed corpus use a small cache.",
        gt=0,
    )
    cache_dir: str = operational_field(
        "~/.cache/steadytrain/data",
        description="Where corpora prepared on the fly are kept, and shards streamed from an "
        "object store are cached (shareable by several runs).",
    )
    cache_limit_gb: float = operational_field(
        20.0,
        description="Streamed shards kept in data.cache_dir at most; least recently used ones "
        "are evicted, never those of the current or next step.",
        gt=0,
    )
    prefetch_shards: int = operational_field(
        4,
        description="Streamed shards fetched ahead of use, in the order the sampler reads them.",
        ge=0,
    )
    fetch_attempts: int = operational_field(
        5, description="Tries per shard download before a transient error is final.", ge=1
    )
    num_workers: int = operational_field(
        0, description="DataLoader worker processes per rank (0: load in the trainer).", ge=0
    )
    read_ahead: Literal["auto", "always", "never"] = operational_field(
        "auto",
        description="With no workers, read the next step's micro-batches in a background "
        "thread while a step trains (the token datasets). auto: on CUDA, where the host is "
        "free while the device computes; not on CPU, where training uses every core and the "
        "thread would compete with it.",
    )
    ledger: bool = operational_field(
        False, description="Record every committed step's consumed samples under RUN_DIR/ledger."
    )

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> DataConfig:
        if self.sources is None:
            return self
        if self.dataset_factory is not None:
            raise ValueError("data.sources and data.dataset_factory: give one of them")
        if self.corpus != "stdlib":
            raise ValueError(
                "data.sources and data.corpus: give one of them (a mixture lists its corpora "
                "in data.sources)"
            )
        if self.shuffle_window_shards is not None:
            raise ValueError(
                "data.sources and data.shuffle_window_shards: give one of them (a mixture has "
                "no windowed shuffle yet)"
            )
        return self


class TrainConfig(_Section):
    max_steps: int = identity_field(200, description="Optimizer steps to train for.", gt=0)
    global_batch_size: int = identity_field(
        32, description="Samples per optimizer step across all ranks and micro-steps.", gt=0
    )
    micro_batch_size: int = operational_field(
        8, description="Samples per rank per forward pass; accumulation fills the rest.", gt=0
    )
    lr: float = identity_field(3e-3, description="Peak learning rate.", gt=0)
    min_lr_ratio: float = identity_field(
        0.1, description="Final learning rate as a fraction of the peak.", ge=0, le=1
    )
    warmup_steps: int = identity_field(20, description="Linear warmup steps.", ge=0)
    weight_decay: float = identity_field(0.1, description="AdamW weight decay for matrices.", ge=0)
    betas: tuple[float, float] = identity_field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = identity_field(
        1.0, description="Clip the global gradient norm to this value (0: off).", ge=0
    )
    precision: Literal["fp32", "bf16"] = identity_field(
        "fp32", description="'bf16' runs forward/backward under bfloat16 autocast."
    )
    loss_fn: str | None = identity_field(
        None,
        description="'pkg.module:function(model, batch) -> mean loss'; default: next-token "
        "cross-entropy.",
    )
    compile: bool = operational_field(
        False,
        description="Compile the model with torch.compile, in place before DDP or FSDP wraps "
        "it (parameter names and checkpoints stay an eager run's); the first step compiles, "
        "within fault.hang_warmup_s. Not with parallel.activation_checkpointing.",
    )
    eval_every: int = operational_field(
        0, description="Validation loss every N steps (0: only at the end).", ge=0
    )
    eval_batches: int = operational_field(
        4, description="Micro-batches per rank in each validation pass (0: no validation).", ge=0
    )


class CheckpointConfig(_Section):
    every_steps: int = operational_field(
        0, description="Save a checkpoint every N steps (0: checkpointing off).", ge=0
    )
    at_end: bool = operational_field(
        True, description="Also save when training finishes (if every_steps > 0)."
    )
    uri: str | None = operational_field(
        None,
        description="Where checkpoints go: a local path or an fsspec URL such as "
        "s3://bucket/prefix (None: RUN_DIR/checkpoints).",
    )
    storage_options: dict[str, Any] = operational_field(
        {},
        description="fsspec options for checkpoint.uri (e.g. {client_kwargs: {endpoint_url: "
        "...}}); secrets here are redacted from every file steadytrain writes.",
        json_schema_extra={"secret": True},
    )
    max_attempts: int = operational_field(
        5, description="Tries per storage operation before a transient error is final.", ge=1
    )
    keep_last: int = operational_field(
        3, description="Keep the newest K checkpoints; older ones are deleted.", ge=1
    )
    async_save: bool = operational_field(
        False, description="Write checkpoints in the background; training blocks only to copy."
    )
    keep_every: int = operational_field(
        0, description="Also keep every checkpoint whose step is a multiple of M (0: none).", ge=0
    )

    @field_validator("uri")
    @classmethod
    def _no_secret_in_uri(cls, uri: str | None) -> str | None:
        # The URI is saved with the config and every manifest; a secret in it would be too.
        if uri is None or "://" not in uri:
            return uri
        parts = urlsplit(uri)
        secret_parameters = [
            name
            for name in parse_qs(parts.query, keep_blank_values=True)
            if any(part in name.lower() for part in (*SECRET_KEY_PARTS, "sig"))
        ]
        if parts.password is not None or secret_parameters:
            what = "a password" if parts.password is not None else "a signature or token"
            raise ValueError(
                f"holds {what}, which would be saved with the config; give credentials "
                "in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or in "
                "checkpoint.storage_options instead"
            )
        return uri


class LogConfig(_Section):
    every_steps: int = operational_field(
        10, description="Write metrics (and a console line) every N steps.", gt=0
    )
    console: bool = operational_field(
        True, description="Show progress on rank 0: a bar in a terminal, lines otherwise."
    )


class DistConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = operational_field(
        "auto", description="Collective backend; 'auto' is NCCL on CUDA, gloo on CPU."
    )
    cpu_threads: int | None = operational_field(
        None, description="Torch threads per process on CPU (None: cores / local ranks).", gt=0
    )
    timeout_s: float = operational_field(
        600.0, description="Seconds a collective may wait before failing.", gt=0
    )


class ParallelConfig(_Section):
    """How ranks share the model (docs/scaling.md): DDP or FSDP2, and DDP's gradient sync.

    The strategy, activation checkpointing, bucket size, gradient views and the static graph
    change where the state lives and when gradients are summed, not their values:
    operational. The communication hook and PowerSGD's settings change the gradient every
    step (lossy compression): identity, like ``train.precision``.
    """

    strategy: Literal["ddp", "fsdp"] = operational_field(
        "ddp",
        description="'ddp': every rank holds the whole model and optimizer, gradients are "
        "all-reduced; 'fsdp': PyTorch's FSDP2 (fully_shard) shards parameters, gradients and "
        "optimizer state across ranks, each block gathered only while it computes.",
    )
    activation_checkpointing: bool = operational_field(
        False,
        description="Keep only each block's input from forward and recompute the rest in "
        "backward: less activation memory for about one more forward pass of compute.",
    )
    bucket_cap_mb: float | None = operational_field(
        None,
        description="DDP gradient bucket size in MiB: smaller buckets start all-reducing "
        "earlier in backward, larger ones send fewer messages (None: DDP's default, 25 MiB "
        "with a 1 MiB first bucket).",
        gt=0,
    )
    gradient_as_bucket_view: bool = operational_field(
        False,
        description="Make gradients views into DDP's all-reduce buckets instead of separate "
        "tensors beside them: one gradient-sized buffer less from backward to the optimizer.",
    )
    static_graph: bool = operational_field(
        False,
        description="Tell DDP the set of parameters used and the autograd graph never change "
        "between steps; refused with gradient accumulation (torch 2.13 fails under no_sync).",
    )
    comm_hook: Literal["allreduce", "fp16", "bf16", "powersgd"] = identity_field(
        "allreduce",
        description="How each bucket is reduced (PyTorch's DDP hooks): 'allreduce' (mean, "
        "exact), 'fp16' / 'bf16' (cast to half precision for the all-reduce: lossy), "
        "'powersgd' (low-rank compression with error feedback: lossy).",
    )
    powersgd_rank: int = identity_field(
        1,
        description="PowerSGD's matrix approximation rank: lower sends less and approximates "
        "more (PyTorch advises 1, then 2, 4, ... until the loss is good enough).",
        ge=1,
    )
    powersgd_start_step: int | None = identity_field(
        None,
        description="First step PowerSGD compresses; earlier steps all-reduce in full "
        "precision (None: when the learning-rate warmup ends, train.warmup_steps).",
        ge=0,
    )


class FaultConfig(_Section):
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = operational_field(
        ["SIGTERM", "SIGUSR1"],
        description="Signals that ask every rank to checkpoint at the next signal check and "
        "exit 75.",
    )
    signal_check_s: float = operational_field(
        1.0,
        description="About how many seconds of training between two checks where the ranks "
        "agree on preemption signals (every step when steps take longer; 0: every step). A "
        "signal is acted on at the first check after it, so keep this well below "
        "preempt_grace_s.",
        ge=0,
    )
    preempt_grace_s: float = operational_field(
        60.0,
        description="Seconds after a preemption signal within which the save must finish; "
        "past it the process exits and the previous checkpoint stays the newest good one.",
        gt=0,
    )
    max_consecutive_nonfinite: int = operational_field(
        3,
        description="Non-finite steps skipped in a row before rolling back to the last good "
        "checkpoint.",
        ge=1,
    )
    max_rollbacks: int = operational_field(
        3, description="Rollbacks in one run before it stops as diverged (exit 5).", ge=0
    )
    inject_nonfinite_at: list[tuple[int, int]] = operational_field(
        [],
        description="Fault injection: (step, rank) pairs whose loss is made NaN on purpose, "
        "to exercise the guard (the chaos harness sets it).",
    )
    hang_timeout_s: float = operational_field(
        300.0,
        description="Seconds without progress inside a step before a rank counts as hung "
        "(0: no watchdog).",
        ge=0,
    )
    hang_warmup_s: float = operational_field(
        900.0,
        description="Allowance before the first step completes (it compiles the model with "
        "train.compile), and during checkpoint saves and evaluation, before the watchdog "
        "counts a rank as hung.",
        ge=0,
    )

    @model_validator(mode="after")
    def _signals_checked_within_the_grace(self) -> FaultConfig:
        if self.signal_check_s >= self.preempt_grace_s:
            raise ValueError(
                f"signal_check_s ({self.signal_check_s:g}) must be below preempt_grace_s "
                f"({self.preempt_grace_s:g}): a signal waits up to signal_check_s before the "
                "save starts; lower signal_check_s (0: every step) or raise the grace"
            )
        return self


class TelemetryConfig(_Section):
    stall_after_s: float = operational_field(
        120.0,
        description="Seconds without a completed step before a rank writes a `stall` event "
        "(0: no alarm). An alarm only: the hang watchdog is what stops a hung run.",
        ge=0,
    )
    straggler_ratio: float = operational_field(
        1.3,
        description="A rank whose compute and loading time per step exceeds this multiple of "
        "the median of the other ranks' at straggler_checks consecutive checks (one every "
        "log.every_steps) is named a straggler.",
        gt=1,
    )
    straggler_checks: int = operational_field(
        2,
        description="Consecutive checks a rank must be over straggler_ratio before it is "
        "named (1: at the first; more: fewer false alarms from a noisy neighbour).",
        ge=1,
    )
    price_per_device_hour: float | None = operational_field(
        None,
        description="Price of one device (GPU) for an hour, in any currency: metrics and "
        "status then report the cost so far (None: no cost).",
        ge=0,
    )
    tensorboard: bool = operational_field(
        False,
        description="Also write the logged metrics as TensorBoard scalars under "
        "RUN_DIR/tensorboard/ (needs the tensorboard package).",
    )
    prometheus_port: int | None = operational_field(
        None,
        description="Serve Prometheus metrics from rank 0 on this port (0: any free port, "
        "named in the `prometheus_started` event; None: off).",
        ge=0,
        le=65535,
    )
    prometheus_host: str = operational_field(
        "127.0.0.1",
        description="Address the Prometheus endpoint binds to; anything but loopback (e.g. "
        "0.0.0.0 for a scraper on another machine) is an explicit choice.",
    )
    mlflow_tracking_uri: str | None = operational_field(
        None,
        description="Also track the run in MLflow (rank 0): a tracking server URL "
        "(http://host:5000), any MLflow store URI (sqlite:///mlflow.db), or a local folder "
        "(holds mlflow.db and artifacts/). None: off. Credentials come from MLflow's own "
        "environment variables (MLFLOW_TRACKING_TOKEN, ...), never from this URI.",
    )
    mlflow_experiment: str = operational_field(
        "steadytrain",
        description="MLflow experiment the run is tracked under (created when missing).",
        min_length=1,
    )

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_password_in_tracking_uri(cls, uri: str | None) -> str | None:
        # The URI is saved with the config and logged as a parameter.
        if uri is not None and "://" in uri and urlsplit(uri).password is not None:
            raise ValueError(
                "holds a password, which would be saved with the config; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return uri


class ServeConfig(_Section):
    """``steadytrain serve``: batching, backpressure, timeouts and limits of the model API."""

    max_batch_size: int = operational_field(
        32,
        description="Most requests (or generating sequences, each a row of the KV cache) in "
        "one batch of the model.",
        ge=1,
    )
    max_wait_ms: float = operational_field(
        5.0,
        description="Longest wait for a /v1/forward batch to fill, counted from its first "
        "request (0: take whatever is queued). Generations never wait: one that comes later "
        "joins the running batch at the next decoding step.",
        ge=0,
    )
    max_queue: int = operational_field(
        64,
        description="Requests of one endpoint waiting for a batch beyond which new ones get 503 "
        "with Retry-After.",
        ge=1,
    )
    retry_after_s: int = operational_field(
        1, description="Seconds a rejected client is told to wait (the Retry-After header).", ge=0
    )
    request_timeout_s: float = operational_field(
        60.0,
        description="Longest a request may take, queued or running; past it, it is dropped "
        "from the queue or its batch and answered 504.",
        gt=0,
    )
    shutdown_grace_s: float = operational_field(
        30.0,
        description="On SIGTERM: stop accepting, then let requests in flight finish for at "
        "most this long.",
        gt=0,
    )
    max_prompt_tokens: int = operational_field(
        2048,
        description="Longest prompt (UTF-8 bytes for /v1/generate) or token list "
        "(/v1/forward) accepted; longer ones get 413.",
        ge=1,
    )
    max_new_tokens: int = operational_field(
        512, description="Most new tokens one /v1/generate request may ask for.", ge=1
    )
    causal: bool | None = operational_field(
        None,
        description="Whether a token of the model sees only tokens before it, so rows of "
        "/v1/forward of different lengths are right-padded into one batch without changing "
        "their results; otherwise only rows of equal length share a batch. None: true for "
        "the default GPT, false for other factories.",
    )
    device: Literal["auto", "cpu", "cuda"] = operational_field(
        "auto", description="Where the model runs (auto: CUDA when present)."
    )
    http: Literal["auto", "httptools", "h11"] = operational_field(
        "auto",
        description="uvicorn's HTTP/1.1 parser: httptools (C, installed with steadytrain) "
        "or h11 (pure Python); auto: httptools when importable.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = operational_field(
        "auto",
        description="The server's event loop: uvloop (installed with steadytrain) or "
        "Python's asyncio; auto: uvloop when importable.",
    )


class Config(_Section):
    seed: int = identity_field(1234, description="Seeds the model init and data order.", ge=0)
    deterministic: bool = operational_field(
        False, description="Use deterministic kernels so reruns are bit-identical."
    )
    run_dir: str = operational_field(
        "runs/default", description="Directory for config, metrics, events and weights."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimization.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpointing."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Metrics and console output.")
    dist: DistConfig = Field(default_factory=DistConfig, description="Distributed runtime.")
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="DDP gradient communication: buckets, views, static graph, compression.",
    )
    fault: FaultConfig = Field(
        default_factory=FaultConfig, description="Preemption, hangs and non-finite steps."
    )
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig,
        description="Health, stalls, stragglers and where metrics go besides metrics.jsonl.",
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig,
        description="steadytrain serve: batching, backpressure, timeouts and limits.",
    )


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch splits across ranks and micro-steps for one world size."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum_steps

    @property
    def samples_per_micro_step(self) -> int:
        return self.world_size * self.micro_batch_size


def batch_layout(config: Config, *, world_size: int) -> BatchLayout:
    """Derive gradient accumulation for ``world_size``; refuse a batch that does not divide.

    Raises:
        ConfigError: if the global batch is not a multiple of world_size × micro_batch_size.
    """
    train = config.train
    per_micro_step = world_size * train.micro_batch_size
    if train.global_batch_size % per_micro_step != 0:
        raise ConfigError(
            f"train.global_batch_size: {train.global_batch_size} is not divisible by "
            f"world_size × train.micro_batch_size = {world_size} × {train.micro_batch_size} "
            f"= {per_micro_step}; use a multiple of {per_micro_step} or change "
            "train.micro_batch_size"
        )
    return BatchLayout(
        world_size=world_size,
        micro_batch_size=train.micro_batch_size,
        grad_accum_steps=train.global_batch_size // per_micro_step,
    )


def powersgd_start_step(config: Config) -> int:
    """The first step PowerSGD compresses: ``parallel.powersgd_start_step``, or the end of
    the learning-rate warmup when unset (PyTorch advises no earlier)."""
    start = config.parallel.powersgd_start_step
    return config.train.warmup_steps if start is None else start
