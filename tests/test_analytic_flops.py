"""Analytic tower FLOPs equal FlopCounterMode's count; the Flexi model's image share."""
import pytest
import torch

from training import analytic_flops
from training import model as model_lib
from training.flops import count_flops


def _measured(cfg, image_size=None):
    """Per-tower forward FLOPs, through whichever attention kernel torch picks."""
    net = model_lib.build_model(cfg, image_size=image_size).eval()
    size = image_size or cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size)
    tokens = torch.randint(0, 1000, (2, cfg["text_cfg"]["context_length"]))
    with torch.no_grad():
        _, image = count_flops(lambda: net.encode_image(images))
        _, text = count_flops(lambda: net.encode_text(tokens))
    return image // 2, text // 2


@pytest.mark.parametrize("name, image_size", [
    ("jest-vit-micro-28", None), ("jest-vit-micro-28", 14), ("jest-vit-tiny-32", None),
    ("jest-vit-flexi-32", None), ("jest-vit-flexi-32", 16)])
def test_analytic_counts_match_the_flop_counter(name, image_size, one_thread):
    _, cfg = model_lib.load_model_config(name)
    image, text = _measured(cfg, image_size)
    got = analytic_flops.forward_flops(cfg, image_size=image_size)
    assert (got["image"], got["text"]) == (image, text)


def test_the_flexi_model_is_image_dominated_like_real_clips():
    _, flexi = model_lib.load_model_config("jest-vit-flexi-32")
    _, micro = model_lib.load_model_config("jest-vit-micro-28")
    assert analytic_flops.image_share(flexi) >= 0.75
    assert analytic_flops.image_share(micro) < 0.5  # Why cheap scoring could not pay there.
    # Scoring at 16 px (a quarter of the patches) saves most of the forward pass.
    full = analytic_flops.forward_flops(flexi)["total"]
    low = analytic_flops.forward_flops(flexi, image_size=16)["total"]
    assert low / full < 0.45
    with pytest.raises(ValueError, match="ViT"):
        analytic_flops.image_tower_flops(model_lib.load_model_config("jest-resnet-tiny-64")[1])
