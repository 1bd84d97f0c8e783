"""open_clip models for jest-curate: configs, building, weights, encoding.

Architectures are data: a model is an open_clip config dict (`embed_dim`,
`vision_cfg`, `text_cfg`, optional `init_logit_scale`/`init_logit_bias`). Names
resolve first to the small CPU configs shipped in `model_configs/`, then to
open_clip's own registry. Nothing is downloaded: models are built from configs
and weights come only from our checkpoints or open_clip_train's `epoch_N.pt`.

Small configs (this repo, for a CPU):
  jest-vit-micro-28    ViT 28 px, patch 7 (16 tokens), 2+2 layers, 64-d. Smoke tests.
  jest-vit-tiny-32     ViT 32 px, patch 4 (64 tokens), 4+2 layers, 128-d. The demo.
  jest-resnet-tiny-64  ModifiedResNet [1,1,1,1] 64 px, 2-layer text, 128-d.
Full-size configs a GPU user would pick (open_clip's registry): ViT-B-32, ViT-B-16,
ViT-B-16-SigLIP, ViT-L-14 (with `--image-size`/`--patch-dropout` for cheap scoring).
"""
import contextlib
import copy
import json
import logging
import math
from pathlib import Path
from typing import Optional, Tuple

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CustomTextCLIP, resize_pos_embed

from jest_curate import formats

__all__ = ["CONFIG_DIR", "load_model_config", "build_model", "preprocess_contract",
           "load_weights", "model_from_checkpoint", "logit_params", "encode"]

CONFIG_DIR = Path(__file__).parent / "model_configs"

# SigLIP's initialisation (Zhai et al. 2023): t' = log 10, b = -10.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def load_model_config(name_or_path: str) -> Tuple[str, dict]:
    """(name, config dict) for a shipped name, an open_clip name or a JSON file.

    A JSON file may hold a bare model config or open_clip's local-dir layout
    `{"model_cfg": {...}, "preprocess_cfg": {...}}`.
    """
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {name_or_path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{name_or_path}: not valid JSON ({e})") from e
        if "model_cfg" in data:
            cfg = dict(data["model_cfg"])
            if "preprocess_cfg" in data:
                cfg["preprocess_cfg"] = data["preprocess_cfg"]
        else:
            cfg = data
        name = path.stem
    elif (CONFIG_DIR / f"{name_or_path}.json").is_file():
        name, cfg = name_or_path, json.loads((CONFIG_DIR / f"{name_or_path}.json").read_text())
    else:
        cfg = open_clip.get_model_config(name_or_path)
        if cfg is None:
            shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise ValueError(f"unknown model {name_or_path!r}: not a JSON file, not one of "
                             f"{shipped}, and not in open_clip's registry")
        name = name_or_path
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model config {name!r} lacks {key!r}")
    return name, copy.deepcopy(cfg)


def build_model(cfg: dict, *, image_size: Optional[int] = None) -> torch.nn.Module:
    """A freshly initialised open_clip model from a config dict (no downloads).

    `image_size` overrides the vision tower's input size (cheap scoring at lower
    resolution); load weights with `load_weights`, which resamples positions.
    """
    cfg = copy.deepcopy(cfg)
    cfg.pop("preprocess_cfg", None)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    if cfg["vision_cfg"].get("timm_model_name") or cfg["text_cfg"].get("hf_model_name"):
        # timm/HF towers fetch configs or tokenizers from a hub; keep them for GPU users.
        cfg["vision_cfg"].setdefault("timm_model_pretrained", False)
    model_cls = CustomTextCLIP if custom_text else CLIP
    model = model_cls(**cfg)
    model.eval()
    return model


def preprocess_contract(cfg: dict, *, image_size: Optional[int] = None) -> formats.Preprocess:
    """The preprocessing a model expects, as recorded in model.json."""
    pp = cfg.get("preprocess_cfg", {})
    size = image_size or cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else int(size[0])
    return formats.Preprocess(
        image_size=size,
        mean=tuple(pp.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", OPENAI_DATASET_STD)),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
    )


@contextlib.contextmanager
def _quiet_root_info(prefix: str):
    """Drops the root logger's INFO records that start with `prefix` inside the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith(prefix))
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_weights(model: torch.nn.Module, state_dict: dict, *, source: str = "checkpoint") -> None:
    """Load a state dict strictly, resampling ViT positions to the model's size.

    Raises ValueError naming the mismatched keys when config and weights disagree.
    """
    state_dict = dict(state_dict)
    if "visual.positional_embedding" in state_dict and hasattr(model.visual, "positional_embedding"):
        # Interpolates the position grid when the scoring resolution differs; open_clip
        # logs every resize at INFO on the root logger, once per load (per step online).
        with _quiet_root_info("Resizing position embedding"):
            resize_pos_embed(state_dict, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_mismatch = sorted(k for k in set(own) & set(state_dict)
                            if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shape_mismatch:
        def head(keys):
            return keys[:5] + (["..."] if len(keys) > 5 else [])
        raise ValueError(
            f"{source}: weights do not match the model config: missing {head(missing)}, "
            f"unexpected {head(unexpected)}, wrong shape {head(shape_mismatch)}")
    model.load_state_dict(state_dict, strict=True)


def model_from_checkpoint(checkpoint_url: str, *, model: Optional[str] = None,
                          image_size: Optional[int] = None):
    """(model, cfg, name, sha256) from a checkpoint file.

    Our checkpoints carry their config; open_clip_train's do not, so `model`
    (a name or JSON path) must be given for those. When both exist they must agree.
    """
    ckpt = formats.load_checkpoint(checkpoint_url)
    if model is not None:
        name, cfg = load_model_config(model)
        if ckpt.model_cfg is not None and _strip(ckpt.model_cfg) != _strip(cfg):
            raise ValueError(f"{checkpoint_url}: its model config differs from {model!r}")
    elif ckpt.model_cfg is not None:
        name, cfg = ckpt.model_name or "checkpoint", ckpt.model_cfg
    else:
        raise ValueError(f"{checkpoint_url} carries no model config: pass --model")
    net = build_model(cfg, image_size=image_size)
    load_weights(net, ckpt.state_dict, source=checkpoint_url)
    return net, cfg, name, formats.sha256_file(checkpoint_url)


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "preprocess_cfg"}


def logit_params(model: torch.nn.Module) -> Tuple[float, float]:
    """(t, b): the logit multiplier exp(logit_scale) and the bias (0 if none)."""
    t = float(model.logit_scale.detach().exp().item())
    bias = getattr(model, "logit_bias", None)
    return t, float(bias.detach().item()) if bias is not None else 0.0


def encode(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """L2-normalised ([n, d] image, [n, d] text) embeddings in float32."""
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    return image.float(), text.float()
