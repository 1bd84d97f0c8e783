"""Joint example selection (JEST; Evans et al. 2024, Alg. 1) and its baselines.

`select(inputs, method=...)` picks a batch of b examples out of a super-batch of S:

    method              score A (see jest_core.scores)      how                       needs
    "jest"              learnability  L_learner - L_ref    joint, in N chunks        learner + reference
    "easy-reference"    easy_reference  -L_ref             joint, in N chunks        reference
    "hard-learner"      hard_learner  L_learner            joint, in N chunks        learner
    "independent"       learnability, diagonal A_ii only   Gumbel-top-b of A_ii/tau  learner + reference
    "independent-topk"  learnability, diagonal A_ii only   the b largest A_ii        learner + reference
    "uniform"           none                               b of S uniformly          nothing but S

"independent" is per-example learnability prioritisation (as in RHO-LOSS); it is the
baseline JEST is compared against.

Joint sampling. b is split into N chunks whose sizes differ by at most one (the
first b mod N chunks get the extra example). Chunk 1 is drawn from logits A_ii / tau;
each later chunk is drawn without replacement from the remaining candidates with
logits (A_ii + sum_{j in B} (A_ij + A_ji)) / tau = (s(B + {i}) - s(B)) / tau, B being
everything selected so far and s(B) = sum_{i,j in B} A_ij. The conditional sums are
kept in a running [S] float64 vector; after each chunk J only the cross terms between
all S candidates and J are computed (2 matmuls [S, d] x [d, |J|] per model), so memory
is O(S d + S b / N) and never S x S. The last chunk's cross terms are never needed, so
joint selection with both models costs 8 S b d (N - 1) / N FLOPs.

Sampling without replacement from softmax(logits) is done with Gumbel-top-k:
top-k of logits + Gumbel noise, which needs no exp and is exact for logits of any
finite size. Randomness comes only from the `torch.Generator` the caller passes
(derived from seed, round and super-batch), never from global RNG state. Each joint
chunk consumes exactly one `gumbel_noise(S, generator=...)` draw, in chunk order;
"independent" consumes one draw, "uniform" one `torch.randperm(S)`, "independent-topk"
none. Tests rely on this contract.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from jest_core import losses
from jest_core import scores

METHODS = ("jest", "easy-reference", "hard-learner", "independent", "independent-topk",
           "uniform")
_JOINT_KINDS = {"jest": "learnability", "easy-reference": "easy_reference",
                "hard-learner": "hard_learner"}
JOINT_METHODS = tuple(_JOINT_KINDS)  # Drawn in N chunks: they need N <= b.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
# The embeddings each method scores with; the select stage, the round job and the
# trainer's online selection all read it here.
NEEDS = {"jest": ("reference", "learner"), "independent": ("reference", "learner"),
         "independent-topk": ("reference", "learner"), "easy-reference": ("reference",),
         "hard-learner": ("learner",), "uniform": ()}


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
    """A selected batch.

    Attributes:
      indices: [b] int64 super-batch indices, in selection order.
      chunk: [b] int32 chunk in which each example was drawn (0 for non-joint methods).
      score: [b] float32 logit each example had when it was drawn, after division by
        the temperature and before Gumbel noise: (A_ii + conditional sum) / tau for
        joint methods, A_ii / tau for independent ones, 0 for uniform.
      learner_loss_diag: [S] float32 learner loss of every matching pair; NaN if no
        learner embeddings were given.
      reference_loss_diag: [S] float32, likewise for the reference model.
      chunk_logits: [N, S] float64 logits every chunk was drawn from (-inf for already
        selected candidates), only when `joint_select(record_logits=True)`.
    """
    indices: torch.Tensor
    chunk: torch.Tensor
    score: torch.Tensor
    learner_loss_diag: torch.Tensor
    reference_loss_diag: torch.Tensor
    chunk_logits: torch.Tensor | None = None


def score_kind(method: str) -> str:
    """The score a method ranks by; non-joint methods report learnability."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return _JOINT_KINDS.get(method, "learnability")


def needed_embeddings(method: str) -> tuple:
    """The embeddings ("reference", "learner") a method scores with."""
    if method not in NEEDS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(NEEDS)}")
    return NEEDS[method]


def super_batch_size(batch_size: int, filter_ratio: float) -> int:
    """S = round(b / (1 - f)): the super-batch that filters a fraction f to keep b."""
    _check_positive_int("batch_size", batch_size)
    if not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter_ratio must be in [0, 1), got {filter_ratio}")
    return int(round(batch_size / (1.0 - filter_ratio)))


