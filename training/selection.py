"""One super-batch's selection as round-manifest rows, for both selection modes.

The round job (`pipelines/round_job.py`, offline: a stored learner checkpoint scores a
whole round) and the trainer's online mode (`training/online.py`: the live weights
score every step's super-batch) both call `select_super_batch`. Same embeddings in,
same rows out: the same `jest_core.sampler.select` call under the same generator seed,
and the same columns (`formats.ROUND_MANIFEST_SCHEMA`), so reports read both modes alike
and the difference between them is only the staleness of the learner's weights.

A data-parallel trainer selects per rank: rank k of N selects b/N of its own 1/N of the
super-batch (`part=(k, N)`). Its generator seed then also names the part, and its
`position`s continue the ranks before it, so the ranks' rows together read as one
selected sub-batch of b in the order the global batch trains.

No Beam here: the trainer imports it.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np
import pyarrow as pa
import torch

from jest_core import sampler
from jest_core import scores
from jest_curate import formats
from jest_curate import hashing
from training.flops import StepFlops

__all__ = ["SelectionSettings", "SuperBatchSelection", "embeddings_pair", "selection_seed",
           "select_super_batch"]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """How a super-batch is selected (one rank's share of it, under data parallelism)."""
    method: str
    batch_size: int  # b: examples selected from the super-batch (or from the part).
    chunks: int = 16  # N
    temperature: float = 1.0
    seed: int = 0
    compute_dtype: str = "fp32"  # Of the joint matmuls: fp32 | bf16.

    def __post_init__(self):
        sampler.needed_embeddings(self.method)  # Raises on an unknown method.
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be fp32 or bf16, got {self.compute_dtype}")

    @property
    def needs(self) -> tuple:
        return sampler.needed_embeddings(self.method)


@dataclasses.dataclass(frozen=True)
class SuperBatchSelection:
    manifest: pa.Table  # One row per candidate, in candidate order (ROUND_MANIFEST_SCHEMA).
    chosen: np.ndarray  # [b] candidate indices, in selection (= training) order.
    batch_scores: list  # [(selected batch's score, a random batch's)], or [] (uniform).
    flops: int  # Selection FLOPs, measured (once per input shape).


def embeddings_pair(image: np.ndarray, text: np.ndarray,
                    card: formats.ModelCard) -> scores.EmbeddingPair:
    """Stored (fp16) embeddings → the float32 pair jest_core scores, with the card's t, b."""
    return scores.EmbeddingPair(image=torch.from_numpy(image.astype(np.float32)),
                                text=torch.from_numpy(text.astype(np.float32)),
                                logit_scale=card.logit_scale, logit_bias=card.logit_bias)


def selection_seed(seed: int, pass_index: int, super_batch: int,
                   part: Tuple[int, int] = (0, 1)) -> int:
    """The generator seed of a super-batch's selection (of rank k's part when N > 1)."""
    k, n = part
    if n == 1:
        return hashing.derive_seed(seed, "select", pass_index, super_batch)
    return hashing.derive_seed(seed, "select", pass_index, super_batch, "part", k, n)


def _pair(pairs: dict, role: str, idx: np.ndarray) -> Optional[scores.EmbeddingPair]:
    if role not in pairs:
        return None
    image, text, card = pairs[role]
    return embeddings_pair(image[idx], text[idx], card)


def _batch_scores(settings: SelectionSettings, inputs: scores.ScoringInputs,
                  picked: sampler.Selection, generator: torch.Generator) -> list:
    """The selected batch's score and a random batch's (drawn after the selection)."""
    kind = sampler.score_kind(settings.method)
    try:
        scores.signed_models(inputs, kind=kind)
    except ValueError:  # uniform without embeddings: nothing to score.
        return []
    return [(scores.batch_score(inputs, picked.indices, kind=kind),
             scores.mean_random_batch_score(inputs, kind=kind, batch_size=settings.batch_size,
                                            num_samples=1, generator=generator))]


def select_super_batch(rows: pa.Table, *, round_: int, valid: np.ndarray, dead: np.ndarray,
                       pairs: dict, settings: SelectionSettings, flops: StepFlops,
                       part: Tuple[int, int] = (0, 1)) -> SuperBatchSelection:
    """Select one super-batch (or rank k's part of it) and describe every candidate.

    Args:
      rows: the candidates (CANDIDATE_SCHEMA rows of one super-batch, or of one part).
      valid: [S] bool, False for candidates that could not be scored (dead letters).
      dead: [S] their reasons ("dead_letter:<reason>"), None elsewhere.
      pairs: role ("learner", "reference") → ([S, d] image, [S, d] text, ModelCard).
      flops: measures the selection's FLOPs once per input shape.
      part: (k, N): rank k's part of N; (0, 1) for a whole super-batch.
    """
    S = rows.num_rows
    pass_index = int(rows.column("pass")[0].as_py())
    sb = int(rows.column("super_batch")[0].as_py())
    idx = np.flatnonzero(valid)
    chunk, position = np.full(S, -1, np.int32), np.full(S, -1, np.int32)
    score = np.full(S, np.nan, np.float32)
    losses = {role: np.full(S, np.nan, np.float32) for role in ("learner", "reference")}
    reason = np.where(valid, "rejected", dead).astype(object)
    chosen, batch_scores, spent = np.zeros(0, np.int64), [], 0
    if len(idx) < settings.batch_size:  # Learner dead letters left too few to choose from.
        reason[idx] = "dead_letter:too_few_candidates"
    else:
        inputs = scores.ScoringInputs(learner=_pair(pairs, "learner", idx),
                                      reference=_pair(pairs, "reference", idx),
                                      num_examples=len(idx))
        generator = torch.Generator().manual_seed(
            selection_seed(settings.seed, pass_index, sb, part))
        shapes = tuple(tuple(p.image.shape) for p in (inputs.learner, inputs.reference)
                       if p is not None)
        picked, spent = flops.run(shapes, lambda: sampler.select(
            inputs, method=settings.method, batch_size=settings.batch_size,
            num_chunks=settings.chunks, temperature=settings.temperature, generator=generator,
            compute_dtype=COMPUTE_DTYPES[settings.compute_dtype]))
        chosen = idx[picked.indices.numpy()]
        reason[chosen] = "selected"
        chunk[chosen] = picked.chunk.numpy()
        position[chosen] = part[0] * settings.batch_size + np.arange(len(chosen),
                                                                     dtype=np.int32)
        score[chosen] = picked.score.numpy()
        losses["learner"][idx] = picked.learner_loss_diag.float().numpy()
        losses["reference"][idx] = picked.reference_loss_diag.float().numpy()
        batch_scores = _batch_scores(settings, inputs, picked, generator)
    selected = reason == "selected"
    table = pa.table({
        "uid": rows.column("uid"), "round": np.full(S, round_, np.int32),
        "super_batch": np.full(S, sb, np.int64), "selected": selected,
        "reason": reason.tolist(), "chunk": pa.array(chunk, mask=~selected),
        "position": pa.array(position, mask=~selected),
        "score": pa.array(score, mask=~selected),
        "learner_loss": pa.array(losses["learner"], mask=np.isnan(losses["learner"])),
        "reference_loss": pa.array(losses["reference"], mask=np.isnan(losses["reference"])),
        "pass": np.full(S, pass_index, np.int32), "corpus_shard": rows.column("corpus_shard"),
        "corpus_row": rows.column("corpus_row")})
    return SuperBatchSelection(manifest=table, chosen=chosen, batch_scores=batch_scores,
                               flops=spent)
