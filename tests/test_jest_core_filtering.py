"""CLIP-score filtering (DataComp): exact top-x% counts, by similarity, ties by key."""
import numpy as np
import pytest

from jest_core import filtering


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_clip_scores_are_the_pairwise_cosines():
    image = _unit([[1, 0], [0, 1], [1, 1]])
    text = _unit([[1, 0], [1, 0], [0, 1]])
    np.testing.assert_allclose(filtering.clip_scores(image=image, text=text),
                               [1.0, 0.0, np.sqrt(0.5)], atol=1e-6)
    assert filtering.clip_score_flops(3, 2) == 12
    with pytest.raises(ValueError, match="one shape"):
        filtering.clip_scores(image=image, text=text[:2])


@pytest.mark.parametrize("n, fraction, expected", [
    (1000, 0.3, 300), (1000, 0.2, 200), (7, 0.5, 4), (10, 0.25, 3), (3, 0.01, 1), (5, 1.0, 5),
    (0, 0.3, 0)])
def test_keep_count_is_round_half_up_of_x_n(n, fraction, expected):
    assert filtering.keep_count(n, fraction) == expected


@pytest.mark.parametrize("fraction", [0.3, 0.2, 0.5])
def test_top_fraction_keeps_exactly_the_highest_similarities(fraction):
    rng = np.random.default_rng(0)
    n = 1000
    scores = rng.normal(size=n)
    keys = [f"u{i:04d}" for i in rng.permutation(n)]
    kept = filtering.top_fraction(scores, fraction=fraction, keys=keys)
    k = round(fraction * n)
    assert len(kept) == k and len(set(kept.tolist())) == k
    assert list(kept) == sorted(kept)
    # Every kept score is at least every dropped one: a global threshold.
    dropped = np.setdiff1d(np.arange(n), kept)
    assert scores[kept].min() >= scores[dropped].max()
    np.testing.assert_array_equal(np.sort(scores[kept]), np.sort(scores)[-k:])
    # Input order does not matter.
    perm = rng.permutation(n)
    again = filtering.top_fraction(scores[perm], fraction=fraction, keys=[keys[i] for i in perm])
    assert sorted(perm[again].tolist()) == kept.tolist()


def test_ties_at_the_threshold_are_broken_by_key_and_nan_ranks_last():
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.5, 0.1])
    keys = ["e", "a", "c", "z", "b", "d"]
    # Keep 3: 0.9 (a), then two of the three 0.5s by key: b (index 4), c (index 2).
    assert filtering.top_fraction(scores, fraction=0.5, keys=keys).tolist() == [1, 2, 4]
    assert 3 not in filtering.top_fraction(scores, fraction=5 / 6, keys=keys).tolist()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        filtering.top_fraction(scores, fraction=0.0, keys=keys)
    with pytest.raises(ValueError, match="one key per score"):
        filtering.top_fraction(scores, fraction=0.5, keys=keys[:2])
