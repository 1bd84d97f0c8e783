"""JEST score matrices A and batch scores (Evans et al. 2024, Sec. 2.1, eqs. 1-3).

A batch B of a super-batch is scored by s(B) = sum_{i,j in B} A_ij, where A is built
from the pairwise SigLIP losses of a learner and/or a pretrained reference model:

    kind              A_ij                       paper name
    "learnability"    L_learner_ij - L_ref_ij    learnability (eq. 3), what JEST uses
    "hard_learner"    L_learner_ij               hard learner (eq. 1)
    "easy_reference"  -L_ref_ij                  easy reference (eq. 2)

L is the unnormalised per-pair loss of `jest_core.losses`. Models are given as
`EmbeddingPair`s; learner and reference may have different widths d but must embed
the same S examples in the same order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from jest_core import losses

ScoreKind = Literal["learnability", "hard_learner", "easy_reference"]
SCORE_KINDS = ("learnability", "hard_learner", "easy_reference")

# Rows of the [|B|, |B|] block materialised at a time by `batch_score`.
_BATCH_SCORE_ROW_BLOCK = 1024


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingPair:
    """One model's embeddings of a super-batch.

    Attributes:
      image: [S, d] L2-normalised image embeddings (float32 or bfloat16).
      text: [S, d] L2-normalised text embeddings; row i is the caption of image i.
      logit_scale: t, the logit multiplier (already exp'ed, > 0).
      logit_bias: b.
    """
    image: torch.Tensor
    text: torch.Tensor
    logit_scale: float
    logit_bias: float

    def __post_init__(self):
        # Plain floats, so a 0-d tensor or numpy scalar from a checkpoint works too.
        object.__setattr__(self, "logit_scale", float(self.logit_scale))
        object.__setattr__(self, "logit_bias", float(self.logit_bias))
        for name in ("image", "text"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 2:
                raise ValueError(f"EmbeddingPair.{name} must be a 2-D [S, d] tensor, "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")
            if not value.is_floating_point():
                raise ValueError(f"EmbeddingPair.{name} must be floating point, got {value.dtype}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"EmbeddingPair.{name} contains NaN or inf "
                                 f"({int((~torch.isfinite(value)).sum())} entries)")
        if self.image.shape != self.text.shape:
            raise ValueError(f"image and text embeddings must have the same [S, d] shape, "
                             f"got image {tuple(self.image.shape)} vs text {tuple(self.text.shape)}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale is the multiplier t = exp(log_t) and must be finite "
                             f"and > 0, got {self.logit_scale}")
        if not math.isfinite(self.logit_bias):
            raise ValueError(f"logit_bias must be finite, got {self.logit_bias}")

    @property
    def size(self) -> int:
        return self.image.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringInputs:
    """What the score matrix A is computed from: a learner and/or a reference model.

    Attributes:
      learner: embeddings of the model being trained, or None.
      reference: embeddings of the pretrained reference model, or None.
      num_examples: S; inferred from the embeddings, only needed when there are none
        (uniform selection).
    """
    learner: EmbeddingPair | None = None
    reference: EmbeddingPair | None = None
    num_examples: int | None = None

    def __post_init__(self):
        sizes = {name: pair.size for name, pair in
                 (("learner", self.learner), ("reference", self.reference)) if pair is not None}
        if self.num_examples is not None:
            sizes["num_examples"] = self.num_examples
        if len(set(sizes.values())) > 1:
            raise ValueError(f"learner, reference and num_examples must agree on the "
                             f"super-batch size S (rows), got {sizes}")
        if not sizes:
            raise ValueError("ScoringInputs needs a learner, a reference, or num_examples")
        size = next(iter(sizes.values()))
        if size < 1:
            raise ValueError(f"super-batch size must be >= 1, got {size}")
        object.__setattr__(self, "num_examples", size)

    @property
    def size(self) -> int:
        return self.num_examples


def signed_models(inputs: ScoringInputs, *, kind: ScoreKind) -> list[tuple[EmbeddingPair, float]]:
    """[(model, sign)] such that A = sum of sign * L_model; ValueError if one is missing."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    needed = {"learnability": (("learner", 1.0), ("reference", -1.0)),
              "hard_learner": (("learner", 1.0),),
              "easy_reference": (("reference", -1.0),)}[kind]
    missing = [name for name, _ in needed if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"score kind {kind!r} needs {' and '.join(missing)} embeddings, "
                         f"but ScoringInputs.{missing[0]} is None")
    return [(getattr(inputs, name), sign) for name, sign in needed]


