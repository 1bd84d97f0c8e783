"""Tests of jest_core.sampler: the joint sampler against a brute-force reference."""
import itertools
import math

import pytest
import torch

import jest_core as jc
from jest_core import scores as scores_module


def _unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def _random_inputs(size, seed, learner_dim=8, reference_dim=12, scale=5.0, bias=-2.0):
    generator = torch.Generator().manual_seed(seed)

    def pair(dim):
        return jc.EmbeddingPair(image=_unit(torch.randn(size, dim, generator=generator)),
                                text=_unit(torch.randn(size, dim, generator=generator)),
                                logit_scale=scale, logit_bias=bias)

    return jc.ScoringInputs(learner=pair(learner_dim), reference=pair(reference_dim))


def _direct_losses(pair):
    """[S, S] float64 -log sigmoid(label * z), written out independently of jest_core."""
    z = pair.logit_scale * pair.image.double() @ pair.text.double().T + pair.logit_bias
    label = 2.0 * torch.eye(z.shape[0], dtype=torch.float64) - 1.0
    return -torch.log(torch.sigmoid(label * z))


def _direct_scores(inputs, kind):
    if kind == "learnability":
        return _direct_losses(inputs.learner) - _direct_losses(inputs.reference)
    if kind == "hard_learner":
        return _direct_losses(inputs.learner)
    return -_direct_losses(inputs.reference)


def _subset_score(matrix, subset):
    index = torch.tensor(sorted(subset), dtype=torch.int64)
    return float(matrix[index][:, index].sum())


def _reference_joint_sampler(matrix, sizes, temperature, seed):
    """JEST from its definition: logit_i = (s(B + {i}) - s(B)) / tau, same Gumbel noise."""
    generator = torch.Generator().manual_seed(seed)
    size = matrix.shape[0]
    chosen, chunk_logits = [], []
    for chunk_size in sizes:
        base = _subset_score(matrix, chosen)
        logits = torch.full((size,), -math.inf, dtype=torch.float64)
        for i in range(size):
            if i not in chosen:
                logits[i] = (_subset_score(matrix, chosen + [i]) - base) / temperature
        uniform = torch.rand(size, dtype=torch.float64, generator=generator)
        chosen += torch.topk(logits - torch.log(-torch.log(uniform)), chunk_size).indices.tolist()
        chunk_logits.append(logits)
    return chosen, torch.stack(chunk_logits)


@pytest.mark.parametrize("size,batch,chunks,temperature,kind,seed", [
    (40, 12, 4, 1.0, "learnability", 0),
    (40, 12, 5, 0.3, "learnability", 1),   # Uneven chunks: 3, 3, 2, 2, 2.
    (25, 25, 3, 2.0, "learnability", 2),   # b = S.
    (33, 10, 10, 1.0, "hard_learner", 3),  # One example per chunk.
    (30, 9, 2, 1.0, "easy_reference", 4),
    (17, 7, 1, 1.0, "learnability", 5),    # A single chunk: independent sampling.
])
def test_joint_sampler_matches_definition(size, batch, chunks, temperature, kind, seed):
    inputs = _random_inputs(size, seed=100 + seed)
    sizes = jc.chunk_sizes(batch, chunks)
    expected_indices, expected_logits = _reference_joint_sampler(
        _direct_scores(inputs, kind), sizes, temperature, seed)
    selection = jc.joint_select(inputs, kind=kind, batch_size=batch, num_chunks=chunks,
                                temperature=temperature,
                                generator=torch.Generator().manual_seed(seed), record_logits=True)
    assert selection.indices.tolist() == expected_indices
    assert selection.chunk_logits.shape == (chunks, size)
    torch.testing.assert_close(selection.chunk_logits, expected_logits, rtol=1e-5, atol=1e-4)
    # `score` is the (pre-noise, post-temperature) logit each example was drawn with.
    expected_score = expected_logits[selection.chunk.long(), selection.indices]
    torch.testing.assert_close(selection.score.double(), expected_score, rtol=1e-5, atol=1e-4)


