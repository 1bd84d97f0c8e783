"""Measured FLOPs, so reports compare methods at equal compute (training + scoring).

Counts come from `torch.utils.flop_counter.FlopCounterMode`, which intercepts
matmuls, convolutions and attention as they run; the count does not change the
computation, so a step can be measured while it trains.

The count must not depend on which torch build pip resolved. torch's own formula table
misses kernels that some builds dispatch to (2.14 sends `nn.MultiheadAttention` on CPU to
`aten._scaled_dot_product_flash_attention_for_cpu`, which it counts as 0), so every
scaled-dot-product-attention kernel this torch has is counted here with the standard
formula, and a matmul-like op that no formula covers stops the count (`UncountedOpError`)
instead of silently counting 0.

Convention: model FLOPs. A multiply-add counts as 2, and a backward pass counts its
gradient matmuls only (2x the forward for attention as for every matmul). torch's own
formula for its fused attention kernels also counts the scores they recompute (2.5x), so
the same step would count differently on the math path and on a fused kernel.
"""
import contextlib
import re
from typing import Callable, Dict, Hashable, Sequence, Set, Tuple, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "StepFlops", "forward_flops", "UncountedOpError",
           "sdpa_forward_flops", "is_matmul_like"]

T = TypeVar("T")

_aten = torch.ops.aten


class UncountedOpError(RuntimeError):
    """A matmul-like op ran that no FLOP formula covers (its FLOPs would count as 0)."""


# --------------------------------------------------------------------------- #
# Formulas (a multiply-add counts as 2)
# --------------------------------------------------------------------------- #

def _bhsd(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """[batch, heads, seq, dim] of an attention operand ([b, s, d] reads as one head)."""
    if len(shape) == 4:
        return tuple(shape)
    if len(shape) == 3:
        return shape[0], 1, shape[1], shape[2]
    raise ValueError(f"attention operand of unexpected shape {tuple(shape)}")


def sdpa_forward_flops(query_shape, key_shape, value_shape) -> int:
    """q kᵀ then (scores) v; grouped-query heads broadcast to the query's heads."""
    b, h, s_q, d_qk = _bhsd(query_shape)
    _, _, s_k, _ = _bhsd(key_shape)
    d_v = _bhsd(value_shape)[3]
    return 2 * b * h * s_q * s_k * d_qk + 2 * b * h * s_q * s_k * d_v


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_forward_flops(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: two forward passes' worth of matmuls.
    return 2 * sdpa_forward_flops(query, key, value)


def _mv(matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]


def _addmv(bias, matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _mm(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def _addmm(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def _addbmm(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]


def _extra_formulas() -> Dict:
    """Formulas for ops torch's table may lack, for every such op this torch has."""
    formulas = {}
    for name in dir(_aten):
        if name.startswith("_scaled_dot_product_"):
            formulas[name] = _sdpa_backward if name.endswith("_backward") else _sdpa_forward
    formulas.update({"mv": _mv, "addmv": _addmv, "dot": _dot, "vdot": _dot, "_int_mm": _mm,
                     "_addmm_activation": _addmm, "addbmm": _addbmm})
    return {getattr(_aten, name): f for name, f in formulas.items() if hasattr(_aten, name)}


_FORMULAS = _extra_formulas()

# An op is matmul-like when one of its name's `_`-separated words is one of these.
_MATMUL_WORD = re.compile(r"^(\w*mm|mv|addmv|dot|vdot|matmul|linear|einsum|tensordot|bilinear"
                          r"|attention|convolution|conv(\d+d|tbc|transpose\d*d?)?)$")


def is_matmul_like(op_name: str) -> bool:
    """True for ops that multiply matrices (`aten.addmm`, `aten._scaled_dot_product_*`, ...)."""
    words = op_name.replace(".", "_").split("_")
    return any(_MATMUL_WORD.match(word) for word in words if word)


class _ExecutedOps(TorchDispatchMode):
    """Records the ops that really execute (after FlopCounterMode's decompositions)."""

    def __init__(self):
        super().__init__()
        self.ops: Set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


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


def _check_counted(executed: Set, counter: FlopCounterMode) -> None:
    missing = sorted(str(op) for op in executed
                     if op not in counter.flop_registry and is_matmul_like(str(op)))
    if missing:
        raise UncountedOpError(
            f"torch {torch.__version__} ran {', '.join(missing)}, which no FLOP formula covers, "
            "so its FLOPs would count as 0; add a formula in training/flops.py")


def count_flops(fn: Callable[[], T]) -> Tuple[T, int]:
    """(fn(), FLOPs it executed), counting backward passes run inside `fn` too.

    Raises UncountedOpError if `fn` runs a matmul-like op that no formula covers.
    """
    executed = _ExecutedOps()
    with _mha_fastpath_disabled(), executed:
        with FlopCounterMode(display=False, custom_mapping=_FORMULAS) as counter:
            result = fn()
    _check_counted(executed.ops, counter)
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
