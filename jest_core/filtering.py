"""CLIP-score filtering (DataComp; Gadre et al. 2023, Sec. 3.4): one reference pass, keep
the top x% of the pool by image-text cosine similarity, train uniformly on the rest.

It is the standard offline curation JEST is compared against: it costs one forward
pass of the reference over the pool and no learner scoring. The threshold is global
(a quantile over the whole pool), not per super-batch.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["clip_scores", "keep_count", "top_fraction", "clip_score_flops"]


def clip_scores(*, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """[n] float32 cosine similarity of each (image, caption) pair.

    Args:
      image: [n, d] L2-normalised image embeddings (any float dtype).
      text: [n, d] L2-normalised text embeddings; row i captions image i.
    """
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"need [n, d] image and text embeddings of one shape, got "
                         f"{image.shape} and {text.shape}")
    return np.einsum("nd,nd->n", image, text)


def clip_score_flops(n: int, dim: int) -> int:
    """FLOPs of `clip_scores` over n pairs of width d: one multiply and one add per term."""
    return 2 * n * dim


def keep_count(n: int, fraction: float) -> int:
    """round(fraction * n) examples kept (half up), at least 1 of a non-empty pool."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {fraction}")
    return min(n, max(1 if n else 0, math.floor(fraction * n + 0.5)))


def top_fraction(scores: np.ndarray, *, fraction: float, keys) -> np.ndarray:
    """[k] int64 indices of the k = keep_count(n, fraction) highest scores, ascending.

    Ties at the threshold are broken by `keys` (e.g. uids, ascending), so the kept set
    is exact and independent of input order. NaN scores rank last.

    Args:
      scores: [n] float scores.
      fraction: x in (0, 1].
      keys: [n] sortable keys, unique per example.
    """
    scores = np.asarray(scores, np.float64)
    keys = list(keys)
    if scores.ndim != 1 or len(keys) != len(scores):
        raise ValueError(f"need one key per score, got {len(keys)} keys for shape "
                         f"{scores.shape}")
    k = keep_count(len(scores), fraction)
    ranked = sorted(range(len(scores)),
                    key=lambda i: (-scores[i] if np.isfinite(scores[i]) else math.inf, keys[i]))
    return np.sort(np.asarray(ranked[:k], np.int64))
