"""The companion trainer: SigLIP contrastive training that one run continues across rounds.

    result = train(TrainConfig(model="jest-vit-micro-28", output="runs/learner",
                               data="curated/round_000", batch_size=64,
                               total_steps=3000, stop_at_step=1000, resume=True))

`total_steps` is the planned length of the whole run, so the warmup + cosine
schedule spans every round; `stop_at_step` ends this call's slice. A fresh run
writes a step-0 checkpoint before training, so the learner that scores round 0
is exactly the one that trains. `resume=True` continues from the newest
checkpoint in `output` with its optimizer, RNG and data position; on a CPU in
fp32 a resumed run is bit-for-bit an uninterrupted one. The same code trains
the reference model on canonical (random-batch) data.

Loss: open_clip's `SigLipLoss` (Zhai et al. 2023) with the config's SigLIP
initialisation of logit scale and bias. Multi-resolution (Flexi-JEST, Evans et
al. 2024 sec. 4): a seeded `low_res_fraction` of every batch is seen at
`low_res_size`, through the same ViT with its position grid resampled.

Under torchrun (`training.distributed`) each process trains on its part of every
global batch, the loss spans the global batch through SigLipLoss's neighbour exchange,
and DistributedDataParallel averages the gradients.

Online selection (`online=OnlineConfig(...)`, training/online.py) replaces `data`: every
step scores a super-batch of a pass layout with the live weights and trains on the b it
selects (each process on its own part), as the JEST paper runs it. Its scoring and
selection FLOPs are counted apart from training's (`TrainResult.scoring_flops`,
`.selection_flops`).
"""
import collections
import dataclasses
import logging
import math
import posixpath
from typing import Optional

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from open_clip.transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from jest_curate import formats, hashing
from training import data as data_lib
from training import model as model_lib
from training import online as online_lib
from training.distributed import World, world_from_env
from training.flops import StepFlops
from training.schedule import warmup_cosine_lr

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "latest_checkpoint",
           "checkpoint_url", "resolve_device", "resolve_precision"]

log = logging.getLogger(__name__)

