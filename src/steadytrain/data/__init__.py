"""Token shards, the resumable global-position sampler, the consumption ledger and audit."""

from steadytrain.data.datasets import (
    Datasets,
    TokenWindowDataset,
    build_datasets,
    ensure_corpus,
    prepared_corpus_dir,
)
from steadytrain.data.ledger import (
    AuditReport,
    ConsumptionLedger,
    EpochAudit,
    NullLedger,
    audit_ledger,
    new_attempt_id,
)
from steadytrain.data.loader import MicroBatch, StepBatches, validation_batches
from steadytrain.data.sampler import (
    GlobalPositionSampler,
    SamplerPosition,
    epoch_permutation,
    rank_micro_batch_offsets,
)
from steadytrain.data.shards import (
    ShardIndex,
    is_prepared,
    prepare_shards,
    read_index,
    resolve_source_files,
)

__all__ = [
    "AuditReport",
    "ConsumptionLedger",
    "Datasets",
    "EpochAudit",
    "GlobalPositionSampler",
    "MicroBatch",
    "NullLedger",
    "SamplerPosition",
    "ShardIndex",
    "StepBatches",
    "TokenWindowDataset",
    "audit_ledger",
    "build_datasets",
    "ensure_corpus",
    "epoch_permutation",
    "is_prepared",
    "new_attempt_id",
    "prepare_shards",
    "prepared_corpus_dir",
    "rank_micro_batch_offsets",
    "read_index",
    "resolve_source_files",
    "validation_batches",
]
