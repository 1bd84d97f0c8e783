"""Analytic forward FLOPs of open_clip's ViT image tower and text transformer.

Counted as `training.flops` counts them (2 FLOPs per multiply-add of every matmul and
convolution; norms, softmax and activations are free), so the two agree exactly on every
torch build (tests/test_analytic_flops.py, tests/test_flops.py): for planning a model or
a budget without building it.

Per transformer layer over T tokens of width w with MLP ratio r:
    qkv 6Tw^2 + scores 2T^2w + weighted values 2T^2w + out 2Tw^2 + MLP 4rTw^2
A ViT adds its patch embedding (2 * 3p^2 * w per patch) and T = patches + 1 (class
token); both towers end with one [w, embed_dim] projection of the pooled token.
Training costs about 3x the forward pass (backward is about twice the forward).
"""
from typing import Optional

__all__ = ["transformer_flops", "image_tower_flops", "text_tower_flops", "forward_flops",
           "image_share"]


def transformer_flops(*, tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    t, w = tokens, width
    per_layer = 8 * t * w * w + 4 * t * t * w + 4 * int(mlp_ratio * w) * t * w
    return layers * per_layer


def image_tower_flops(cfg: dict, *, image_size: Optional[int] = None,
                      patch_dropout: float = 0.0) -> int:
    """One image through a ViT tower (open_clip vision_cfg; class-token pooling).

    `patch_dropout` keeps max(1, int((1 - p) * patches)) patch tokens after the
    embedding, as the scorer's DeterministicPatchDropout does.
    """
    v = cfg["vision_cfg"]
    if "patch_size" not in v or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError("analytic FLOPs cover ViT image towers only")
    size = int(image_size or v["image_size"])
    p, w = int(v["patch_size"]), int(v["width"])
    patches = (size // p) ** 2
    kept = max(1, int(patches * (1.0 - patch_dropout))) if patch_dropout else patches
    embed = 2 * 3 * p * p * w * patches
    body = transformer_flops(tokens=kept + 1, width=w, layers=int(v["layers"]),
                             mlp_ratio=float(v.get("mlp_ratio", 4.0)))
    return embed + body + 2 * w * int(cfg["embed_dim"])


def text_tower_flops(cfg: dict) -> int:
    """One caption through the text transformer (full context length)."""
    t = cfg["text_cfg"]
    w = int(t["width"])
    return (transformer_flops(tokens=int(t["context_length"]), width=w, layers=int(t["layers"]),
                              mlp_ratio=float(t.get("mlp_ratio", 4.0)))
            + 2 * w * int(cfg["embed_dim"]))


def forward_flops(cfg: dict, *, image_size: Optional[int] = None,
                  patch_dropout: float = 0.0) -> dict:
    """{"image", "text", "total"} forward FLOPs per example (one image, one caption)."""
    image = image_tower_flops(cfg, image_size=image_size, patch_dropout=patch_dropout)
    text = text_tower_flops(cfg)
    return {"image": image, "text": text, "total": image + text}


def image_share(cfg: dict, **kw) -> float:
    """The image tower's share of forward FLOPs."""
    f = forward_flops(cfg, **kw)
    return f["image"] / f["total"]