# Fields that define a run; a resume or a next round must not change them.
_RUN_FIELDS = ("batch_size", "total_steps", "learning_rate", "min_learning_rate",
               "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip_norm",
               "seed", "low_res_size", "low_res_fraction")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # Shipped/open_clip config name or JSON path.
    output: str  # Run directory: checkpoints/, tensorboard/.
    data: Optional[str]  # Curated tar shards or canonical corpus; None to write step 0 or
    # to select online.
    batch_size: int
    total_steps: int  # Planned length of the whole run; the schedule spans it.
    stop_at_step: Optional[int] = None  # End of this call's slice (default: total_steps).
    data_format: str = "auto"  # auto | curated | canonical
    learning_rate: float = 1e-3
    min_learning_rate: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95  # SigLIP's choice for stable sigmoid-loss training.
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = None
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch CPU threads (default: torch's choice).
    checkpoint_every: int = 0  # Also checkpoint every N steps; 0: step 0 and the end only.
    resume: bool = False
    low_res_size: Optional[int] = None
    low_res_fraction: float = 0.0
    window_shards: int = 8  # Canonical data: shards shuffled together.
    log_every: int = 10
    tensorboard: bool = True
    # Online selection (training/online.py): every step scores and selects a super-batch of
    # a pass layout with the live weights, instead of reading `data`.
    online: Optional[online_lib.OnlineConfig] = None

    def __post_init__(self):
        for name in ("batch_size", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        stop = self.stop
        if not 0 <= stop <= self.total_steps:
            raise ValueError(f"stop_at_step must be in [0, total_steps={self.total_steps}], "
                             f"got {stop}")
        if self.data is not None and self.online is not None:
            raise ValueError("give data or online selection, not both")
        if self.data is None and self.online is None and stop > 0:
            raise ValueError("data (or online selection) is required unless stop_at_step is 0")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.low_res_fraction <= 1.0:
            raise ValueError(f"low_res_fraction must be in [0, 1], got {self.low_res_fraction}")
        if (self.low_res_size is None) != (self.low_res_fraction == 0.0):
            raise ValueError("multi-resolution needs both low_res_size and low_res_fraction > 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every must be >= 0 and log_every >= 1")

    @property
    def stop(self) -> int:
        return self.total_steps if self.stop_at_step is None else self.stop_at_step

    def run_fields(self) -> dict:
        return {name: getattr(self, name) for name in _RUN_FIELDS}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    checkpoint: str  # URL of the checkpoint at `step`.
    examples_seen: int
    flops: int  # Training FLOPs (forward + backward) accumulated over the run.
    loss: Optional[float]  # Of the last step trained in this call.
    # Online selection's costs over the run, apart from training's: the learner's forward
    # passes over every step's candidates, and the selection matmuls.
    scoring_flops: int = 0
    selection_flops: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast by default where it is faster: CUDA with bf16, or CPUs with AMX.

    AVX512-BF16 alone is not enough: measured on such a CPU (no AMX), bf16 autocast
    training of the demo's micro model ran no faster than fp32, often slower.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if amx else "fp32"


def checkpoint_url(output: str, step: int) -> str:
    return formats.join_url(output, "checkpoints", f"step_{step:08d}.pt")


def latest_checkpoint(output: str) -> Optional[str]:
    """The newest step_*.pt under OUTPUT/checkpoints (files appear atomically), or None."""
    root = formats.join_url(output, "checkpoints")
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        return None
    steps = sorted(int(name[5:-3]) for name in map(posixpath.basename, fs.ls(path, detail=False))
                   if name.startswith("step_") and name.endswith(".pt") and name[5:-3].isdigit())
    return checkpoint_url(output, steps[-1]) if steps else None


def _resize_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A ViT's [1 + g*g, w] position table resampled to `grid`; differentiable.

    Same interpolation as open_clip's `resize_pos_embed`, which the scorer uses to
    load weights at a lower resolution, so training and scoring agree.
    """
    old = int(math.isqrt(pos.shape[0] - 1))
    image = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True,
                          align_corners=False)
    return torch.cat([pos[:1], image.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def _encode_images(model: torch.nn.Module, images: torch.Tensor, low_res: bool) -> torch.Tensor:
    if not low_res:
        return model.encode_image(images, normalize=True)
    visual = model.visual
    grid = images.shape[-1] // visual.patch_size[0]
    positions = _resize_positions(visual.positional_embedding, grid)
    features = torch.func.functional_call(visual, {"positional_embedding": positions},
                                          (images,))
    return F.normalize(features, dim=-1)


class _Towers(torch.nn.Module):
    """One training forward: image parts (each at its resolution) and captions, as the
    loss takes them. A module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_parts, tokens):
        image = torch.cat([_encode_images(self.model, images, low) for images, low in image_parts])
        text = self.model.encode_text(tokens, normalize=True)
        return image, text, self.model.logit_scale.exp(), self.model.logit_bias


def _architecture(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "preprocess_cfg"}


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # Gains, biases, class token and the logit scale/bias are not decayed (as open_clip_train).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # The fused kernel updates each tensor in one pass (3-4x faster than the per-tensor
    # loop on a CPU, whose text tower's token table dominates the step); the same rule.
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0},
         {"params": decay, "weight_decay": config.weight_decay}],
        lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=config.eps,
        fused=True)


