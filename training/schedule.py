"""Learning-rate schedule: linear warmup, then cosine decay over the planned run.

The rate is a pure function of the step and the *planned* total, so a run that
is continued across rounds (or resumed after a crash) sees exactly the schedule
an uninterrupted run would, with no scheduler state to save.
"""
import math

__all__ = ["warmup_cosine_lr"]


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of a `total_steps` run.

    Warmup ramps linearly from base_lr / warmup_steps at step 0 to base_lr at step
    `warmup_steps - 1` (as open_clip_train's `cosine_lr`); the cosine then decays
    from base_lr to `min_lr` at step `total_steps`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                         f"got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps else 1.0
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
