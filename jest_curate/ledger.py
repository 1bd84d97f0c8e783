"""The all-in FLOP ledger of a curation run: everything spent to reach a checkpoint.

    component            what                                                  who pays
    reference_training   training the reference on the curated set (with       methods that
                         early stopping: every step run and every held-out     consult the
                         evaluation, not just up to the best checkpoint)       reference
    reference_scoring    the reference's forward pass over the pool, once      same
    learner_scoring      the learner's forward passes over candidates, each    learner-scored
                         rescoring                                             methods
    selection            selection matmuls (measured per super-batch shape);   scored methods
                         clip-score's image-text similarities over the pool
    training             the learner's forward and backward passes            every method

Two totals are reported side by side:
- **all-in**: the sum of every component;
- **reference amortised**: all-in minus reference_training. This *assumes* the
  reference is trained once and reused by so many curation runs that its training
  cost per run tends to zero; its scoring of the pool is still paid per run.

Values are cumulative up to each round, so a ledger can be read at any checkpoint.
"""
from typing import Optional

__all__ = ["COMPONENTS", "round_ledger", "run_ledger", "reference_training_flops",
           "AMORTISED_ASSUMPTION"]

COMPONENTS = ("reference_training", "reference_scoring", "learner_scoring", "selection",
              "training")
AMORTISED_ASSUMPTION = ("reference amortised: assumes the reference is trained once and "
                        "reused by many curation runs, so its training cost per run tends to "
                        "zero; its scoring of the pool is still counted")


def round_ledger(*, reference_training: int, reference_scoring: int, learner_scoring: int,
                 selection: int, training: int) -> dict:
    """One cumulative ledger entry: the components, `all_in` and `amortised`."""
    parts = {"reference_training": int(reference_training),
             "reference_scoring": int(reference_scoring),
             "learner_scoring": int(learner_scoring), "selection": int(selection),
             "training": int(training)}
    if any(v < 0 for v in parts.values()):
        raise ValueError(f"FLOP counts must be >= 0, got {parts}")
    all_in = sum(parts.values())
    return {**parts, "all_in": all_in, "amortised": all_in - parts["reference_training"]}


def run_ledger(records: list, *, reference_training: int, reference_scoring: int,
               filter_flops: int = 0) -> list:
    """Cumulative ledgers, one per round record (rounds' round.json contents).

    Args:
      records: per round {"train_flops" (cumulative), "scoring_flops" (this round's
        learner scoring), "selection_flops" (this round's, optional)}.
      reference_training, reference_scoring: paid once, before round 0.
      filter_flops: a one-off pool filter (clip-score), counted as selection.
    """
    learner, selection, out = 0, int(filter_flops), []
    for rec in records:
        learner += rec.get("scoring_flops", 0)
        selection += rec.get("selection_flops", 0)
        out.append(round_ledger(reference_training=reference_training,
                                reference_scoring=reference_scoring, learner_scoring=learner,
                                selection=selection, training=rec["train_flops"]))
    return out


def reference_training_flops(checkpoint: Optional[str], recorded: Optional[int]) -> int:
    """The recorded cost if given, else the training FLOPs stored in the checkpoint."""
    if recorded is not None:
        return int(recorded)
    if checkpoint is None:
        return 0
    from jest_curate import formats
    extra = formats.load_checkpoint(checkpoint).extra or {}
    return int(extra.get("flops", 0))
