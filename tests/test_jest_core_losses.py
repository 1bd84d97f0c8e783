"""Tests of jest_core.losses and jest_core.scores against formulas written out here."""
import subprocess
import sys

import pytest
import torch

import jest_core as jc


def _unit_rows(rows, dim, generator, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1).to(dtype)


def _direct_loss_matrix(image, text, scale, bias):
    """-log sigmoid(label * z) in float64, straight from the definition."""
    z = scale * image.double() @ text.double().T + bias
    label = 2.0 * torch.eye(image.shape[0], dtype=torch.float64) - 1.0
    return -torch.log(torch.sigmoid(label * z))


def _pair(size, dim, generator, scale=10.0, bias=-5.0, dtype=torch.float32):
    return jc.EmbeddingPair(image=_unit_rows(size, dim, generator, dtype),
                            text=_unit_rows(size, dim, generator, dtype),
                            logit_scale=scale, logit_bias=bias)


@pytest.mark.parametrize("size", [1, 5, 33])
@pytest.mark.parametrize("dim", [3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -10.0), (30.0, 3.0)])
def test_loss_matrix_matches_direct_formula(size, dim, dtype, scale, bias):
    generator = torch.Generator().manual_seed(size * 100 + dim)
    image, text = _unit_rows(size, dim, generator, dtype), _unit_rows(size, dim, generator, dtype)
    expected = _direct_loss_matrix(image, text, scale, bias)
    got = jc.siglip_loss_matrix(image=image, text=text, logit_scale=scale, logit_bias=bias)
    assert got.shape == (size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    diagonal = jc.siglip_loss_diagonal(image=image, text=text, logit_scale=scale, logit_bias=bias)
    torch.testing.assert_close(diagonal.double(), expected.diagonal(), rtol=1e-5, atol=1e-5)


def test_loss_block_labels_by_super_batch_index():
    generator = torch.Generator().manual_seed(0)
    image, text = _unit_rows(10, 4, generator), _unit_rows(10, 4, generator)
    full = _direct_loss_matrix(image, text, 7.0, -2.0)
    rows, cols = torch.tensor([3, 0, 9, 3]), torch.tensor([9, 3, 5])
    block = jc.siglip_loss_block(image=image, text=text, rows=rows, cols=cols,
                                 logit_scale=7.0, logit_bias=-2.0)
    torch.testing.assert_close(block.double(), full[rows][:, cols], rtol=1e-5, atol=1e-6)
    # (3, 3) and (9, 9) are positives: their loss differs from the negative formula.
    assert block[0, 1] != pytest.approx(float(torch.nn.functional.softplus(
        jc.siglip_logits(image=image[3:4], text=text[3:4], logit_scale=7.0, logit_bias=-2.0))))


def test_losses_finite_for_huge_logits():
    image = torch.eye(4)
    # Positives at z = -1e4 cost softplus(1e4) = 1e4, where -log(sigmoid) in float32 is inf.
    losses = jc.siglip_loss_matrix(image=image, text=-image, logit_scale=1e4, logit_bias=0.0)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.diagonal(), torch.full((4,), 1e4))
    torch.testing.assert_close(losses[0, 1], torch.log(torch.tensor(2.0)))


@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("size,chunk_size,row_block", [(37, 5, 8), (64, 1, 2048), (20, 20, 3)])
def test_cross_loss_sums_match_direct(compute_dtype, tol, size, chunk_size, row_block):
    generator = torch.Generator().manual_seed(size)
    image, text = _unit_rows(size, 8, generator), _unit_rows(size, 8, generator)
    chunk = torch.randperm(size, generator=generator)[:chunk_size]
    full = _direct_loss_matrix(image, text, 10.0, -3.0)
    expected = full[:, chunk].sum(1) + full[chunk, :].sum(0)
    operands = jc.prepare_cross_operands(image=image, text=text, logit_scale=10.0,
                                         logit_bias=-3.0, compute_dtype=compute_dtype)
    got = jc.siglip_cross_loss_sums(operands, chunk=chunk, row_block=row_block)
    assert got.dtype == torch.float32 and got.shape == (size,)
    outside = torch.ones(size, dtype=torch.bool)
    outside[chunk] = False
    torch.testing.assert_close(got.double()[outside], expected[outside], rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", jc.SCORE_KINDS)
def test_score_matrices_and_batch_score(kind):
    generator = torch.Generator().manual_seed(1)
    # Learner and reference of different widths.
    learner, reference = _pair(15, 6, generator, 12.0, -4.0), _pair(15, 10, generator, 8.0, -2.0)
    inputs = jc.ScoringInputs(learner=learner, reference=reference)
    learner_loss = _direct_loss_matrix(learner.image, learner.text, 12.0, -4.0)
    reference_loss = _direct_loss_matrix(reference.image, reference.text, 8.0, -2.0)
    expected = {"learnability": learner_loss - reference_loss, "hard_learner": learner_loss,
                "easy_reference": -reference_loss}[kind]
    full = jc.score_matrix(inputs, kind=kind)
    torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jc.score_diagonal(inputs, kind=kind).double(), expected.diagonal(),
                               rtol=1e-5, atol=1e-5)
    subset = torch.tensor([4, 11, 0, 7])
    assert jc.batch_score(inputs, subset, kind=kind) == pytest.approx(
        float(expected[subset][:, subset].sum()), rel=1e-5, abs=1e-5)
    assert jc.batch_score(inputs, torch.tensor([], dtype=torch.int64), kind=kind) == 0.0
    chunk = torch.tensor([2, 9])
    cross = jc.cross_score_sums(jc.cross_score_operands(inputs, kind=kind), chunk=chunk)
    rest = torch.tensor([i for i in range(15) if i not in (2, 9)])
    torch.testing.assert_close(
        cross.double()[rest], (expected[:, chunk].sum(1) + expected[chunk, :].sum(0))[rest],
        rtol=1e-5, atol=1e-5)


