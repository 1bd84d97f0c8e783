"""Pairwise SigLIP losses from L2-normalised embeddings (Zhai et al. 2023, eq. 1).

For image embeddings x and text embeddings y of one super-batch,

    z_ij     = t * <x_i, y_j> + b     (t: logit-scale multiplier, already exp'ed; b: bias)
    label_ij = +1 if i == j else -1
    loss_ij  = -log sigmoid(label_ij * z_ij) = softplus(-label_ij * z_ij)

so a positive (diagonal) pair costs softplus(-z) and a negative (off-diagonal) pair
costs softplus(z). Every function returns these *unnormalised per-pair terms*:
SigLIP's batch loss is (1/|B|) * sum_ij loss_ij, but JEST's batch scores (Evans et
al. 2024, eqs. 1-2) only add terms up, so no 1/|B| is applied here.

softplus is used instead of -log(sigmoid(.)) because it is exact and finite for any
finite logit (no exp overflow at |z| ~ 1e4).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

# Logits per block in `siglip_cross_loss_sums` (4 MB in float32): small enough to stay in
# cache between the matmul that writes it and the softplus that reads it, large enough
# that each chunk is a few big parallel ops (many small ones stall on a busy machine).
CROSS_BLOCK_ELEMENTS = 2**20


def siglip_logits(*, image: torch.Tensor, text: torch.Tensor, logit_scale: float,
                  logit_bias: float) -> torch.Tensor:
    """z_rc = t * <image_r, text_c> + b, computed in float32.

    Args:
      image: [R, d] image embeddings (any float dtype).
      text: [C, d] text embeddings.
      logit_scale: t, the multiplier (exp of the learned log-scale).
      logit_bias: b.

    Returns:
      [R, C] float32 logits.
    """
    return torch.addmm(torch.tensor(float(logit_bias)), image.float(), text.float().T,
                       alpha=float(logit_scale))


def siglip_loss_block(*, image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor, logit_scale: float,
                      logit_bias: float) -> torch.Tensor:
    """Loss terms for image rows x text columns of a super-batch, in float32.

    Entry (r, c) pairs image `rows[r]` with text `cols[c]`; it is a positive pair
    exactly when rows[r] == cols[c].

    Args:
      image: [S, d] L2-normalised image embeddings of the super-batch.
      text: [S, d] L2-normalised text embeddings (row i is the caption of image i).
      rows: [R] int64 super-batch indices of the images.
      cols: [C] int64 super-batch indices of the texts.
      logit_scale: t (multiplier).
      logit_bias: b.

    Returns:
      [R, C] float32 unnormalised loss terms -log sigmoid(label * z).
    """
    logits = siglip_logits(image=image[rows], text=text[cols], logit_scale=logit_scale,
                           logit_bias=logit_bias)
    is_positive = rows[:, None] == cols[None, :]
    # softplus(-z) for positives, softplus(z) for negatives.
    return F.softplus(torch.where(is_positive, -logits, logits))


def siglip_loss_matrix(*, image: torch.Tensor, text: torch.Tensor, logit_scale: float,
                       logit_bias: float) -> torch.Tensor:
    """Full [S, S] SigLIP loss matrix; O(S^2) memory, meant for small S and tests.

    Args:
      image: [S, d] L2-normalised image embeddings.
      text: [S, d] L2-normalised text embeddings.
      logit_scale: t (multiplier).
      logit_bias: b.

    Returns:
      [S, S] float32; entry (i, j) = -log sigmoid(label_ij * z_ij), unnormalised.
    """
    everyone = torch.arange(image.shape[0])
    return siglip_loss_block(image=image, text=text, rows=everyone, cols=everyone,
                             logit_scale=logit_scale, logit_bias=logit_bias)


def siglip_loss_diagonal(*, image: torch.Tensor, text: torch.Tensor, logit_scale: float,
                         logit_bias: float) -> torch.Tensor:
    """Positive-pair losses softplus(-z_ii) in O(S d), without the S x S matrix.

    Args:
      image: [S, d] image embeddings.
      text: [S, d] text embeddings.
      logit_scale: t (multiplier).
      logit_bias: b.

    Returns:
      [S] float32 unnormalised losses of the matching pairs.
    """
    # Row-wise dot products as a batched GEMV: no [S, d] temporary.
    dots = torch.einsum("sd,sd->s", image.float(), text.float())
    logits = float(logit_scale) * dots + float(logit_bias)
    return F.softplus(-logits)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossOperands:
    """One model's embeddings, laid out once per super-batch for `siglip_cross_loss_sums`.

    Attributes:
      image: [S, d + 2] in the compute dtype: the image embeddings, then two columns
        of ones through which the GEMM adds the bias (see `prepare_cross_operands`).
      text: [S, d + 2] likewise for the text embeddings.
      logit_scale: t (multiplier).
      logit_bias: b.
    """
    image: torch.Tensor
    text: torch.Tensor
    logit_scale: float
    logit_bias: float


def prepare_cross_operands(*, image: torch.Tensor, text: torch.Tensor, logit_scale: float,
                           logit_bias: float,
                           compute_dtype: torch.dtype = torch.float32) -> CrossOperands:
    """Casts [S, d] embeddings to `compute_dtype` and appends two columns of ones.

    With right-hand sides [t * y_j, b_hi, b_lo], one GEMM then yields the logits
    z = t <x, y> + b_hi + b_lo directly, with no elementwise pass to scale and shift
    them. b is split as b_hi = round(b) to the compute dtype and b_lo = b - b_hi so
    the bias is exact inside the float32 accumulator even in bf16: a bf16 bias alone
    would shift every logit by up to 0.03 at |b| ~ 10, a systematic 1-3% error.
    Done once per super-batch: every chunk re-reads all S rows.

    Args:
      image: [S, d] image embeddings.
      text: [S, d] text embeddings.
      logit_scale: t (multiplier).
      logit_bias: b.
      compute_dtype: torch.float32 or torch.bfloat16, the dtype of the matmuls.

    Returns:
      `CrossOperands` with [S, d + 2] tensors.
    """
    ones = torch.ones(image.shape[0], 2, dtype=compute_dtype)
    return CrossOperands(image=torch.cat([image.to(compute_dtype), ones], dim=1),
                         text=torch.cat([text.to(compute_dtype), ones], dim=1),
                         logit_scale=float(logit_scale), logit_bias=float(logit_bias))


def siglip_cross_loss_sums(operands: CrossOperands, *, chunk: torch.Tensor,
                           row_block: int | None = None) -> torch.Tensor:
    """sum_{j in chunk} (loss_ij + loss_ji) for every candidate i, as negative pairs.

    The sampler's hot loop: JEST's conditional logits need, for each of the S
    candidates, the losses of pairing it with every member j of the chunk just
    selected, both ways round (image_i with text_j, and image_j with text_i). Both
    are negatives for i not in `chunk`, so each term is softplus(z). Rows i that are
    in `chunk` get the same formula and are meaningless (the sampler masks them).
    Costs 2 matmuls [S, d] x [d, k] = 4 S d k FLOPs and O(row_block * k) temporary
    memory, never S x S. Logits and softplus are in the compute dtype of `operands`;
    the sums are accumulated in float32.

    Args:
      operands: the super-batch's embeddings, from `prepare_cross_operands`.
      chunk: [k] int64 indices of the chunk members j.
      row_block: candidates per block; default: about CROSS_BLOCK_ELEMENTS / k.

    Returns:
      [S] float32 sums.
    """
    # [d + 2, k] contiguous right-hand sides, the fast GEMM layout; built once per chunk.
    chunk_text_t = _scaled_right_hand_side(operands.text[chunk], operands)
    chunk_image_t = _scaled_right_hand_side(operands.image[chunk], operands)
    num = operands.image.shape[0]
    row_block = row_block or max(1, CROSS_BLOCK_ELEMENTS // max(1, len(chunk)))
    # float32 sums of bf16 terms (bf16 sums of k terms lose digits); passing dtype for
    # a float32 sum would pick a slower kernel.
    sum_dtype = torch.float32 if operands.image.dtype != torch.float32 else None
    sums = torch.empty(num, dtype=torch.float32)
    for start in range(0, num, row_block):
        stop = min(start + row_block, num)
        # image_i with text_j, then text_i with image_j, for every j in the chunk.
        image_vs_chunk = torch.mm(operands.image[start:stop], chunk_text_t)
        torch.sum(F.softplus(image_vs_chunk), dim=1, dtype=sum_dtype, out=sums[start:stop])
        text_vs_chunk = torch.mm(operands.text[start:stop], chunk_image_t)
        sums[start:stop] += torch.sum(F.softplus(text_vs_chunk), dim=1, dtype=sum_dtype)
    return sums


def _scaled_right_hand_side(rows: torch.Tensor, operands: CrossOperands) -> torch.Tensor:
    """[k, d + 2] rows -> [d + 2, k] with columns [t * y_j, b_hi, b_lo] (see prepare)."""
    dtype = rows.dtype
    bias_hi = torch.tensor(operands.logit_bias, dtype=dtype).float()
    rhs = rows.float() * operands.logit_scale
    rhs[:, -2] = bias_hi
    rhs[:, -1] = operands.logit_bias - bias_hi
    return rhs.T.to(dtype).contiguous()
