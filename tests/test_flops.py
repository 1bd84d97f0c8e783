"""FLOP counts that do not depend on the torch build (issue 13).

Every shipped model config is measured against an analytic count from its JSON, at the
trained and the cheap scoring resolution and with patch dropout, on whatever torch pip
resolved; and a matmul-like op without a formula stops the count instead of counting 0.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training import analytic_flops
from training import flops
from training import model as model_lib
from training import scoring

SHIPPED = sorted(p.stem for p in model_lib.CONFIG_DIR.glob("*.json"))
aten = torch.ops.aten


# --------------------------------------------------------------------------- #
# Analytic forward FLOPs per example (a multiply-add counts as 2): ViTs and text towers
# from training/analytic_flops.py, open_clip's ModifiedResNet here
# --------------------------------------------------------------------------- #

def _conv(cin: int, cout: int, k: int, out_hw: int) -> int:
    return 2 * cin * k * k * cout * out_hw * out_hw


def _resnet_image(cfg: dict, *, image_size: int) -> int:
    """open_clip's ModifiedResNet: 3-conv stem, bottlenecks (x4), attention pool."""
    v = cfg["vision_cfg"]
    width, hw = v["width"], image_size // 2
    total = _conv(3, width // 2, 3, hw) + _conv(width // 2, width // 2, 3, hw) \
        + _conv(width // 2, width, 3, hw)
    hw //= 2  # Stem average pool.
    inplanes = width
    for i, blocks in enumerate(v["layers"]):
        planes = width * 2 ** i
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            total += _conv(inplanes, planes, 1, hw) + _conv(planes, planes, 3, hw)
            out_hw = hw // stride
            total += _conv(planes, planes * 4, 1, out_hw)
            if stride > 1 or inplanes != planes * 4:
                total += _conv(inplanes, planes * 4, 1, out_hw)
            inplanes, hw = planes * 4, out_hw
    channels, tokens = width * 32, hw * hw + 1
    return total + 3 * 2 * tokens * channels * channels + 2 * 2 * tokens * tokens * channels \
        + 2 * tokens * channels * cfg["embed_dim"]


def _image(cfg: dict, *, image_size: int, kept_fraction: float = 1.0) -> int:
    if isinstance(cfg["vision_cfg"].get("layers"), list):
        assert kept_fraction == 1.0
        return _resnet_image(cfg, image_size=image_size)
    return analytic_flops.image_tower_flops(cfg, image_size=image_size,
                                            patch_dropout=1.0 - kept_fraction)


def _text(cfg: dict) -> int:
    return analytic_flops.text_tower_flops(cfg)


def _measured(name: str, **spec) -> scoring.FlopCounts:
    return scoring.measure_flops(scoring.load_scoring_model(
        scoring.ScoringSpec(model=name, **spec), measure=False))


# --------------------------------------------------------------------------- #
# Every shipped config, measured == analytic
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_measure_their_analytic_forward_flops(name):
    _, cfg = model_lib.load_model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    full = _measured(name)
    assert full.image == _image(cfg, image_size=size)
    assert full.text == _text(cfg)
    if isinstance(cfg["vision_cfg"].get("layers"), list):
        return  # Cheap scoring (resolution, patch dropout) is for ViTs.
    low_size = size // 2
    low = _measured(name, image_size=low_size)
    assert low.image == _image(cfg, image_size=low_size)
    dropped = _measured(name, patch_dropout=0.5)
    assert dropped.image == _image(cfg, image_size=size, kept_fraction=0.5)
    assert low.text == dropped.text == full.text
    assert low.image < dropped.image < full.image


@pytest.mark.parametrize("name", SHIPPED)
def test_a_training_step_measures_three_forwards_less_the_pixels_gradient(name):
    """Backward = 2x forward for every matmul, except that no gradient flows into pixels."""
    torch.manual_seed(0)
    _, cfg = model_lib.load_model_config(name)
    model = model_lib.build_model(cfg).train()
    size, batch = cfg["vision_cfg"]["image_size"], 4
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, 1000, (batch, cfg["text_cfg"]["context_length"]))

    def step():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        logits = img @ txt.T * model.logit_scale.exp() + model.logit_bias
        loss = -F.logsigmoid((2 * torch.eye(batch) - 1) * logits).sum() / batch
        loss.backward()

    _, measured = flops.count_flops(step)
    v = cfg["vision_cfg"]
    if isinstance(v.get("layers"), list):
        first_conv = _conv(3, v["width"] // 2, 3, size // 2)
    else:
        first_conv = 2 * (size // v["patch_size"]) ** 2 * 3 * v["patch_size"] ** 2 * v["width"]
    forward = batch * (_image(cfg, image_size=size) + _text(cfg))
    logits = 2 * batch * batch * cfg["embed_dim"]
    assert measured == 3 * forward - batch * first_conv + 3 * logits


# --------------------------------------------------------------------------- #
# Attention kernels: counted whichever one torch dispatches to
# --------------------------------------------------------------------------- #

def _qkv(b=2, h=3, s=5, d=8, device="cpu"):
    return [torch.randn(b, h, s, d, device=device, requires_grad=True) for _ in range(3)]


def test_every_sdpa_kernel_of_this_torch_has_the_standard_formula():
    """CPU flash, math, and the CUDA flash / efficient / cuDNN kernels, checked on shapes."""
    registry = FlopCounterMode(custom_mapping=flops._FORMULAS).flop_registry
    kernels = [name for name in dir(aten) if name.startswith("_scaled_dot_product_")]
    assert "_scaled_dot_product_efficient_attention" in kernels  # Present in every torch ≥ 2.0.
    q, k, v = (torch.empty(2, 3, 5, 8, device="meta") for _ in range(3))
    forward = 4 * 2 * 3 * 5 * 5 * 8
    for name in kernels:
        formula = registry[getattr(aten, name)]
        if name.endswith("_backward"):
            grad_out = torch.empty(2, 3, 5, 8, device="meta")
            assert formula(grad_out, q, k, v, out_val=None) == 2 * forward, name
        else:
            assert formula(q, k, v, out_val=None) == forward, name


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
def test_cpu_attention_counts_the_same_on_every_backend(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv()

    def fwd_bwd():
        with sdpa_kernel(getattr(SDPBackend, backend)):
            F.scaled_dot_product_attention(q, k, v).sum().backward()

    _, counted = flops.count_flops(fwd_bwd)
    assert counted == 3 * flops.sdpa_forward_flops(q.shape, k.shape, v.shape)


def test_multi_head_attention_module_is_counted_in_eval_and_train():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 7, 16)
    expected = 3 * 7 * (2 * 16 * 48 + 2 * 16 * 16) + 4 * 3 * 7 * 7 * 16
    for mode in (mha.eval, mha.train):
        mode()
        with torch.no_grad():
            _, counted = flops.count_flops(lambda: mha(x, x, x, need_weights=False))
        assert counted == expected


# --------------------------------------------------------------------------- #
# The next torch cannot silently drop FLOPs
# --------------------------------------------------------------------------- #

def test_a_matmul_without_a_formula_stops_the_count(monkeypatch):
    from torch.utils import flop_counter
    monkeypatch.delitem(flop_counter.flop_registry, aten.mm)
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with pytest.raises(flops.UncountedOpError, match=r"aten\.mm.*training/flops\.py"):
        flops.count_flops(lambda: a @ b)


def test_an_attention_kernel_without_a_formula_stops_the_count(monkeypatch):
    """torch 2.14 had no formula for its CPU flash kernel and counted it as 0 (2.15 has one).

    With no formula anywhere, that kernel now stops the count, on any torch.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import flop_registry
    monkeypatch.setattr(flops, "_FORMULAS", {})
    monkeypatch.delitem(flop_registry, aten._scaled_dot_product_flash_attention_for_cpu,
                        raising=False)
    q, k, v = _qkv()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with pytest.raises(flops.UncountedOpError, match="flash_attention_for_cpu"):
            flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("name,matmul", [
    ("aten.addmm", True), ("aten.baddbmm", True), ("aten._scaled_mm", True),
    ("aten._scaled_dot_product_flash_attention_for_cpu", True), ("aten.mv", True),
    ("aten.cudnn_convolution", True), ("aten.slow_conv2d_forward", True),
    ("aten._native_multi_head_attention", True), ("aten.linear", True),
    ("aten.upsample_bilinear2d", False), ("aten._convert_indices_from_coo_to_csr", False),
    ("aten.native_layer_norm", False), ("aten._softmax", False), ("aten.embedding", False),
    ("aten.addcmul", False), ("aten.gelu", False)])
def test_which_ops_are_matmul_like(name, matmul):
    assert flops.is_matmul_like(name) is matmul


def test_counts_are_integers_and_exact_for_a_plain_linear():
    layer = torch.nn.Linear(10, 20)
    _, counted = flops.count_flops(lambda: layer(torch.randn(3, 10)))
    assert counted == 2 * 3 * 10 * 20 and isinstance(counted, int)


def test_committed_studies_count_training_flops_as_todays_counter_does():
    """results/*/summary.json: training FLOPs per example equal a trainer step counted now."""
    import importlib.util
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recount",
                                                  root / "scripts/recount_train_flops.py")
    recount = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recount)
    measured = {}
    for folder in recount.STUDIES.values():
        summary = json.loads((root / folder / "summary.json").read_text())
        run = summary["settings"]["run"]
        key = (run["learner_model"], run["batch_size"])
        if key not in measured:
            measured[key] = recount.measured_train_flops_per_example(*key)
        for method, curve in summary["curves"].items():
            per_example = [t / n for t, n in zip(curve["train_flops"], curve["examples"])]
            assert per_example == pytest.approx([measured[key]] * len(per_example),
                                                rel=1e-9), (folder, method)