def test_mean_random_batch_score_is_mean_of_random_subsets():
    generator = torch.Generator().manual_seed(2)
    inputs = jc.ScoringInputs(learner=_pair(9, 4, generator), reference=_pair(9, 4, generator))
    full = jc.score_matrix(inputs, kind="learnability").double()
    # Exact expectation over uniform subsets of size 3: diagonal and off-diagonal terms.
    size, batch = 9, 3
    off_diagonal = full.sum() - full.diagonal().sum()
    exact = batch / size * full.diagonal().sum() + batch * (batch - 1) / (size * (size - 1)) * off_diagonal
    estimate = jc.mean_random_batch_score(inputs, kind="learnability", batch_size=batch,
                                          num_samples=3000, generator=generator)
    assert estimate == pytest.approx(float(exact), abs=0.05 * float(full.abs().sum()) / size)


def test_embedding_validation_errors():
    generator = torch.Generator().manual_seed(3)
    good = _unit_rows(6, 4, generator)
    with pytest.raises(ValueError, match="NaN or inf"):
        jc.EmbeddingPair(image=torch.full((6, 4), float("nan")), text=good, logit_scale=1, logit_bias=0)
    inf = good.clone()
    inf[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        jc.EmbeddingPair(image=good, text=inf, logit_scale=1, logit_bias=0)
    with pytest.raises(ValueError, match="same"):
        jc.EmbeddingPair(image=good, text=good[:5], logit_scale=1, logit_bias=0)
    with pytest.raises(ValueError, match="same"):
        jc.EmbeddingPair(image=good, text=_unit_rows(6, 5, generator), logit_scale=1, logit_bias=0)
    with pytest.raises(ValueError, match="2-D"):
        jc.EmbeddingPair(image=good[0], text=good[0], logit_scale=1, logit_bias=0)
    with pytest.raises(ValueError, match="floating"):
        jc.EmbeddingPair(image=good.long(), text=good.long(), logit_scale=1, logit_bias=0)
    for scale in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logit_scale"):
            jc.EmbeddingPair(image=good, text=good, logit_scale=scale, logit_bias=0)
    with pytest.raises(ValueError, match="logit_bias"):
        jc.EmbeddingPair(image=good, text=good, logit_scale=1, logit_bias=float("nan"))
    six = jc.EmbeddingPair(image=good, text=good, logit_scale=1, logit_bias=0)
    five = jc.EmbeddingPair(image=good[:5], text=good[:5], logit_scale=1, logit_bias=0)
    with pytest.raises(ValueError, match="agree"):
        jc.ScoringInputs(learner=six, reference=five)
    with pytest.raises(ValueError, match="agree"):
        jc.ScoringInputs(learner=six, num_examples=7)
    with pytest.raises(ValueError, match="needs a learner"):
        jc.ScoringInputs()
    learner_only = jc.ScoringInputs(learner=six)
    with pytest.raises(ValueError, match="needs reference"):
        jc.score_diagonal(learner_only, kind="learnability")
    with pytest.raises(ValueError, match="needs reference"):
        jc.score_matrix(learner_only, kind="easy_reference")
    with pytest.raises(ValueError, match="needs learner"):
        jc.cross_score_operands(jc.ScoringInputs(reference=six), kind="hard_learner")
    with pytest.raises(ValueError, match="unknown score kind"):
        jc.score_diagonal(learner_only, kind="learnabilty")
    with pytest.raises(ValueError, match="distinct"):
        jc.batch_score(learner_only, torch.tensor([1, 1]), kind="hard_learner")
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        jc.batch_score(learner_only, torch.tensor([1, 6]), kind="hard_learner")


def test_import_is_light():
    code = ("import sys, jest_core; heavy = [m for m in ('apache_beam', 'fsspec', 'pyarrow') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bf16_cross_sums_have_no_systematic_bias():
    # b = -10.3 is not a bf16 number; rounding it (or bf16 logits near it) would shift
    # every negative-pair loss the same way, by ~1%. The bias is kept exact instead.
    generator = torch.Generator().manual_seed(4)
    image, text = _unit_rows(2000, 256, generator), _unit_rows(2000, 256, generator)
    chunk = torch.arange(200)
    full_rows = 10.3 * image.double() @ text.double()[chunk].T - 10.3
    full_cols = 10.3 * text.double() @ image.double()[chunk].T - 10.3
    expected = (torch.nn.functional.softplus(full_rows).sum(1)
                + torch.nn.functional.softplus(full_cols).sum(1))[200:]
    operands = jc.prepare_cross_operands(image=image, text=text, logit_scale=10.3,
                                         logit_bias=-10.3, compute_dtype=torch.bfloat16)
    relative = (jc.siglip_cross_loss_sums(operands, chunk=chunk).double()[200:] - expected) / expected
    assert abs(float(relative.mean())) < 1e-3
    assert float(relative.abs().max()) < 1e-2
