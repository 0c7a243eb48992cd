"""Token shards, the resumable global-position sampler, the consumption ledger and audit."""

from steadytrain.data.cache import CacheStats, ShardCache
from steadytrain.data.datasets import (
    Datasets,
    TokenWindowDataset,
    build_datasets,
    ensure_corpus,
    prepared_corpus_dir,
    sample_order,
    step_lookahead,
    with_data_metrics,
)
from steadytrain.data.ledger import (
    AuditReport,
    ConsumptionLedger,
    EpochAudit,
    NullLedger,
    audit_ledger,
    new_attempt_id,
)
from steadytrain.data.loader import (
    MicroBatch,
    NullLookahead,
    StepBatches,
    StepLookahead,
    reads_ahead,
    validation_batches,
)
from steadytrain.data.remote import is_remote, prepare_corpus, prepare_remote
from steadytrain.data.sampler import (
    GlobalPositionSampler,
    SampleOrder,
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
    "CacheStats",
    "ConsumptionLedger",
    "Datasets",
    "EpochAudit",
    "GlobalPositionSampler",
    "MicroBatch",
    "NullLedger",
    "NullLookahead",
    "SampleOrder",
    "SamplerPosition",
    "ShardCache",
    "ShardIndex",
    "StepBatches",
    "StepLookahead",
    "TokenWindowDataset",
    "audit_ledger",
    "build_datasets",
    "ensure_corpus",
    "epoch_permutation",
    "is_prepared",
    "is_remote",
    "new_attempt_id",
    "prepare_corpus",
    "prepare_remote",
    "prepare_shards",
    "prepared_corpus_dir",
    "rank_micro_batch_offsets",
    "read_index",
    "reads_ahead",
    "resolve_source_files",
    "sample_order",
    "step_lookahead",
    "validation_batches",
    "with_data_metrics",
]
