"""Scoring models: the embeddings JEST's selection is computed from.

A scoring model is an open_clip model in eval mode plus the settings that make
scoring cheap (Flexi-JEST, Evans et al. 2024, sec. 3.4):

  image_size     run the image tower at a lower resolution; the ViT position
                 grid is resampled from the trained one (`model.load_weights`).
  patch_dropout  drop a fixed fraction of image tokens *at scoring time*.
                 open_clip's PatchDropout is the identity in eval mode, so it is
                 replaced by `DeterministicPatchDropout`, which really drops them.
  precision      fp32, or bf16 autocast (bf16 matmuls on CPUs with AVX512-BF16/AMX
                 and on GPUs).

Everything that changes the embeddings is recorded in a `formats.ModelCard`; its
`model_digest` keys the embeddings cache. Weights come from a checkpoint (ours or
open_clip_train's `epoch_N.pt`) or, without one, from the config's initialisation
under a seed (recorded as checkpoint_sha256 "init:<seed>").

The launcher builds the model once with `load_scoring_model(spec)` to write the
card and measure FLOPs; workers rebuild it from the card with `scorer_from_card`,
so a model given as a local JSON file needs no file on the workers.

No Beam here: the trainer and evaluators can reuse all of it.
"""
import contextlib
import dataclasses
import json
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from jest_curate import formats
from jest_curate import hashing
from training import flops as flops_lib
from training import model as model_lib
from training import preprocess

__all__ = ["ModelConfigError", "ScoringSpec", "DeterministicPatchDropout", "patch_dropout_keys",
           "PreparedBatch", "prepare_batch", "EmbeddedBatch", "ScoringModel", "embed_rows",
           "load_scoring_model", "scorer_from_card", "LiveScorer", "FlopCounts",
           "measure_flops", "FORWARD_ROWS"]

# Rows per forward pass when scoring or evaluating: on a CPU 128 is faster than 256, and
# the fp32 embeddings are the same bit for bit (tests/test_embed.py).
FORWARD_ROWS = 128

PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
_INIT_PREFIX = "init:"


class ModelConfigError(ValueError):
    """The model config, the weights and the scoring settings do not fit together."""


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
    """How to build a scoring model (the CLI flags of `jest-curate embed`)."""
    model: str  # open_clip config name, shipped config name, or JSON file.
    checkpoint: Optional[str] = None  # URL; None = the config's init under `init_seed`.
    image_size: Optional[int] = None  # None = the trained resolution.
    patch_dropout: float = 0.0
    precision: str = "fp32"
    device: str = "cpu"
    init_seed: int = 0
    num_threads: Optional[int] = None  # torch intra-op threads per worker process.

    def __post_init__(self):
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


# --------------------------------------------------------------------------- #
# Patch dropout that works in eval mode
# --------------------------------------------------------------------------- #

def patch_dropout_keys(uids: Sequence[str]) -> np.ndarray:
    """[n] uint64 keys: which tokens an example keeps depends only on its uid."""
    return np.array([hashing.hash_u64("patch_dropout", uid) for uid in uids], dtype=np.uint64)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, vectorised, well-mixed uint64 -> uint64 map."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class DeterministicPatchDropout(torch.nn.Module):
    """Keeps max(1, int(n * (1 - prob))) of the n patch tokens, in train and eval mode.

    Replaces `model.visual.patch_dropout` (which sits after the position embeddings
    are added, before the transformer). The class token is always kept. Each example
    keeps the tokens with the smallest mix64(key, token index), so the choice is
    random-looking, reproducible, and independent of batch composition; keys come
    from `patch_dropout_keys(uids)` and are set per call with `example_keys`
    (thread-local, so one model can serve several threads).
    """

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {prob}")
        self.prob = float(prob)
        self._local = threading.local()

    def __getstate__(self):  # threading.local cannot be copied or pickled.
        state = super().__getstate__().copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._local = threading.local()

    def extra_repr(self) -> str:
        return f"prob={self.prob}"

    @contextlib.contextmanager
    def example_keys(self, keys: np.ndarray):
        self._local.keys = np.asarray(keys, dtype=np.uint64)
        try:
            yield
        finally:
            self._local.keys = None

    def kept_tokens(self, keys: np.ndarray, num_tokens: int) -> np.ndarray:
        """[n, keep] int64 indices (ascending) of the patch tokens each example keeps."""
        keep = max(1, int(num_tokens * (1.0 - self.prob)))
        noise = _mix64(keys[:, None] ^ _mix64(np.arange(num_tokens, dtype=np.uint64))[None, :])
        order = np.argsort(noise, axis=1, kind="stable")[:, :keep]
        return np.sort(order, axis=1).astype(np.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0:
            return x
        keys = getattr(self._local, "keys", None)
        if keys is None:
            raise RuntimeError("DeterministicPatchDropout needs per-example keys: call the "
                               "model inside `example_keys(patch_dropout_keys(uids))`")
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} patch-dropout keys for a batch of {x.shape[0]}")
        cls_token, patches = x[:, :1], x[:, 1:]
        idx = torch.from_numpy(self.kept_tokens(keys, patches.shape[1])).to(x.device)
        patches = torch.gather(patches, 1, idx[..., None].expand(-1, -1, patches.shape[2]))
        return torch.cat([cls_token, patches], dim=1)


