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

import torch
import torch.nn.functional as F

# Candidates per block in `siglip_cross_loss_sums`: a [2048, b/N] block stays in cache
# between the matmul that writes it and the softplus that reads it.
CROSS_ROW_BLOCK = 2048


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
    logits = float(logit_scale) * (image.float() * text.float()).sum(dim=1) + float(logit_bias)
    return F.softplus(-logits)


def siglip_cross_loss_sums(*, image: torch.Tensor, text: torch.Tensor, chunk: torch.Tensor,
                           logit_scale: float, logit_bias: float,
                           compute_dtype: torch.dtype = torch.float32,
                           row_block: int = CROSS_ROW_BLOCK) -> torch.Tensor:
    """sum_{j in chunk} (loss_ij + loss_ji) for every candidate i, as negative pairs.

    The sampler's hot loop: JEST's conditional logits need, for each of the S
    candidates, the losses of pairing it with every member j of the chunk just
    selected, both ways round (image_i with text_j, and image_j with text_i). Both
    are negatives for i not in `chunk`, so each term is softplus(z). Rows i that are
    in `chunk` get the same formula and are meaningless (the sampler masks them).
    Costs 2 matmuls [S, d] x [d, k] = 4 S d k FLOPs and O(row_block * k)
    temporary memory, never S x S.

    Args:
      image: [S, d] image embeddings, ideally already in `compute_dtype`.
      text: [S, d] text embeddings, ideally already in `compute_dtype`.
      chunk: [k] int64 indices of the chunk members j.
      logit_scale: t (multiplier).
      logit_bias: b.
      compute_dtype: torch.float32 or torch.bfloat16, dtype of matmuls and softplus.
      row_block: candidates per block.

    Returns:
      [S] float32 sums.
    """
    image = image.to(compute_dtype)
    text = text.to(compute_dtype)
    # [d, k] contiguous right-hand sides, the fast GEMM layout; built once per chunk.
    chunk_text_t = text[chunk].T.contiguous()
    chunk_image_t = image[chunk].T.contiguous()
    bias = torch.tensor([float(logit_bias)], dtype=compute_dtype)
    scale = float(logit_scale)
    num = image.shape[0]
    sums = torch.empty(num, dtype=torch.float32)
    for start in range(0, num, row_block):
        stop = min(start + row_block, num)
        # alpha and bias inside the GEMM: z = t <x, y> + b with no extra pass.
        image_vs_chunk = torch.addmm(bias, image[start:stop], chunk_text_t, alpha=scale)
        text_vs_chunk = torch.addmm(bias, text[start:stop], chunk_image_t, alpha=scale)
        # Accumulate in float32 whatever compute_dtype is: bf16 sums of k terms lose digits.
        torch.sum(F.softplus(image_vs_chunk), dim=1, dtype=torch.float32,
                  out=sums[start:stop])
        sums[start:stop] += torch.sum(F.softplus(text_vs_chunk), dim=1, dtype=torch.float32)
    return sums