def test_last_chunk_cross_terms_are_skipped(monkeypatch):
    calls = []
    real = scores_module.cross_score_sums

    def counting(*args, **kwargs):
        calls.append(len(kwargs["chunk"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(scores_module, "cross_score_sums", counting)
    jc.joint_select(_random_inputs(50, seed=0), batch_size=10, num_chunks=4,
                    generator=torch.Generator().manual_seed(0))
    assert calls == [3, 3, 2]  # Chunks 1-3 of [3, 3, 2, 2]; the last one conditions nothing.


def test_brute_force_tiny_super_batches():
    size, batch, num_seeds = 12, 4, 150
    totals = {"optimum": 0.0, "random": 0.0, "jest": 0.0, "independent": 0.0}
    for super_batch in range(3):
        inputs = _random_inputs(size, seed=super_batch, learner_dim=8, reference_dim=8)
        matrix = _direct_scores(inputs, "learnability")
        all_scores = [_subset_score(matrix, list(c)) for c in itertools.combinations(range(size), batch)]
        assert len(all_scores) == 495
        totals["optimum"] += max(all_scores)
        totals["random"] += sum(all_scores) / len(all_scores)
        for method in ("jest", "independent"):
            for seed in range(num_seeds):
                selection = jc.select(inputs, method=method, batch_size=batch, num_chunks=batch,
                                      generator=torch.Generator().manual_seed(seed))
                totals[method] += _subset_score(matrix, selection.indices.tolist()) / num_seeds
    # Fraction of the optimum's gain over random that each method achieves.
    gain = {m: (totals[m] - totals["random"]) / (totals["optimum"] - totals["random"])
            for m in ("jest", "independent")}
    print(f"\nS=12 b=4: mean batch score jest {totals['jest'] / 3:.2f}, independent "
          f"{totals['independent'] / 3:.2f}, random {totals['random'] / 3:.2f}, optimum "
          f"{totals['optimum'] / 3:.2f}; jest/optimum = {totals['jest'] / totals['optimum']:.3f}; "
          f"gain over random as a fraction of the optimum's: jest {gain['jest']:.3f}, "
          f"independent {gain['independent']:.3f}")
    assert gain["jest"] > 0.8
    assert gain["jest"] > gain["independent"] + 0.05


def _planted_block_inputs(seed, size=256, dim=32, block_size=24):
    """Random pairs plus a hidden block whose members the learner confuses with each other.

    The learner puts every block image and text near one shared direction, so block
    pairs are mutual hard negatives for it; the reference separates everything. The
    block's diagonal learnability is unremarkable, so only the joint (off-diagonal)
    terms reveal it.
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randperm(size, generator=generator)[:block_size]
    shared = 2.0 * torch.randn(dim, generator=generator)

    def pair(hide_block):
        image = torch.randn(size, dim, generator=generator)
        text = image + 0.5 * torch.randn(size, dim, generator=generator)
        if hide_block:
            image[block] = shared + torch.randn(block_size, dim, generator=generator)
            text[block] = shared + torch.randn(block_size, dim, generator=generator)
        return jc.EmbeddingPair(image=_unit(image), text=_unit(text), logit_scale=10.0,
                                logit_bias=-5.0)

    return jc.ScoringInputs(learner=pair(True), reference=pair(False)), block


def test_planted_block_is_found_by_jest_not_by_independent():
    found = {"jest": 0, "independent": 0}
    for super_batch in range(3):
        inputs, block = _planted_block_inputs(super_batch)
        in_block = torch.zeros(inputs.size, dtype=torch.bool)
        in_block[block] = True
        diagonal = jc.score_diagonal(inputs, kind="learnability")
        assert abs(float(diagonal[in_block].mean() - diagonal[~in_block].mean())) < 1.0
        for method in found:
            for seed in range(4):
                selection = jc.select(inputs, method=method, batch_size=48, num_chunks=8,
                                      generator=torch.Generator().manual_seed(seed))
                found[method] += int(in_block[selection.indices].sum())
    # 12 selections of 48 out of 256 with a block of 24: uniform finds 4.5 per selection.
    print(f"\nplanted block members found per selection: jest {found['jest'] / 12:.1f}, "
          f"independent {found['independent'] / 12:.1f} (uniform expects 4.5 of 24)")
    assert found["jest"] > 3 * found["independent"]
    assert found["jest"] / 12 > 15


@pytest.mark.parametrize("method", jc.METHODS)
def test_every_method_deterministic_exact_and_pure(method):
    inputs = _random_inputs(60, seed=7)
    global_state = torch.get_rng_state()

    def run(seed):
        return jc.select(inputs, method=method, batch_size=14, num_chunks=4,
                         generator=torch.Generator().manual_seed(seed))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(torch.get_rng_state(), global_state)  # Global RNG untouched.
    assert torch.equal(first.indices, again.indices) and torch.equal(first.score, again.score)
    if method != "independent-topk":
        assert not torch.equal(first.indices, other.indices)
    assert first.indices.dtype == torch.int64 and first.indices.shape == (14,)
    assert len(torch.unique(first.indices)) == 14
    assert 0 <= int(first.indices.min()) and int(first.indices.max()) < 60
    assert first.chunk.dtype == torch.int32 and first.score.dtype == torch.float32
    assert torch.isfinite(first.score).all()
    expected_chunks = [4, 4, 3, 3] if method in ("jest", "easy-reference", "hard-learner") else [14]
    assert torch.bincount(first.chunk).tolist() == expected_chunks
    assert torch.equal(first.chunk, torch.sort(first.chunk).values)
    for pair, loss in ((inputs.learner, first.learner_loss_diag),
                       (inputs.reference, first.reference_loss_diag)):
        torch.testing.assert_close(loss.double(), _direct_losses(pair).diagonal(),
                                   rtol=1e-5, atol=1e-5)


def test_loss_diagonals_are_nan_for_missing_models():
    inputs = _random_inputs(20, seed=0)
    learner_only = jc.ScoringInputs(learner=inputs.learner)
    selection = jc.select(learner_only, method="hard-learner", batch_size=5, num_chunks=2,
                          generator=torch.Generator().manual_seed(0))
    assert torch.isnan(selection.reference_loss_diag).all()
    assert not torch.isnan(selection.learner_loss_diag).any()
    # Uniform needs only the super-batch size.
    selection = jc.select(jc.ScoringInputs(num_examples=20), method="uniform", batch_size=5,
                          generator=torch.Generator().manual_seed(0))
    assert sorted(selection.indices.tolist()) == sorted(set(selection.indices.tolist()))
    assert torch.isnan(selection.learner_loss_diag).all() and selection.learner_loss_diag.shape == (20,)


def test_independent_topk_takes_largest_diagonal_scores():
    inputs = _random_inputs(30, seed=3)
    diagonal = _direct_scores(inputs, "learnability").diagonal()
    selection = jc.select(inputs, method="independent-topk", batch_size=6, generator=None)
    assert selection.indices.tolist() == torch.topk(diagonal, 6).indices.tolist()


def test_sizes_and_filter_ratios():
    assert jc.chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert jc.chunk_sizes(16, 16) == [1] * 16
    assert jc.chunk_sizes(7, 1) == [7]
    assert jc.super_batch_size(4096, 0.8) == 20480
    assert jc.super_batch_size(10, 0.0) == 10
    assert jc.super_batch_size(3, 0.5) == 6
    assert jc.effective_filter_ratio(4096, 20480) == pytest.approx(0.8)
    assert jc.effective_filter_ratio(5, 5) == 0.0
    with pytest.raises(ValueError, match="filter_ratio"):
        jc.super_batch_size(10, 1.0)
    with pytest.raises(ValueError, match="filter_ratio"):
        jc.super_batch_size(10, -0.1)
    with pytest.raises(ValueError, match="batch_size"):
        jc.effective_filter_ratio(6, 5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size=-3), "batch_size must be an integer >= 1"),
    (dict(batch_size=2.5), "batch_size must be an integer >= 1"),
    (dict(batch_size=21), "batch_size=21 > super-batch size S=20"),
    (dict(num_chunks=0), "num_chunks must be an integer >= 1"),
    (dict(num_chunks=6), "num_chunks=6 > batch_size=5"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(generator=None), "explicit torch.Generator"),
    (dict(compute_dtype=torch.float16), "compute_dtype"),
    (dict(method="jset"), "unknown method 'jset'"),
])
def test_select_errors(kwargs, message):
    arguments = dict(method="jest", batch_size=5, num_chunks=2, temperature=1.0,
                     generator=torch.Generator().manual_seed(0), compute_dtype=torch.float32)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        jc.select(_random_inputs(20, seed=0), **arguments)


@pytest.mark.parametrize("method,missing", [
    ("jest", "reference"), ("independent", "reference"), ("independent-topk", "reference"),
    ("easy-reference", "reference"), ("hard-learner", "learner")])
def test_select_errors_on_missing_embeddings(method, missing):
    inputs = _random_inputs(20, seed=0)
    present = "learner" if missing == "reference" else "reference"
    partial = jc.ScoringInputs(**{present: getattr(inputs, present)})
    with pytest.raises(ValueError, match=f"needs .*{missing}"):
        jc.select(partial, method=method, batch_size=4, num_chunks=2,
                  generator=torch.Generator().manual_seed(0))


def test_uniform_and_independent_errors():
    inputs = _random_inputs(20, seed=0)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch_size=21"):
        jc.select(jc.ScoringInputs(num_examples=20), method="uniform", batch_size=21,
                  generator=generator)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        jc.select(inputs, method="uniform", batch_size=3, generator=1234)
    with pytest.raises(ValueError, match="temperature"):
        jc.select(inputs, method="independent", batch_size=3, temperature=0.0, generator=generator)
    with pytest.raises(ValueError, match="cannot draw 3 items"):
        jc.gumbel_top_k(torch.tensor([0.0, -math.inf, 1.0]), 3, generator=generator)


def test_gumbel_top_k_stable_at_huge_logits():
    generator = torch.Generator().manual_seed(0)
    # Gaps of 100 dwarf Gumbel noise: the top-k come out in logit order, every time.
    logits = 1e4 + 100.0 * torch.randperm(50, generator=generator).double()
    expected = torch.argsort(logits, descending=True)[:10].tolist()
    for _ in range(20):
        assert jc.gumbel_top_k(logits, 10, generator=generator).tolist() == expected
    huge = torch.tensor([1e30, 1e4, -1e30, 2e4], dtype=torch.float64)
    assert jc.gumbel_top_k(huge, 4, generator=generator).tolist() == [0, 3, 1, 2]
    # Masked (-inf) candidates are never drawn, even when exactly k remain.
    masked = torch.tensor([1e4, -math.inf, 1e4 + 1, -math.inf, 1e4 - 1])
    for _ in range(20):
        assert sorted(jc.gumbel_top_k(masked, 3, generator=generator).tolist()) == [0, 2, 4]
    noise = jc.gumbel_noise(100_000, generator=generator)
    assert torch.isfinite(noise).all() and abs(float(noise.mean()) - 0.5772) < 0.02


def test_joint_select_stable_at_huge_scores():
    inputs = _random_inputs(40, seed=5, scale=1e4, bias=-1e3)
    diagonal = jc.score_diagonal(inputs, kind="learnability")
    assert float(diagonal.abs().max()) > 1e3  # Logits are huge.
    selection = jc.joint_select(inputs, batch_size=10, num_chunks=10, record_logits=True,
                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(selection.score).all() and len(torch.unique(selection.indices)) == 10
    # Where the best candidate leads by far more than Gumbel noise spans, it is drawn.
    decisive = 0
    for chunk, logits in enumerate(selection.chunk_logits):
        top = torch.topk(logits, 2)
        if float(top.values[0] - top.values[1]) > 50:
            decisive += 1
            assert int(selection.indices[chunk]) == int(top.indices[0])
    assert decisive >= 5


def test_bf16_compute_close_to_fp32():
    inputs = _random_inputs(3000, seed=11, learner_dim=64, reference_dim=64, scale=10.0, bias=-5.0)
    chunk = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:100]
    exact, approx = (jc.cross_score_sums(jc.cross_score_operands(
        inputs, kind="learnability", compute_dtype=dtype), chunk=chunk)
        for dtype in (torch.float32, torch.bfloat16))
    assert float((approx - exact).abs().max()) < 0.01 * float(exact.abs().max())
    runs = {dtype: jc.joint_select(inputs, batch_size=600, num_chunks=6,
                                   generator=torch.Generator().manual_seed(1),
                                   compute_dtype=dtype, record_logits=True)
            for dtype in (torch.float32, torch.bfloat16)}
    fp32, bf16 = runs[torch.float32], runs[torch.bfloat16]
    # Chunk 1 only uses the float32 diagonal; chunk 2 conditions on the same chunk 1.
    assert torch.equal(fp32.indices[:100], bf16.indices[:100])
    finite = torch.isfinite(fp32.chunk_logits[1])
    scale = float(fp32.chunk_logits[1][finite].abs().max())
    assert float((fp32.chunk_logits[1] - bf16.chunk_logits[1])[finite].abs().max()) < 0.005 * scale
    overlap = len(set(fp32.indices.tolist()) & set(bf16.indices.tolist())) / 600
    assert overlap > 0.9
    fp32_score = jc.batch_score(inputs, fp32.indices, kind="learnability")
    bf16_score = jc.batch_score(inputs, bf16.indices, kind="learnability")
    assert bf16_score == pytest.approx(fp32_score, rel=0.01)


def test_gumbel_noise_finite_at_uniform_extremes(monkeypatch):
    # torch.rand can return exactly 0.0, where -log(-log(u)) would be -inf and tie with
    # masked candidates; the noise must stay finite at both ends of [0, 1).
    extremes = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: extremes.clone())
    noise = jc.gumbel_noise(3, generator=torch.Generator())
    assert torch.isfinite(noise).all()