# --------------------------------------------------------------------------- #
# Batches: decode, preprocess, embed
# --------------------------------------------------------------------------- #



@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    pixels: torch.Tensor  # [m, 3, H, W] float32, the decodable examples only.
    tokens: torch.Tensor  # [m, context_length] int64.
    rows: np.ndarray  # [m] int64: positions of those examples in the input batch.
    failures: list  # [(position, reason, detail)] for the others.


def prepare_batch(images: Sequence[bytes], captions: Sequence[str],
                  contract: formats.Preprocess) -> PreparedBatch:
    """Decode and preprocess a batch; undecodable images are reported, not raised."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    decoded, rows, failures = [], [], []
    for i, data in enumerate(images):
        try:
            decoded.append(preprocess.decode_image(data))
            rows.append(i)
        except preprocess.ImageDecodeError as e:
            failures.append((i, e.reason, e.detail))  # Address-free: see decode_image.
    size = contract.image_size
    pixels = (preprocess.preprocess_images(decoded, contract) if decoded
              else torch.zeros(0, contract.channels, size, size))
    tokens = preprocess.tokenize([captions[i] for i in rows], contract)
    return PreparedBatch(pixels=pixels, tokens=tokens, rows=np.array(rows, dtype=np.int64),
                         failures=failures)


@dataclasses.dataclass(frozen=True)
class EmbeddedBatch:
    rows: np.ndarray  # [m] int64 positions in the input batch that were embedded.
    image: np.ndarray  # [m, d] float16, L2-normalised.
    text: np.ndarray  # [m, d] float16, L2-normalised.
    failures: list  # [(position, reason, detail)]


class ScoringModel:
    """An eval-mode model on a device, with the card that describes its embeddings."""

    def __init__(self, model: torch.nn.Module, card: formats.ModelCard, device: str = "cpu"):
        self.model = model
        self.card = card
        self.device = torch.device(device)
        dropout = getattr(getattr(model, "visual", None), "patch_dropout", None)
        self._dropout = dropout if isinstance(dropout, DeterministicPatchDropout) else None

    @property
    def contract(self) -> formats.Preprocess:
        return self.card.preprocess

    @property
    def dim(self) -> int:
        return int(self.card.model_cfg["embed_dim"])

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.card.precision == "bf16")

    def _keys(self, keys: Optional[np.ndarray]):
        if self._dropout is None:
            return contextlib.nullcontext()
        if keys is None:
            raise ValueError("this model drops patches by example: pass keys "
                             "(patch_dropout_keys(uids))")
        return self._dropout.example_keys(keys)

    def encode(self, pixels: torch.Tensor, tokens: torch.Tensor,
               keys: Optional[np.ndarray] = None):
        """([n, d] image, [n, d] text) float32 L2-normalised embeddings on the CPU."""
        with torch.inference_mode(), self._autocast(), self._keys(keys):
            image, text = model_lib.encode(self.model, pixels.to(self.device),
                                           tokens.to(self.device))
        return image.cpu(), text.cpu()

    def embed(self, images: Sequence[bytes], captions: Sequence[str],
              uids: Sequence[str]) -> EmbeddedBatch:
        """Decode, preprocess and embed one batch of corpus rows (fp16 results)."""
        batch = prepare_batch(images, captions, self.contract)
        if len(batch.rows) == 0:
            empty = np.zeros((0, self.dim), dtype=np.float16)
            return EmbeddedBatch(rows=batch.rows, image=empty, text=empty,
                                 failures=batch.failures)
        keys = patch_dropout_keys([uids[i] for i in batch.rows])
        image, text = self.encode(batch.pixels, batch.tokens, keys)
        return EmbeddedBatch(rows=batch.rows, image=image.numpy().astype(np.float16),
                             text=text.numpy().astype(np.float16), failures=batch.failures)


def embed_rows(scorer: ScoringModel, images: Sequence[bytes], captions: Sequence[str],
               uids: Sequence[str], *, batch_size: int):
    """([n, d] fp16 image, [n, d] fp16 text, [(row, reason)] failures) of n rows, embedded
    `batch_size` rows per forward pass; a failed row's embeddings are zero."""
    n, d = len(images), scorer.dim
    image, text = np.zeros((n, d), np.float16), np.zeros((n, d), np.float16)
    failed = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        out = scorer.embed(images[start:stop], captions[start:stop], uids[start:stop])
        image[start + out.rows], text[start + out.rows] = out.image, out.text
        failed += [(start + i, reason) for i, reason, _ in out.failures]
    return image, text, failed


