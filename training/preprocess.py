"""The preprocessing contract, applied identically by the trainer and the scorer.

Images: decode the original bytes, convert to RGB (grayscale is replicated), resize
the shortest side to `image_size` (bicubic), centre-crop, scale to [0, 1] and
normalise with the contract's mean/std. Captions: open_clip's BPE tokenizer, which
ships inside the open_clip package, padded/truncated to `context_length`.
"""
import collections
import io
import re
import threading
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from jest_curate import formats

__all__ = ["MAX_IMAGE_PIXELS", "ImageDecodeError", "decode_image", "preprocess_images",
           "tokenize"]

# Decompression-bomb guard: 64 MP is far above any training resolution.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(e: Exception) -> str:
    """The error without memory addresses, so dead-letter files are reproducible."""
    return _ADDRESS.sub("", f"{type(e).__name__}: {e}")


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; `reason` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode to RGB, refusing oversized or undecodable inputs before full decode."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for garbage input.
        raise ImageDecodeError("undecodable_image", _describe(e)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:
        raise ImageDecodeError("undecodable_image", _describe(e)) from None


def _to_array(img: Image.Image, contract: formats.Preprocess) -> np.ndarray:
    size = contract.image_size
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), _RESAMPLE[contract.interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def preprocess_images(images: Sequence, contract: formats.Preprocess) -> torch.Tensor:
    """[n, 3, H, W] float32 model inputs from encoded bytes or PIL images."""
    if contract.resize_mode != "shortest":
        raise ValueError(f"unsupported resize_mode {contract.resize_mode!r}")
    arrays = [_to_array(decode_image(x) if isinstance(x, (bytes, bytearray)) else x.convert("RGB"),
                        contract) for x in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(contract.mean).view(1, 3, 1, 1)
    std = torch.tensor(contract.std).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


# Token rows by (caption, context length): BPE with ftfy costs ~0.1 ms a caption, and a
# study or a multi-pass run tokenizes the same captions again every pass. Exact: each
# row depends on its caption alone. Bounded, so a web-scale stream costs one lookup each.
_TOKEN_CACHE_SIZE = 1 << 17
_token_cache: "collections.OrderedDict" = collections.OrderedDict()
_token_lock = threading.Lock()  # Beam runs DoFns on several threads of one process.


def _token_rows(captions: Sequence[str], context_length: int) -> list:
    with _token_lock:
        rows = [_token_cache.get((c, context_length)) for c in captions]
        for c, row in zip(captions, rows):
            if row is not None:
                _token_cache.move_to_end((c, context_length))
    missing = list(dict.fromkeys(c for c, r in zip(captions, rows) if r is None))
    if not missing:
        return rows
    tokens = open_clip.tokenize(missing, context_length=context_length)
    fresh = {c: row.clone() for c, row in zip(missing, tokens)}  # Own storage each.
    with _token_lock:
        for caption, row in fresh.items():
            _token_cache[(caption, context_length)] = row
        while len(_token_cache) > _TOKEN_CACHE_SIZE:
            _token_cache.popitem(last=False)
    return [fresh[c] if r is None else r for c, r in zip(captions, rows)]


def tokenize(captions: Sequence[str], contract: formats.Preprocess) -> torch.Tensor:
    """[n, context_length] int64 tokens."""
    if contract.tokenizer != "open_clip":
        raise ValueError(f"unsupported tokenizer {contract.tokenizer!r}")
    if not captions:
        return torch.zeros(0, contract.context_length, dtype=torch.long)
    return torch.stack(_token_rows(list(captions), contract.context_length))
