"""CLIP-score filtering (DataComp; Gadre et al. 2023, Sec. 3.4): one reference pass, keep
the top x% of the pool by image-text cosine similarity, train uniformly on the rest.

It is the standard offline curation JEST is compared against: it costs one forward
pass of the reference over the pool and no learner scoring. The threshold is global
(a quantile over the whole pool), not per super-batch.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["clip_scores", "keep_count", "top_fraction", "clip_score_flops", "order_keys",
           "key_histogram", "histogram_boundary", "keep_rule", "keeps"]


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


# A distributed top-k: the threshold of `top_fraction` from two 16-bit histograms and the
# uids tied at it, so no worker ever holds the pool's scores (pipelines/layout.py).

def order_keys(scores: np.ndarray) -> np.ndarray:
    """[n] uint32 keys with the order of the float32 scores (NaN lowest)."""
    bits = np.asarray(scores, np.float32).view(np.uint32).astype(np.uint64)
    keys = np.where(bits >> 31, (~bits) & 0xFFFFFFFF, bits | 0x80000000).astype(np.uint32)
    return np.where(np.isnan(np.asarray(scores, np.float32)), np.uint32(0), keys)


def key_histogram(keys: np.ndarray, *, high: Optional[int] = None) -> np.ndarray:
    """[65536] counts of the keys' high 16 bits; with `high`, of the low 16 bits of the
    keys whose high 16 bits equal it."""
    keys = np.asarray(keys, np.uint32)
    if high is None:
        return np.bincount(keys >> 16, minlength=1 << 16)
    return np.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=1 << 16)


def histogram_boundary(hist: np.ndarray, k: int) -> tuple:
    """(bin, rank within it) of the k-th highest element: bins above hold fewer than k."""
    above = np.cumsum(np.asarray(hist, np.int64)[::-1])  # above[i]: elements in bins >= n-1-i
    i = int(np.searchsorted(above, k))  # First reverse position reaching k.
    if i >= len(hist):
        raise ValueError(f"the histogram holds {int(above[-1])} elements, fewer than k={k}")
    b = len(hist) - 1 - i
    return b, k - (int(above[i - 1]) if i else 0)


def keep_rule(*, key: int, tied_uids, need: int, kept: int, pool: int, fraction: float) -> dict:
    """The rule `keeps` applies: keys above `key`, and the first `need` uids tied at it."""
    tied = sorted(tied_uids)
    if not 1 <= need <= len(tied):
        raise ValueError(f"{need} of {len(tied)} tied examples to keep")
    return {"kind": "clip_score", "key": int(key), "uid": tied[need - 1], "kept": kept,
            "pool": pool, "keep_fraction": fraction}


def keeps(scores: np.ndarray, uids, rule: dict) -> np.ndarray:
    """[n] bool: which examples `rule` keeps; equals `top_fraction` over the whole pool."""
    keys = order_keys(scores).astype(np.int64)
    tied = keys == rule["key"]
    return (keys > rule["key"]) | (tied & np.array([u <= rule["uid"] for u in uids], bool)
                                   if len(keys) else tied)
