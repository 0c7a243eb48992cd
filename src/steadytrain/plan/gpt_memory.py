"""The default GPT's shape and the bytes that follow from it: its activations, and FSDP2's
unsharded units in flight at the moments forward/backward may peak (docs/planning.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FP32 = 4
BF16 = 2
INT64 = 8
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class GPTShape:
    """The shape of the default GPT (``steadytrain.model.GPT``): what its parameter count,
    FSDP units and activations follow from."""

    num_layers: int
    width: int
    num_heads: int
    vocab_size: int
    max_seq_len: int

    @property
    def block_params(self) -> int:
        """One block: qkv (3h² + 3h), proj (h² + h), the MLP (8h² + 5h), two LayerNorms (4h)."""
        return 12 * self.width**2 + 13 * self.width

    @property
    def root_params(self) -> int:
        """Token and position embeddings, the final LayerNorm and the (untied) head."""
        return (2 * self.vocab_size + self.max_seq_len + 2) * self.width

    @property
    def num_params(self) -> int:
        return self.num_layers * self.block_params + self.root_params

    @property
    def matmul_weights(self) -> int:
        """Weights that bf16 autocast copies: every Linear's (four per block, and the head)."""
        return self.num_layers * 12 * self.width**2 + self.vocab_size * self.width

    def weight_matrices(self) -> list[tuple[int, int]]:
        """(rows, columns) of every 2-D parameter: per block qkv, proj and the MLP's two,
        then the token and position embeddings and the head (what PowerSGD may compress)."""
        h = self.width
        per_block = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]
        root = [(self.vocab_size, h), (self.max_seq_len, h), (self.vocab_size, h)]
        return per_block * self.num_layers + root


def powersgd_factor_elements(shape: GPTShape, *, rank: int) -> int:
    """Elements of PowerSGD's P and Q over the matrices it compresses, as PyTorch's
    ``powerSGD_hook`` decides (n×m at rank r = min(n, m, rank) is compressed when
    2·(n + m)·r < n·m, its default ``min_compression_rate``): (n + m)·r each."""
    total = 0
    for rows, columns in shape.weight_matrices():
        effective = min(rows, columns, rank)
        if 2 * (rows + columns) * effective < rows * columns:
            total += (rows + columns) * effective
    return total


@dataclass(frozen=True)
class Activations:
    """The default GPT's activation bytes, per rank, at the moments backward may peak."""

    at_loss: int  # the loss's backward: everything forward saved, the log-softmax gradients
    in_last_block: int  # the last block's MLP backward: all blocks' saved tensors, its gradients
    per_block: int  # what one block saves (freed once backward has passed it)

    @property
    def peak(self) -> int:
        return max(self.at_loss, self.in_last_block)


def gpt_activations(
    shape: GPTShape, *, micro_batch_size: int, seq_len: int, precision: Precision
) -> Activations:
    """What one micro-batch's forward saves for backward, plus the gradients in flight that
    are not the parameters' ``.grad``, at the moments backward may peak (docs/planning.md).

    Per block, Korthikanti et al. 2022 (eq. 1, "Reducing Activation Recomputation in Large
    Transformer Models") adapted to what this model saves: fused attention (SDPA keeps q, k, v,
    its output and an fp32 log-sum-exp: no s² scores, no dropout masks), LayerNorm inputs in
    fp32, and the matmul inputs in the compute dtype (bf16 copies under autocast). The loss
    upcasts the logits to fp32 and keeps the log-softmax. Counted for a micro-batch after the
    first of a step: under gradient accumulation a new weight gradient is a tensor of its own
    until it is added to ``.grad``. Autocast's weight copies are not included.
    """
    tokens, width, compute = micro_batch_size * seq_len, shape.width, compute_bytes(precision)
    per_block = (
        2 * FP32 * tokens * width  # the two LayerNorm inputs
        + 2 * 2 * FP32 * tokens  # their mean and rstd
        # qkv input (1) and output (3), attention output (1), MLP input (1), GELU in (4), out (4)
        + 14 * compute * tokens * width
        + FP32 * tokens * shape.num_heads  # attention log-sum-exp
    )
    saved_by_blocks = shape.num_layers * per_block + INT64 * seq_len  # and the position ids
    logits = FP32 * tokens * shape.vocab_size
    head = (
        FP32 * tokens * width  # final LayerNorm input
        + 2 * FP32 * tokens  # its mean and rstd
        + compute * tokens * width  # head input
        + INT64 * tokens  # the targets, made contiguous by the loss
        + logits  # log-softmax output
    )
    # The residual gradient, then fc2's input and weight gradients in the compute dtype or,
    # under bf16, the weight gradient's fp32 cast, made once fc2's saved input and weight
    # copy are freed.
    in_block = FP32 * tokens * width + max(
        4 * compute * (tokens * width + width**2), FP32 * 4 * width**2
    )
    return Activations(
        at_loss=saved_by_blocks + head + 2 * logits,  # nll_loss's and log_softmax's gradients
        in_last_block=saved_by_blocks + in_block,
        per_block=per_block,
    )


def fsdp_forward_backward(
    shape: GPTShape, activations: Activations, *, precision: Precision
) -> tuple[int, int]:
    """FSDP2's unsharded units in flight and the activations, per rank, at the moment of
    forward/backward where their sum peaks.

    The root unit (embeddings, final norm, head) stays gathered from forward through backward
    (FSDP2 does not reshard the root after forward): at the loss's backward that is all. Then
    each block is gathered again for its backward, the next one prefetched: in the last
    block's backward the head's unsharded gradient has joined, and in the next block's the
    last block's activations are freed and its fp32 reduce-scatter input (``reduce_dtype``)
    is in flight. Parameters and gradients are in the compute dtype.
    """
    compute, block = compute_bytes(precision), shape.block_params
    root = compute * shape.root_params
    in_backward = root + compute * (2 * block + shape.vocab_size * shape.width)
    candidate_peaks = [(root, activations.at_loss), (in_backward, activations.in_last_block)]
    if shape.num_layers > 1:
        candidate_peaks.append(
            (in_backward + FP32 * block, activations.in_last_block - activations.per_block)
        )
    return max(candidate_peaks, key=sum)


def compute_bytes(precision: Precision) -> int:
    """Bytes per element of the compute dtype: bf16 under autocast, else fp32."""
    return BF16 if precision == "bf16" else FP32
