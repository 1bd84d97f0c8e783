"""Measured FLOPs, so reports compare methods at equal compute (training + scoring).

Counts come from `torch.utils.flop_counter.FlopCounterMode`, which intercepts
matmuls, convolutions and attention as they run; the count does not change the
computation, so a step can be measured while it trains.
"""
import contextlib
from typing import Callable, Hashable, Tuple, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "StepFlops", "forward_flops"]

T = TypeVar("T")


@contextlib.contextmanager
def _mha_fastpath_disabled():
    # In eval mode nn.MultiheadAttention runs one fused kernel the counter cannot see
    # into, which would hide a ViT's attention; the unfused path computes the same thing.
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_flops(fn: Callable[[], T]) -> Tuple[T, int]:
    """(fn(), FLOPs it executed), counting backward passes run inside `fn` too."""
    with _mha_fastpath_disabled(), FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


class StepFlops:
    """FLOPs of a training step, measured once per input shape and then reused."""

    def __init__(self):
        self._by_shape = {}

    def run(self, shape_key: Hashable, fn: Callable[[], T]) -> Tuple[T, int]:
        if shape_key in self._by_shape:
            return fn(), self._by_shape[shape_key]
        result, flops = count_flops(fn)
        self._by_shape[shape_key] = flops
        return result, flops


def forward_flops(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """FLOPs of embedding `images` and `tokens` with both towers (no gradients)."""
    with torch.no_grad():
        _, flops = count_flops(lambda: (model.encode_image(images), model.encode_text(tokens)))
    return flops