# --------------------------------------------------------------------------- #
# Building: launcher (from a spec) and workers (from the card)
# --------------------------------------------------------------------------- #

def _architecture(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "preprocess_cfg"}


def _weights(cfg: dict, checkpoint: Optional[str], init_seed: int):
    """(state dict at the trained resolution, checkpoint_sha256 for the card)."""
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return model_lib.build_model(cfg).state_dict(), f"{_INIT_PREFIX}{init_seed}"
    ckpt = formats.load_checkpoint(checkpoint)  # Missing / corrupt / unsafe files raise here.
    if ckpt.model_cfg is not None and _architecture(ckpt.model_cfg) != _architecture(cfg):
        raise ModelConfigError(f"{checkpoint}: was trained with a different model config "
                               f"than the one given")
    return ckpt.state_dict, formats.sha256_file(checkpoint)


def _assemble(cfg: dict, state_dict: dict, *, image_size: Optional[int], patch_dropout: float,
              source: str) -> torch.nn.Module:
    vision = cfg["vision_cfg"]
    patch = vision.get("patch_size")
    if image_size is not None and patch is not None and image_size < patch:
        raise ModelConfigError(f"image size {image_size} is smaller than the patch size {patch}")
    with torch.random.fork_rng(devices=[]):  # Its init is overwritten; keep global RNG intact.
        net = model_lib.build_model(cfg, image_size=image_size)
    try:
        model_lib.load_weights(net, state_dict, source=source)
    except ValueError as e:
        raise ModelConfigError(str(e)) from e
    if patch_dropout > 0.0:
        if not hasattr(net.visual, "patch_dropout") or not hasattr(net.visual, "class_embedding"):
            raise ModelConfigError(f"patch dropout needs a ViT image tower; "
                                   f"{type(net.visual).__name__} has no patch tokens")
        net.visual.patch_dropout = DeterministicPatchDropout(patch_dropout)
    return net.eval()


def _to_device(net: torch.nn.Module, device: str) -> torch.nn.Module:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device on this machine")
    return net.to(device)


_MEASURED = {}  # load_scoring_model's FLOP counts, by what they depend on.


def load_scoring_model(spec: ScoringSpec, *, device: str = "cpu",
                       measure: bool = True) -> ScoringModel:
    """Build the model a spec describes and its card (with measured FLOPs if `measure`).

    `device` defaults to the CPU, not `spec.device`: the launcher only describes the
    model, and may have no GPU even when the workers do.
    """
    try:
        name, cfg = model_lib.load_model_config(spec.model)
    except ValueError as e:
        raise ModelConfigError(str(e)) from e
    state_dict, sha = _weights(cfg, spec.checkpoint, spec.init_seed)
    net = _assemble(cfg, state_dict, image_size=spec.image_size,
                    patch_dropout=spec.patch_dropout, source=spec.checkpoint or sha)
    logit_scale, logit_bias = model_lib.logit_params(net)
    card = formats.ModelCard(
        model_name=name, model_cfg=cfg, checkpoint_sha256=sha, logit_scale=logit_scale,
        logit_bias=logit_bias,
        preprocess=model_lib.preprocess_contract(cfg, image_size=spec.image_size),
        patch_dropout=float(spec.patch_dropout), precision=spec.precision)
    scorer = ScoringModel(_to_device(net, device), card, device)
    if measure:
        # FLOPs depend on the architecture and input shape, never the weights: counted
        # once per process for each (config, resolution, dropout, precision, device).
        key = (json.dumps(cfg, sort_keys=True), card.preprocess.image_size,
               card.patch_dropout, card.precision, scorer.device.type)
        if key not in _MEASURED:
            _MEASURED[key] = measure_flops(scorer).total
        scorer.card = dataclasses.replace(card, flops_per_example=_MEASURED[key])
    return scorer


