"""Serving (Contract 6): a trained run as an HTTP model API, with dynamic batching.

``serve`` runs the server (FastAPI + uvicorn). For use from Python without HTTP (a
benchmark's in-process limit): ``load_served_model`` and ``generate`` / ``forward_rows``, or
``Batcher`` + ``ModelWorker`` with a ``Reply`` of one's own.
"""

from steadytrain.serve.batcher import (
    Batcher,
    BatcherClosed,
    Pending,
    QueueFull,
    Reply,
    ServeFailure,
)
from steadytrain.serve.decoding import DecodingBatch, Step, StepCost, generate
from steadytrain.serve.faults import FAULTS_ENV, Faults
from steadytrain.serve.generation import (
    Generation,
    PaddedBatch,
    Sampling,
    byte_text,
    byte_tokens,
    forward_rows,
    pad_rows,
    token_logprobs,
)
from steadytrain.serve.loading import (
    ServedModel,
    ServeRefused,
    load_run_config,
    load_served_model,
)
from steadytrain.serve.metrics import ServeMetrics
from steadytrain.serve.server import serve
from steadytrain.serve.worker import (
    FORWARD,
    GENERATE,
    ForwardRequest,
    GenerateRequest,
    ModelWorker,
)

__all__ = [
    "FAULTS_ENV",
    "FORWARD",
    "GENERATE",
    "Batcher",
    "BatcherClosed",
    "DecodingBatch",
    "Faults",
    "ForwardRequest",
    "GenerateRequest",
    "Generation",
    "ModelWorker",
    "PaddedBatch",
    "Pending",
    "QueueFull",
    "Reply",
    "Sampling",
    "ServeFailure",
    "ServeMetrics",
    "ServeRefused",
    "ServedModel",
    "Step",
    "StepCost",
    "byte_text",
    "byte_tokens",
    "forward_rows",
    "generate",
    "load_run_config",
    "load_served_model",
    "pad_rows",
    "serve",
    "token_logprobs",
]