def effective_filter_ratio(batch_size: int, super_batch_size: int) -> float:
    """f = 1 - b / S, the fraction of the super-batch actually filtered out."""
    _check_batch_size(batch_size, super_batch_size)
    return 1.0 - batch_size / super_batch_size


def chunk_sizes(batch_size: int, num_chunks: int) -> list[int]:
    """Sizes of the N chunks: differ by at most one, the first b mod N are larger."""
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_chunks", num_chunks)
    if num_chunks > batch_size:
        raise ValueError(f"num_chunks={num_chunks} > batch_size={batch_size}: every chunk "
                         f"needs at least one example; use num_chunks <= batch_size")
    base, extra = divmod(batch_size, num_chunks)
    return [base + 1] * extra + [base] * (num_chunks - extra)


def gumbel_noise(size: int, *, generator: torch.Generator) -> torch.Tensor:
    """[size] float64 standard Gumbel noise, always finite.

    u is clamped away from 0 so -log(-log(u)) never becomes -inf, which would tie
    with masked (-inf) candidates in the top-k.
    """
    uniform = torch.rand(size, dtype=torch.float64, generator=generator)
    uniform.clamp_(min=torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(uniform))


def gumbel_top_k(logits: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """k draws without replacement from softmax(logits), via top-k of logits + Gumbel.

    Args:
      logits: [S] float logits; -inf marks candidates that cannot be drawn.
      k: number of draws, at most the number of finite logits.

    Returns:
      [k] int64 indices in draw order.
    """
    if int(torch.isfinite(logits).sum()) < k:
        raise ValueError(f"cannot draw {k} items: only {int(torch.isfinite(logits).sum())} "
                         f"finite logits")
    perturbed = logits.double() + gumbel_noise(logits.shape[0], generator=generator)
    return torch.topk(perturbed, k).indices


def joint_select(inputs: scores.ScoringInputs, *, kind: scores.ScoreKind = "learnability",
                 batch_size: int, num_chunks: int, temperature: float = 1.0,
                 generator: torch.Generator, compute_dtype: torch.dtype = torch.float32,
                 record_logits: bool = False) -> Selection:
    """Joint sampling of `batch_size` examples in `num_chunks` chunks (Alg. 1).

    Args:
      inputs: embeddings of the super-batch ([S, d] per model).
      kind: score matrix A; see `jest_core.scores`.
      batch_size: b.
      num_chunks: N (the paper uses 16).
      temperature: tau > 0 dividing the logits.
      generator: the only source of randomness.
      compute_dtype: torch.float32 or torch.bfloat16 for the cross-term matmuls; the
        diagonal and the conditional sums stay in float32 / float64.
      record_logits: also return the [N, S] logits of every chunk (for tests).

    Returns:
      A `Selection`.
    """
    _check_batch_size(batch_size, inputs.size)
    sizes = chunk_sizes(batch_size, num_chunks)
    _check_temperature(temperature)
    _check_generator(generator)
    _check_compute_dtype(compute_dtype)
    diagonal = scores.score_diagonal(inputs, kind=kind).double()
    # Cast and laid out once, not per chunk: each chunk re-reads all S rows.
    operands = scores.cross_score_operands(inputs, kind=kind, compute_dtype=compute_dtype)
    conditional = torch.zeros(inputs.size, dtype=torch.float64)
    selected = torch.zeros(inputs.size, dtype=torch.bool)
    picked_chunks, picked_logits, recorded = [], [], []
    for chunk_index, size in enumerate(sizes):
        logits = (diagonal + conditional) / temperature
        logits.masked_fill_(selected, -math.inf)
        picked = gumbel_top_k(logits, size, generator=generator)
        selected[picked] = True
        picked_chunks.append(picked)
        picked_logits.append(logits[picked])
        if record_logits:
            recorded.append(logits)
        if chunk_index < len(sizes) - 1:  # The last chunk conditions nothing.
            conditional += scores.cross_score_sums(operands, chunk=picked).double()
    chunk_ids = [torch.full((len(p),), i, dtype=torch.int32) for i, p in enumerate(picked_chunks)]
    return Selection(indices=torch.cat(picked_chunks), chunk=torch.cat(chunk_ids),
                     score=torch.cat(picked_logits).float(),
                     learner_loss_diag=_loss_diagonal(inputs.learner, inputs.size),
                     reference_loss_diag=_loss_diagonal(inputs.reference, inputs.size),
                     chunk_logits=torch.stack(recorded) if record_logits else None)


def independent_select(inputs: scores.ScoringInputs, *,
                       kind: scores.ScoreKind = "learnability", batch_size: int,
                       temperature: float = 1.0, generator: torch.Generator | None,
                       top_k: bool = False) -> Selection:
    """Per-example selection on the diagonal A_ii only (RHO-LOSS-style baseline).

    Draws b without replacement from softmax(A_ii / tau) by Gumbel-top-k, or with
    `top_k=True` takes the b largest A_ii (then `generator` may be None).

    Returns:
      A `Selection` with chunk 0 for every example.
    """
    _check_batch_size(batch_size, inputs.size)
    _check_temperature(temperature)
    if not top_k:
        _check_generator(generator)
    logits = scores.score_diagonal(inputs, kind=kind).double() / temperature
    if top_k:
        picked = torch.topk(logits, batch_size).indices
    else:
        picked = gumbel_top_k(logits, batch_size, generator=generator)
    return Selection(indices=picked, chunk=torch.zeros(batch_size, dtype=torch.int32),
                     score=logits[picked].float(),
                     learner_loss_diag=_loss_diagonal(inputs.learner, inputs.size),
                     reference_loss_diag=_loss_diagonal(inputs.reference, inputs.size))


def uniform_select(inputs: scores.ScoringInputs, *, batch_size: int,
                   generator: torch.Generator) -> Selection:
    """b of the S examples uniformly at random; embeddings only feed the loss fields.

    `inputs` may be `ScoringInputs(num_examples=S)`.
    """
    _check_batch_size(batch_size, inputs.size)
    _check_generator(generator)
    picked = torch.randperm(inputs.size, generator=generator)[:batch_size]
    return Selection(indices=picked, chunk=torch.zeros(batch_size, dtype=torch.int32),
                     score=torch.zeros(batch_size, dtype=torch.float32),
                     learner_loss_diag=_loss_diagonal(inputs.learner, inputs.size),
                     reference_loss_diag=_loss_diagonal(inputs.reference, inputs.size))


def select(inputs: scores.ScoringInputs, *, method: str, batch_size: int,
           num_chunks: int = 16, temperature: float = 1.0, generator: torch.Generator,
           compute_dtype: torch.dtype = torch.float32) -> Selection:
    """Select `batch_size` examples of the super-batch with `method` (see module doc).

    Args:
      inputs: the super-batch's embeddings (or just its size, for "uniform").
      method: one of `METHODS`.
      batch_size: b, 1 <= b <= S.
      num_chunks: N, 1 <= N <= b; used by the joint methods only.
      temperature: tau > 0; used by "independent" and the joint methods.
      generator: the only source of randomness (unused by "independent-topk").
      compute_dtype: torch.float32 or torch.bfloat16 for the joint matmuls.

    Returns:
      A `Selection`.
    """
    if method in _JOINT_KINDS:
        return joint_select(inputs, kind=_JOINT_KINDS[method], batch_size=batch_size,
                            num_chunks=num_chunks, temperature=temperature,
                            generator=generator, compute_dtype=compute_dtype)
    if method in ("independent", "independent-topk"):
        return independent_select(inputs, kind="learnability", batch_size=batch_size,
                                  temperature=temperature, generator=generator,
                                  top_k=method == "independent-topk")
    if method == "uniform":
        return uniform_select(inputs, batch_size=batch_size, generator=generator)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _loss_diagonal(pair: scores.EmbeddingPair | None, size: int) -> torch.Tensor:
    if pair is None:
        return torch.full((size,), math.nan, dtype=torch.float32)
    return losses.siglip_loss_diagonal(image=pair.image, text=pair.text,
                                       logit_scale=pair.logit_scale, logit_bias=pair.logit_bias)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_batch_size(batch_size: int, super_batch: int) -> None:
    _check_positive_int("batch_size", batch_size)
    if batch_size > super_batch:
        raise ValueError(f"batch_size={batch_size} > super-batch size S={super_batch}: "
                         f"cannot select more examples than there are candidates")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_generator(generator: torch.Generator | None) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"pass an explicit torch.Generator (derived from seed, round and "
                         f"super-batch), got {type(generator).__name__}")


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
