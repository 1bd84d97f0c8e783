"""`jest-curate train` and `jest-curate eval`: thin CLIs over training.train / evaluate.

    # Reference model on the curated set (random batches from canonical shards):
    jest-curate train --shards demo/curated --model jest-vit-tiny-32 \\
        --output runs/reference --steps 2000 --batch-size 128
    # Learner on curated WebDataset shards, in the order selection wrote them:
    jest-curate train --shards runs/jest/round_000/shards --model jest-vit-tiny-32 \\
        --output runs/jest/learner --steps 3000 --stop-at-step 1000 --resume
    # Online selection (JEST as the paper runs it): every step scores super-batch
    # FIRST + t of a pass layout with the live weights and trains on the b it selects:
    jest-curate train --online-layout runs/jest/passes/000 --online-super-batches 0:1000 \
        --online-output runs/jest/round_000/selection --model jest-vit-tiny-32 \
        --output runs/jest/learner --steps 3000 --stop-at-step 1000 --batch-size 64 --resume
    jest-curate eval --checkpoint runs/reference --eval-data demo/eval --output ref.json
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile

import torch

from jest_core import sampler
from jest_curate import flags, formats
from training import data as data_lib
from training import distributed
from training import evaluate
from training import model as model_lib
from training import online as online_lib
from training import scoring
from training import train as train_lib

__all__ = ["parse_train_args", "train_main", "parse_eval_args", "eval_main"]

_MODEL_HELP = ("open_clip config name or JSON config file. Shipped CPU configs: "
               + ", ".join(sorted(p.stem for p in model_lib.CONFIG_DIR.glob("*.json")))
               + ". Full-size (GPU): ViT-B-32, ViT-B-16, ViT-B-16-SigLIP, ViT-L-14.")
log = logging.getLogger(__name__)
_FAILURE_LINES = 20  # Of each process's stderr, in the error of a failed --nproc run.
_USER_ERRORS = (FileNotFoundError, FileExistsError, formats.FormatError,
                formats.CheckpointError, data_lib.DataError)


def parse_train_args(argv):
    p = argparse.ArgumentParser(
        prog="jest-curate train",
        description="Train a learner or reference model with the SigLIP loss (AdamW, warmup + "
                    "cosine over --steps); resumable and continuable across rounds.")
    p.add_argument("--shards", default=None,
                   help="Training data URL: curated WebDataset shards (*.tar + sizes.json), read "
                        "in written order, or a canonical parquet corpus, read in seeded random "
                        "batches. Optional only with --stop-at-step 0.")
    p.add_argument("--data-format", choices=("auto", "curated", "canonical"), default="auto")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--output", required=True, help="Run directory (checkpoints/, tensorboard/).")
    p.add_argument("--steps", type=int, default=None,
                   help="Planned total steps of the whole run (the LR schedule spans them). "
                        "Default for curated shards: all their batches.")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="Stop this invocation at this step (one round's slice of the run).")
    p.add_argument("--batch-size", type=int, default=256,
                   help="Examples per step; for curated shards, the selected sub-batch size b.")
    p.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate.")
    p.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the last step.")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip-norm", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="Seeds init, data order, resolution split.")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the hardware has native bf16, else fp32.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a busy shared CPU).")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="Checkpoint every N steps (step 0 and the last step always).")
    p.add_argument("--resume", action="store_true",
                   help="Continue from the newest checkpoint in --output (start if none).")
    p.add_argument("--low-res-size", type=int, default=None,
                   help="Multi-resolution training: image size for part of each batch (ViT).")
    p.add_argument("--low-res-fraction", type=float, default=0.0,
                   help="Fraction of each batch trained at --low-res-size.")
    p.add_argument("--window-shards", type=int, default=8,
                   help="Canonical data: shards shuffled together (memory bound).")
    p.add_argument("--nproc", type=int, default=1,
                   help="Data-parallel training processes on this machine (torchrun; one per "
                        "GPU, gloo on CPU). The global batch stays --batch-size.")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    g = p.add_argument_group(
        "online selection", "Instead of --shards: every step scores a super-batch of a pass "
        "layout with the current weights (S learner forward passes) and trains on the "
        "--batch-size examples it selects, writing the round's manifest as the round job does.")
    g.add_argument("--online-layout", default=None,
                   help="The pass layout to select from (jest-curate layout's output).")
    g.add_argument("--online-super-batches", default=None, metavar="FIRST:STOP",
                   help="The round's super-batches of the pass, one per step, from this "
                        "call's first step (or its resume point) on.")
    g.add_argument("--online-output", default=None,
                   help="The round's selection directory (manifest/, stats.json, _SUCCESS).")
    # Defaults (None here) are OnlineConfig's: 0, jest, 16, 1.0, 0, trained size, 0.0,
    # fp32, fp32, 256.
    g.add_argument("--online-round", type=int, help="The round the manifest records.")
    g.add_argument("--online-method", choices=sorted(sampler.NEEDS))
    g.add_argument("--online-chunks", type=int, help="N chunks per sub-batch.")
    g.add_argument("--online-temperature", type=float)
    g.add_argument("--online-seed", type=int,
                   help="Selection seed (the round job's --seed; not the trainer's --seed).")
    g.add_argument("--online-image-size", type=int,
                   help="Learner scoring resolution (default: the trained one).")
    g.add_argument("--online-patch-dropout", type=float,
                   help="Fraction of image patches dropped when scoring.")
    g.add_argument("--online-precision", choices=scoring.PRECISIONS,
                   help="Precision of the scoring forward passes.")
    g.add_argument("--online-compute-dtype", choices=("fp32", "bf16"),
                   help="Precision of the selection matmuls.")
    g.add_argument("--online-scoring-batch-size", type=int,
                   help="Candidates per learner forward pass.")
    return flags.parse_strict(p, argv)[0]


# --online-X flag → OnlineConfig field (the layout, range and output are required).
_ONLINE_FIELDS = {"online_round": "round", "online_method": "method",
                  "online_chunks": "chunks", "online_temperature": "temperature",
                  "online_seed": "seed", "online_image_size": "image_size",
                  "online_patch_dropout": "patch_dropout", "online_precision": "precision",
                  "online_compute_dtype": "compute_dtype",
                  "online_scoring_batch_size": "scoring_batch_size"}


def _online_config(args) -> "online_lib.OnlineConfig | None":
    """The --online-* flags as an OnlineConfig (None without --online-layout)."""
    given = {field: getattr(args, flag) for flag, field in _ONLINE_FIELDS.items()
             if getattr(args, flag) is not None}
    if args.online_layout is None:
        stray = list(given) + [k for k in ("super_batches", "output")
                               if getattr(args, f"online_{k}") is not None]
        if stray:
            raise ValueError(f"--online-{stray[0].replace('_', '-')} needs --online-layout")
        return None
    if args.shards is not None:
        raise ValueError("give --shards or --online-layout, not both")
    if not args.online_super_batches or not args.online_output:
        raise ValueError("--online-layout needs --online-super-batches FIRST:STOP and "
                         "--online-output")
    try:
        first, stop = (int(x) for x in args.online_super_batches.split(":"))
    except ValueError:
        raise ValueError(f"--online-super-batches: expected FIRST:STOP, got "
                         f"{args.online_super_batches!r}") from None
    return online_lib.OnlineConfig(layout=args.online_layout, first_super_batch=first,
                                   stop_super_batch=stop, output=args.online_output, **given)


def _train_config(args) -> train_lib.TrainConfig:
    online = _online_config(args)
    steps = args.steps
    if steps is None and online is not None:
        steps = online.super_batches  # One step per super-batch.
    if steps is None:
        if args.shards is None:
            raise ValueError("--steps is required without --shards")
        fmt = args.data_format
        if fmt == "auto":
            fmt = data_lib.detect_format(args.shards)
        if fmt != "curated":
            raise ValueError("--steps is required for canonical (random-batch) data")
        steps = data_lib.CuratedShards(args.shards, batch_size=args.batch_size).num_batches
    return train_lib.TrainConfig(
        model=args.model, output=args.output, data=args.shards, batch_size=args.batch_size,
        total_steps=steps, stop_at_step=args.stop_at_step, data_format=args.data_format,
        learning_rate=args.lr, min_learning_rate=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2,
        grad_clip_norm=args.grad_clip_norm, seed=args.seed, precision=args.precision,
        device=args.device, num_threads=args.num_threads,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        low_res_size=args.low_res_size, low_res_fraction=args.low_res_fraction,
        window_shards=args.window_shards, log_every=args.log_every,
        tensorboard=args.tensorboard, online=online)


def _online_argv(online: "online_lib.OnlineConfig | None") -> list:
    if online is None:
        return []
    flags_ = {"--online-layout": online.layout,
              "--online-super-batches": f"{online.first_super_batch}:{online.stop_super_batch}",
              "--online-output": online.output, "--online-round": online.round,
              "--online-method": online.method, "--online-chunks": online.chunks,
              "--online-temperature": online.temperature, "--online-seed": online.seed,
              "--online-image-size": online.image_size,
              "--online-patch-dropout": online.patch_dropout,
              "--online-precision": online.precision,
              "--online-compute-dtype": online.compute_dtype,
              "--online-scoring-batch-size": online.scoring_batch_size}
    return _as_argv(flags_)


def _as_argv(flags_: dict) -> list:
    """{flag: value} as argv; None values are left out, floats keep every digit."""
    return [str(x) for flag, value in flags_.items() if value is not None
            for x in (flag, repr(value) if isinstance(value, float) else value)]


def train_argv(config: train_lib.TrainConfig) -> list:
    """`jest-curate train` flags that rebuild `config` (the inverse of `_train_config`)."""
    eps = next(f for f in dataclasses.fields(train_lib.TrainConfig) if f.name == "eps")
    if config.eps != eps.default:
        raise ValueError("eps has no flag; train in-process to change it")
    flags_ = {"--model": config.model, "--output": config.output, "--shards": config.data,
              "--data-format": config.data_format, "--batch-size": config.batch_size,
              "--steps": config.total_steps, "--stop-at-step": config.stop_at_step,
              "--lr": config.learning_rate, "--min-lr": config.min_learning_rate,
              "--warmup-steps": config.warmup_steps, "--weight-decay": config.weight_decay,
              "--beta1": config.beta1, "--beta2": config.beta2,
              "--grad-clip-norm": config.grad_clip_norm, "--seed": config.seed,
              "--precision": config.precision, "--device": config.device,
              "--num-threads": config.num_threads,
              "--checkpoint-every": config.checkpoint_every,
              "--low-res-size": config.low_res_size,
              "--low-res-fraction": config.low_res_fraction,
              "--window-shards": config.window_shards, "--log-every": config.log_every}
    return _as_argv(flags_) + _online_argv(config.online) + (
        ["--resume"] if config.resume else []) + (
        [] if config.tensorboard else ["--no-tensorboard"])


def train_with_processes(config: train_lib.TrainConfig, nproc: int) -> train_lib.TrainResult:
    """`train(config)`, as `nproc` data-parallel processes under torchrun when nproc > 1.

    The processes' output goes to this process's log (its file; the terminal only with
    -v), and a failure names every process's last lines.
    """
    if nproc == 1:
        return train_lib.train(config)
    with tempfile.TemporaryDirectory(prefix="jest-curate-torchrun-") as log_dir:
        code = distributed.launch(nproc, ["train", *train_argv(config)], log_dir=log_dir)
        logs = distributed.rank_logs(log_dir)
    for rank, text in sorted(logs.items()):
        for line in text.splitlines():
            log.info("[rank %d] %s", rank, line)
    if code:
        tails = "".join(f"\n--- rank {rank}, last lines of its stderr:\n" +
                        "\n".join(text.splitlines()[-_FAILURE_LINES:])
                        for rank, text in sorted(logs.items()))
        raise RuntimeError(f"jest-curate train --nproc {nproc} exited with {code}"
                           f"{tails or ' (no process wrote anything)'}")
    latest = formats.read_json(formats.join_url(config.output, "checkpoints", "latest.json"))
    return train_lib.TrainResult(
        step=latest["step"], examples_seen=latest["examples_seen"], flops=latest["flops"],
        checkpoint=formats.join_url(config.output, "checkpoints", latest["checkpoint"]),
        loss=None, scoring_flops=latest.get("scoring_flops", 0),
        selection_flops=latest.get("selection_flops", 0))


def train_main(argv=None) -> int:
    args = parse_train_args(argv)
    if args.nproc < 1:
        print("jest-curate train: error: --nproc must be >= 1", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = _train_config(args)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            # The processes get the config's flags, not ours: torchrun's parser would take
            # `--nproc` for its own --nproc-per-node, and they know they are distributed.
            return distributed.launch(args.nproc, ["train", *train_argv(config)])
        result = train_lib.train(config)
        distributed.shutdown()  # Every rank is past its last collective.
    except _USER_ERRORS + (ValueError,) as e:
        print(f"jest-curate train: error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    print(json.dumps({"step": result.step, "checkpoint": result.checkpoint,
                      "examples_seen": result.examples_seen, "flops": result.flops,
                      "scoring_flops": result.scoring_flops,
                      "selection_flops": result.selection_flops, "loss": result.loss}))
    return 0


def parse_eval_args(argv):
    p = argparse.ArgumentParser(prog="jest-curate eval",
                                description="Zero-shot classification and retrieval metrics.")
    p.add_argument("--checkpoint", required=True,
                   help="A checkpoint file, or a training run directory (its newest checkpoint).")
    p.add_argument("--model", default=None,
                   help="Needed only for checkpoints without a config (open_clip_train's). "
                        + _MODEL_HELP)
    p.add_argument("--eval-data", required=True,
                   help="Eval directory (classes.json, zeroshot/, retrieval/) or a demo root.")
    p.add_argument("--output", default=None, help="Write the metrics JSON here too.")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads.")
    return flags.parse_strict(p, argv)[0]


def _resolve_checkpoint(url: str) -> str:
    if url.endswith(".pt"):
        return url
    latest = train_lib.latest_checkpoint(url)
    if latest is None:
        raise FileNotFoundError(f"{url}: not a .pt file and no checkpoints/step_*.pt under it")
    return latest


def eval_main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_eval_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        checkpoint = _resolve_checkpoint(args.checkpoint)
        model, cfg, name, sha = model_lib.model_from_checkpoint(checkpoint, model=args.model)
        step = formats.load_checkpoint(checkpoint).step
        data = evaluate.load_eval_data(args.eval_data)
    except _USER_ERRORS + (ValueError,) as e:
        print(f"jest-curate eval: error: {e}", file=sys.stderr)
        return 2
    device = str(train_lib.resolve_device(args.device))
    encode_image, encode_text = evaluate.model_encoders(
        model, model_lib.preprocess_contract(cfg), device=device, precision=args.precision)
    metrics = evaluate.evaluate_dir(encode_image, encode_text, data, batch_size=args.batch_size)
    report = {"checkpoint": checkpoint, "checkpoint_sha256": sha, "step": step,
              "model_name": name, "eval_data": data.url, "precision": args.precision, **metrics}
    if args.output:
        formats.write_json_atomic(args.output, report)
    print(json.dumps(report, sort_keys=True))
    return 0