def scorer_from_card(card: formats.ModelCard, *, checkpoint: Optional[str],
                     device: str = "cpu") -> ScoringModel:
    """Rebuild the model a card describes; the checkpoint must be the one it names."""
    if card.checkpoint_sha256.startswith(_INIT_PREFIX):
        if checkpoint is not None:
            raise ModelConfigError(f"the model card says {card.checkpoint_sha256!r} "
                                   f"(no checkpoint), but checkpoint {checkpoint} was given")
        seed = int(card.checkpoint_sha256[len(_INIT_PREFIX):])
        state_dict, sha = _weights(card.model_cfg, None, seed)
    elif checkpoint is None:
        raise ModelConfigError(f"the model card names checkpoint sha256 "
                               f"{card.checkpoint_sha256[:12]}..., but none was given")
    else:
        state_dict, sha = _weights(card.model_cfg, checkpoint, 0)
        if sha != card.checkpoint_sha256:
            raise ModelConfigError(f"{checkpoint} has sha256 {sha[:12]}..., the model card "
                                   f"expects {card.checkpoint_sha256[:12]}... (file changed?)")
    net = _assemble(card.model_cfg, state_dict, image_size=card.preprocess.image_size,
                    patch_dropout=card.patch_dropout, source=checkpoint or sha)
    return ScoringModel(_to_device(net, device), card, device)


class LiveScorer:
    """A scoring copy of a model in training, refreshed with its current weights.

    The trainer's online selection scores every step's candidates with the weights of
    that step. The copy is built once, as `scorer_from_card` builds a checkpoint's
    (scoring resolution, deterministic patch dropout, eval mode), and `refresh` copies
    the live weights in and re-reads t and b, so it embeds exactly as a checkpoint of
    the same weights would, without touching the training model or its RNG.
    """

    def __init__(self, model_name: str, model_cfg: dict, state_dict: dict, *,
                 image_size: Optional[int] = None, patch_dropout: float = 0.0,
                 precision: str = "fp32", device: str = "cpu"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        net = _assemble(model_cfg, state_dict, image_size=image_size,
                        patch_dropout=patch_dropout, source="the live weights")
        t, b = model_lib.logit_params(net)
        card = formats.ModelCard(
            model_name=model_name, model_cfg=model_cfg, checkpoint_sha256="live",
            logit_scale=t, logit_bias=b,
            preprocess=model_lib.preprocess_contract(model_cfg, image_size=image_size),
            patch_dropout=float(patch_dropout), precision=precision)
        self.scorer = ScoringModel(_to_device(net, device), card, device)
        self.scorer.card = dataclasses.replace(
            card, flops_per_example=measure_flops(self.scorer).total)

    @property
    def flops_per_example(self) -> float:
        return self.scorer.card.flops_per_example

    def refresh(self, state_dict: dict, label: str = "live") -> ScoringModel:
        """The scorer holding `state_dict` (`label` names those weights in its card)."""
        model_lib.load_weights(self.scorer.model, state_dict, source=label)
        t, b = model_lib.logit_params(self.scorer.model)
        self.scorer.card = dataclasses.replace(self.scorer.card, checkpoint_sha256=label,
                                               logit_scale=t, logit_bias=b)
        return self.scorer


# --------------------------------------------------------------------------- #
# FLOPs
# --------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class FlopCounts:
    """Measured forward FLOPs per example (a multiply-add counts as 2)."""
    image: float
    text: float

    @property
    def total(self) -> float:
        return self.image + self.text


def measure_flops(scorer: ScoringModel, *, batch_size: int = 4) -> FlopCounts:
    """Count the FLOPs of one forward pass (training.flops: every attention kernel counted).

    FLOPs do not depend on pixel values or caption words, so a synthetic batch of
    the contract's shape is used.
    """
    contract = scorer.contract
    size = contract.image_size
    pixels = torch.zeros(batch_size, contract.channels, size, size, device=scorer.device)
    tokens = preprocess.tokenize(["a photo"] * batch_size, contract).to(scorer.device)
    keys = np.arange(batch_size, dtype=np.uint64)
    with torch.no_grad(), scorer._autocast(), scorer._keys(keys):
        _, image = flops_lib.count_flops(lambda: scorer.model.encode_image(pixels, normalize=True))
        _, text = flops_lib.count_flops(lambda: scorer.model.encode_text(tokens, normalize=True))
    return FlopCounts(image=image / batch_size, text=text / batch_size)