def score_diagonal(inputs: ScoringInputs, *, kind: ScoreKind) -> torch.Tensor:
    """A_ii, each example's own score (the independent / RHO-LOSS-style score).

    Returns:
      [S] float32.
    """
    total = torch.zeros(inputs.size, dtype=torch.float32)
    for pair, sign in signed_models(inputs, kind=kind):
        total += sign * losses.siglip_loss_diagonal(
            image=pair.image, text=pair.text, logit_scale=pair.logit_scale,
            logit_bias=pair.logit_bias)
    return total


def score_block(inputs: ScoringInputs, *, kind: ScoreKind, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
    """A[rows][:, cols].

    Args:
      rows: [R] int64 super-batch indices.
      cols: [C] int64 super-batch indices.

    Returns:
      [R, C] float32.
    """
    total = torch.zeros(len(rows), len(cols), dtype=torch.float32)
    for pair, sign in signed_models(inputs, kind=kind):
        total += sign * losses.siglip_loss_block(
            image=pair.image, text=pair.text, rows=rows, cols=cols,
            logit_scale=pair.logit_scale, logit_bias=pair.logit_bias)
    return total


def score_matrix(inputs: ScoringInputs, *, kind: ScoreKind) -> torch.Tensor:
    """The full [S, S] float32 score matrix A; O(S^2) memory, for small S and tests."""
    everyone = torch.arange(inputs.size)
    return score_block(inputs, kind=kind, rows=everyone, cols=everyone)


def cross_score_operands(inputs: ScoringInputs, *, kind: ScoreKind,
                         compute_dtype: torch.dtype = torch.float32,
                         ) -> list[tuple[losses.CrossOperands, float]]:
    """[(operands, sign)] for `cross_score_sums`, prepared once per super-batch.

    Only the models that `kind` uses are prepared (cast to `compute_dtype`, see
    `losses.prepare_cross_operands`).
    """
    return [(losses.prepare_cross_operands(image=pair.image, text=pair.text,
                                           logit_scale=pair.logit_scale,
                                           logit_bias=pair.logit_bias,
                                           compute_dtype=compute_dtype), sign)
            for pair, sign in signed_models(inputs, kind=kind)]


def cross_score_sums(operands: list[tuple[losses.CrossOperands, float]], *,
                     chunk: torch.Tensor) -> torch.Tensor:
    """sum_{j in chunk} (A_ij + A_ji) for every candidate i not in `chunk`.

    This is what adding `chunk` to the batch adds to each remaining candidate's
    conditional logit. Entries for i in `chunk` are meaningless. Costs 4 S d |chunk|
    FLOPs per model and no S x S memory (see `losses.siglip_cross_loss_sums`).

    Args:
      operands: from `cross_score_operands`.
      chunk: [k] int64 indices already selected.

    Returns:
      [S] float32.
    """
    total = None
    for model_operands, sign in operands:
        sums = losses.siglip_cross_loss_sums(model_operands, chunk=chunk)
        total = sign * sums if total is None else total.add_(sums, alpha=sign)
    return total


def batch_score(inputs: ScoringInputs, subset: torch.Tensor, *, kind: ScoreKind) -> float:
    """s(B) = sum_{i,j in B} A_ij for a subset B of the super-batch (eq. 1-3).

    Costs O(|B|^2 d); memory O(1024 |B|).

    Args:
      subset: [|B|] int64 distinct super-batch indices.

    Returns:
      The summed score (Python float, accumulated in float64).
    """
    subset = torch.as_tensor(subset, dtype=torch.int64)
    if subset.ndim != 1 or len(torch.unique(subset)) != len(subset):
        raise ValueError("subset must be a 1-D tensor of distinct indices")
    if len(subset) and not (0 <= int(subset.min()) and int(subset.max()) < inputs.size):
        raise ValueError(f"subset indices must lie in [0, {inputs.size})")
    total = 0.0
    for start in range(0, len(subset), _BATCH_SCORE_ROW_BLOCK):
        rows = subset[start:start + _BATCH_SCORE_ROW_BLOCK]
        total += float(score_block(inputs, kind=kind, rows=rows, cols=subset).double().sum())
    return total


def mean_random_batch_score(inputs: ScoringInputs, *, kind: ScoreKind, batch_size: int,
                            num_samples: int, generator: torch.Generator) -> float:
    """Mean s(B) over `num_samples` uniformly random subsets of size `batch_size`.

    The baseline that selected batches are compared with in reports.
    """
    if not 1 <= batch_size <= inputs.size:
        raise ValueError(f"batch_size must be in [1, S={inputs.size}], got {batch_size}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    scores = [batch_score(inputs, torch.randperm(inputs.size, generator=generator)[:batch_size],
                          kind=kind) for _ in range(num_samples)]
    return sum(scores) / num_samples