class Trainer:
    """Model, optimizer and counters of one run; `fit` trains up to a step."""

    def __init__(self, config: TrainConfig, world: Optional[World] = None):
        self.config = config
        self.world = world or World()
        if config.num_threads:  # Process-wide; on a shared CPU fewer threads stall less.
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision = resolve_precision(config.precision, self.device)
        self.model_name, self.model_cfg = model_lib.load_model_config(config.model)
        self.contract = model_lib.preprocess_contract(self.model_cfg)
        torch.manual_seed(hashing.derive_seed(config.seed, "init"))
        self.model = model_lib.build_model(self.model_cfg).to(self.device)
        torch.manual_seed(hashing.derive_seed(config.seed, "train"))  # Dropout etc.
        self.optimizer = _optimizer(self.model, config)
        self.loss_fn = SigLipLoss(rank=self.world.rank, world_size=self.world.size)
        self.towers = _Towers(self.model)
        if self.world.distributed:
            self.towers = DistributedDataParallel(
                self.towers, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.low_res_contract = self._check_low_res() if config.low_res_size else None
        self.step, self.examples_seen, self.flops = 0, 0, 0
        self.scoring_flops, self.selection_flops = 0, 0  # Online selection's.
        self.flops_per_example_train = None
        self.dropped = collections.Counter()
        self.data_position = {"url": None, "batches": 0}  # Batches consumed from `url`.
        self._step_flops = StepFlops()
        self._writer = None

    def _check_low_res(self) -> formats.Preprocess:
        visual, size = self.model.visual, self.config.low_res_size
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"multi-resolution training needs a ViT image tower; "
                             f"{self.model_name} has {type(visual).__name__}")
        patch, full = visual.patch_size[0], visual.image_size[0]
        if size % patch or not patch <= size < full:
            raise ValueError(f"low_res_size must be a multiple of the patch size {patch} "
                             f"below the model's {full} px, got {size}")
        return model_lib.preprocess_contract(self.model_cfg, image_size=size)

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> str:
        """Rank 0 writes the checkpoint; every process returns its URL once it exists."""
        url = checkpoint_url(self.config.output, self.step)
        if self.world.is_main:
            self._write_checkpoint(url)
        self.world.barrier()
        return url

    def _write_checkpoint(self, url: str) -> None:
        extra = {
            "run": self.config.run_fields(), "examples_seen": self.examples_seen,
            "flops": self.flops, "flops_per_example_train": self.flops_per_example_train,
            "scoring_flops": self.scoring_flops, "selection_flops": self.selection_flops,
            "dropped": dict(self.dropped), "data_position": self.data_position,
            "precision": self.precision, "world_size": self.world.size,
            "torch_rng_state": torch.get_rng_state().tolist(),
        }
        if self.device.type == "cuda":
            extra["cuda_rng_state"] = torch.cuda.get_rng_state(self.device).tolist()
        c = self.config
        sha = formats.save_checkpoint(url, formats.Checkpoint(
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            step=self.step, model_cfg=self.model_cfg, model_name=self.model_name,
            optimizer=self.optimizer.state_dict(), extra=extra,
            scheduler={"kind": "warmup_cosine", "base_lr": c.learning_rate,
                       "min_lr": c.min_learning_rate, "warmup_steps": c.warmup_steps,
                       "total_steps": c.total_steps}))
        formats.write_json_atomic(formats.join_url(c.output, "checkpoints", "latest.json"), {
            "step": self.step, "checkpoint": posixpath.basename(url), "sha256": sha,
            "model_name": self.model_name, "examples_seen": self.examples_seen,
            "flops": self.flops, "flops_per_example_train": self.flops_per_example_train,
            "scoring_flops": self.scoring_flops, "selection_flops": self.selection_flops})
        log.info("step %d: checkpoint %s", self.step, url)

    def restore(self, url: str) -> None:
        """Continue from a checkpoint of this same run (model, schedule, seed, batch size)."""
        ckpt = formats.load_checkpoint(url)
        if ckpt.model_cfg is None or _architecture(ckpt.model_cfg) != _architecture(
                self.model_cfg):
            raise formats.CheckpointError(
                f"{url}: was trained with another model config than {self.config.model!r}")
        extra = ckpt.extra or {}
        saved, wanted = extra.get("run"), self.config.run_fields()
        if saved is None or ckpt.optimizer is None:
            raise formats.CheckpointError(f"{url}: lacks training state; not a trainer "
                                          "checkpoint, so it cannot be resumed")
        changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        trained_with = extra.get("world_size", 1)
        if trained_with != self.world.size:
            raise formats.CheckpointError(
                f"{url}: trained with {trained_with} process(es); resume it with the same "
                f"number (--nproc {trained_with}), not {self.world.size}: each process's "
                "share of every batch would change")
        if changed:
            raise formats.CheckpointError(f"{url}: resuming would change the run's "
                                          f"settings (checkpoint, requested): {changed}")
        model_lib.load_weights(self.model, ckpt.state_dict, source=url)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = ckpt.step
        self.examples_seen, self.flops = extra["examples_seen"], extra["flops"]
        self.flops_per_example_train = extra.get("flops_per_example_train")
        self.scoring_flops = extra.get("scoring_flops", 0)
        self.selection_flops = extra.get("selection_flops", 0)
        self.dropped = collections.Counter(extra.get("dropped", {}))
        self.data_position = dict(extra["data_position"])
        torch.set_rng_state(torch.tensor(extra["torch_rng_state"], dtype=torch.uint8))
        if self.device.type == "cuda" and "cuda_rng_state" in extra:
            torch.cuda.set_rng_state(torch.tensor(extra["cuda_rng_state"], dtype=torch.uint8),
                                     self.device)
        log.info("resumed %s at step %d", url, self.step)

    # ----------------------------------------------------------------- training
    def _low_positions(self, n: int, step: int, *key) -> set:
        """Positions of a batch of `n` trained at low resolution at `step`; the draw is
        seeded by the step (and `key`)."""
        if self.low_res_contract is None:
            return set()
        n_low = round(self.config.low_res_fraction * n)
        rng = np.random.default_rng(hashing.derive_seed(self.config.seed, "low_res", step,
                                                        *key))
        return set(rng.permutation(n)[:n_low].tolist())

    def _split_resolutions(self, examples, *key):
        """(full-resolution, low-resolution) examples of this step."""
        low = self._low_positions(len(examples), self.step, *key)
        return ([e for i, e in enumerate(examples) if i not in low],
                [e for i, e in enumerate(examples) if i in low])

    def _my_positions(self, n: int, step: int) -> tuple:
        """This process's (full-resolution, low-resolution) positions in the global batch
        of `n` trained at `step`.

        The resolution split is drawn over the global batch, whose order is full then low
        (as one process trains it); each process takes its contiguous part of that order.
        """
        low = self._low_positions(n, step)
        order = [i for i in range(n) if i not in low] + sorted(low)
        mine = order[self.world.part(n)]
        return [i for i in mine if i not in low], [i for i in mine if i in low]

    def _my_parts(self, examples, local: bool = False):
        """This process's (full-resolution, low-resolution) examples of a global batch
        (`_my_positions`). `local`: `examples` are already this process's own (online
        selection, where each rank selects its part); the split is then drawn over them,
        seeded by the rank too.
        """
        if local:
            return self._split_resolutions(
                examples, *(("rank", self.world.rank) if self.world.distributed else ()))
        full, low = self._my_positions(len(examples), self.step)
        return [examples[i] for i in full], [examples[i] for i in low]

    def _reads(self, start: int):
        """keep(batch, position) for a curated source read from batch `start` at this
        step: whether this process trains that example (the others are left unread)."""
        step0, b, mine = self.step, self.config.batch_size, {}

        def keep(batch: int, position: int) -> bool:
            if batch not in mine:
                mine.clear()
                full, low = self._my_positions(b, step0 + batch - start)
                mine[batch] = set(full) | set(low)
            return position in mine[batch]
        return keep

    def train_step(self, examples, local: bool = False) -> float:
        """One optimizer step on a global batch (every process passes the same one), or,
        `local`, on this process's own part of it (online selection)."""
        full_examples, low_examples = self._my_parts(examples, local)
        parts = [(data_lib.prepare_batch(full_examples, self.contract), False)]
        if low_examples:
            parts.append((data_lib.prepare_batch(low_examples, self.low_res_contract), True))
        dropped = 0
        for batch, _ in parts:
            for reason, uids in batch.dropped.items():
                self.dropped[reason] += len(uids)
                dropped += len(uids)
                log.warning("step %d: dropped %d example(s) (%s): %s", self.step, len(uids),
                            reason, uids[:10])
        parts = [(b, low) for b, low in parts if b.uids]
        n_local = sum(len(b.uids) for b, _ in parts)
        n, dropped = (int(x) for x in self.world.sum([n_local, dropped]))
        if self.world.distributed and dropped:  # Every process raises: none waits forever.
            raise data_lib.DataError(
                f"step {self.step}: {dropped} example(s) of the global batch were unusable; "
                "distributed steps need every process's part whole (train this data with "
                "one process, or drop the examples when selecting)")
        if not parts:
            raise data_lib.DataError(f"step {self.step}: every example of the batch was "
                                     "unusable")
        tokens = torch.cat([b.tokens for b, _ in parts]).to(self.device)
        lr = warmup_cosine_lr(self.step, base_lr=self.config.learning_rate,
                              warmup_steps=self.config.warmup_steps,
                              total_steps=self.config.total_steps,
                              min_lr=self.config.min_learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def forward_backward():
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                image, text, scale, bias = self.towers(
                    [(b.images.to(self.device), low) for b, low in parts], tokens)
            # The loss in fp32: bf16 logits near the -10 bias would lose the signal.
            loss = self.loss_fn(image.float(), text.float(), scale, bias)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss

        shape_key = tuple((tuple(b.images.shape), low) for b, low in parts) + (tokens.shape,)
        loss, flops_local = self._step_flops.run(shape_key, forward_backward)
        if self.config.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():  # As open_clip_train: keep t = exp(t') <= 100.
            self.model.logit_scale.clamp_(0, math.log(100))
        # Global figures: FLOPs of every process; the loss over the global batch is the
        # mean of the processes' losses (each is its rows' sum over its part size).
        flops, loss_sum = self.world.sum([flops_local, float(loss.detach())])
        self.step += 1
        self.examples_seen += n
        self.flops += int(flops)
        self.flops_per_example_train = int(flops) / n
        loss_value = loss_sum / self.world.size
        self._log_scalars(loss_value, lr)
        return loss_value

    def _log_scalars(self, loss: float, lr: float) -> None:
        if self.step % self.config.log_every == 0 or self.step == 1:
            log.info("step %d/%d loss %.4f lr %.2e examples %d GFLOPs %.1f", self.step,
                     self.config.total_steps, loss, lr, self.examples_seen, self.flops / 1e9)
        if self._writer is None:
            return
        t, b = model_lib.logit_params(self.model)
        for name, value in (("loss", loss), ("lr", lr), ("examples_seen", self.examples_seen),
                            ("flops", self.flops), ("logit_scale", t), ("logit_bias", b)):
            self._writer.add_scalar(f"train/{name}", value, self.step)

    def _open_writer(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.config.output)
        if not self.config.tensorboard or not self.world.is_main:
            return
        if "file" not in fs.protocol and "local" not in fs.protocol:
            log.warning("TensorBoard scalars are written for local outputs only; skipping")
            return
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a crashed run logged after its last checkpoint.
        self._writer = SummaryWriter(posixpath.join(path, "tensorboard"),
                                     purge_step=self.step or None)

    def _count_selection(self, batch: online_lib.SelectedBatch) -> None:
        """Add a step's online scoring and selection FLOPs (every process's)."""
        scored, selected = self.world.sum([batch.scoring_flops, batch.selection_flops])
        self.scoring_flops += int(round(scored))
        self.selection_flops += int(selected)

    def fit(self, source, stop_at_step: int) -> Optional[float]:
        """Train on `source` (CuratedShards/CanonicalBatches/OnlineSource) until
        `stop_at_step`."""
        url = source.url.rstrip("/")
        if self.data_position["url"] != url:
            if self.data_position["url"] is not None:
                log.info("new data source %s (was %s): starting at its first batch", url,
                         self.data_position["url"])
            self.data_position = {"url": url, "batches": 0}  # E.g. the next round's shards.
        start, needed = self.data_position["batches"], stop_at_step - self.step
        if source.num_batches is not None and start + needed > source.num_batches:
            raise data_lib.DataError(
                f"{url}: {source.num_batches - start} batches of {source.batch_size} left "
                f"after batch {start}, but steps {self.step}..{stop_at_step} need {needed}")
        self.model.train()
        self._open_writer()
        loss = None
        try:
            # Each process reads the bytes of its own part of every global batch only.
            batches = source.batches(start, keep=self._reads(start)) if (
                self.world.distributed and isinstance(source, data_lib.CuratedShards)) \
                else source.batches(start)
            while self.step < stop_at_step:
                batch = next(batches)  # Online: selected now, with the current weights.
                if isinstance(batch, online_lib.SelectedBatch):
                    loss = self.train_step(batch.examples, local=True)
                    self._count_selection(batch)
                else:
                    loss = self.train_step(batch)
                self.data_position["batches"] += 1
                every = self.config.checkpoint_every
                if (every and self.step % every == 0) or self.step == stop_at_step:
                    self.save()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return loss


def _open_data(config: TrainConfig, trainer: Trainer):
    if config.online is not None:
        return online_lib.OnlineSource(
            config.online, batch_size=config.batch_size, model=trainer.model,
            model_name=trainer.model_name, model_cfg=trainer.model_cfg, world=trainer.world)
    return data_lib.open_source(config.data, data_format=config.data_format,
                                batch_size=config.batch_size,
                                seed=hashing.derive_seed(config.seed, "train_data"),
                                window_shards=config.window_shards)


def train(config: TrainConfig, world: Optional[World] = None) -> TrainResult:
    """Start (writing step 0) or resume a run, and train it up to `config.stop`.

    Under torchrun every process calls this; `world` defaults to torchrun's environment.
    """
    world = world or world_from_env(resolve_device(config.device).type)
    trainer = Trainer(config, world)
    latest = latest_checkpoint(config.output)
    # Every process sees the same checkpoints before rank 0 writes one: a process that
    # looked after rank 0 wrote step 0 would resume from it (or refuse it) and skip the
    # step-0 barrier the others wait at.
    world.barrier()
    source = None
    if latest is not None:
        if not config.resume:
            raise FileExistsError(f"{config.output} already holds checkpoints (newest "
                                  f"{latest}); pass --resume to continue it or pick another "
                                  "output")
        trainer.restore(latest)
        if trainer.step > config.stop:
            raise formats.CheckpointError(f"{latest} is at step {trainer.step}, past "
                                          f"stop_at_step {config.stop}")
    else:
        if config.resume:
            log.info("nothing to resume in %s: starting a new run", config.output)
        if config.stop > 0:  # Unusable data fails before step 0 is written.
            source = _open_data(config, trainer)
        latest = trainer.save()  # Step 0: the learner that scores round 0.
    loss = None
    if trainer.step < config.stop:
        loss = trainer.fit(source or _open_data(config, trainer), config.stop)
        latest = checkpoint_url(config.output, trainer.step)
    if config.online is not None and online_lib.round_complete(config.online,
                                                               trainer.data_position):
        world.barrier()  # Every rank's rows are written.
        if world.is_main:  # Also after a kill between the last checkpoint and this.
            online_lib.commit_round(config.online, batch_size=config.batch_size,
                                    world_size=world.size)
    return TrainResult(step=trainer.step, checkpoint=latest, examples_seen=trainer.examples_seen,
                       flops=trainer.flops, loss=loss, scoring_flops=trainer.scoring_flops,
                       selection_flops=trainer.selection_flops)
