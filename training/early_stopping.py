"""A reference worth bootstrapping from: training with held-out early stopping.

    split = split_holdout("demo/curated", "runs/ref/data", fraction=0.1, seed=0)
    record = train_with_early_stopping(TrainConfig(..., data=split["train"],
                                                   total_steps=4000),
                                       holdout=split["holdout"], eval_every=200, patience=3)

The curated set is split by blake2b(seed, uid) into a training part and a held-out
part (no test data involved). Training runs in slices of `eval_every` steps under the
schedule of `total_steps` (the most it may run); after each slice the held-out SigLIP
loss of the checkpoint is measured. Training stops once `patience` evaluations in a
row fail to improve on the best; the best checkpoint is the reference.

Its cost for the FLOP ledger is everything spent: every step trained (also those after
the best checkpoint) plus the held-out forward passes. A record (`early_stopping.json`)
is written after every evaluation, so a killed run resumes where it stopped.
"""
import dataclasses
import logging
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from jest_core import losses
from jest_curate import formats, hashing
from training import evaluate as evaluate_lib
from training import model as model_lib
from training import preprocess
from training import train as train_lib
from training.flops import count_flops

__all__ = ["split_holdout", "holdout_loss", "train_with_early_stopping"]

log = logging.getLogger(__name__)


def split_holdout(corpus: str, output: str, *, fraction: float, seed: int) -> dict:
    """{"train": URL, "holdout": URL, counts}: the corpus split by blake2b(seed, uid).

    Both parts are canonical datasets (shard ids of the corpus); rerunning rewrites the
    same bytes, and a finished split (split.json) is reused.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    record_url = formats.join_url(output, "split.json")
    params = {"corpus": corpus, "fraction": fraction, "seed": seed}
    if formats.exists(record_url) and formats.read_json(record_url).get("params") == params:
        return formats.read_json(record_url)
    threshold = int(fraction * 2 ** 64)
    counts, written = {"train": 0, "holdout": 0}, {"train": [], "holdout": []}
    for shard in formats.list_shards(corpus):
        table = formats.read_shard(shard, schema=formats.CORPUS_SCHEMA)
        held = np.array([hashing.hash_u64("holdout", seed, u) < threshold
                         for u in table.column("uid").to_pylist()], bool)
        for part, mask in (("holdout", held), ("train", ~held)):
            written[part].append(formats.write_shard(
                formats.join_url(output, part), shard.shard_id, table.filter(pa.array(mask)),
                schema=formats.CORPUS_SCHEMA))
            counts[part] += int(mask.sum())
    for part, infos in written.items():  # Each part is one committed dataset.
        formats.write_index(formats.join_url(output, part), infos,
                            writer="jest-curate reference holdout split")
    if not counts["holdout"] or not counts["train"]:
        raise ValueError(f"holdout split of {corpus} left a part empty: {counts}")
    record = {"params": params, "train": formats.join_url(output, "train"),
              "holdout": formats.join_url(output, "holdout"), "counts": counts}
    formats.write_json_atomic(record_url, record)
    return record


def _holdout_pairs(url: str) -> tuple:
    images, captions = [], []
    for shard in formats.list_shards(url):
        table = formats.read_shard(shard, columns=["image", "caption"])
        for data, caption in zip(table.column("image").to_pylist(),
                                 table.column("caption").to_pylist()):
            try:
                images.append(preprocess.decode_image(data))
            except preprocess.ImageDecodeError:
                continue  # The trainer drops these too.
            captions.append(caption)
    return images, captions


def holdout_loss(checkpoint: str, holdout: str, *, batch_size: int) -> dict:
    """{"loss", "flops"}: mean SigLIP batch loss of `checkpoint` on the held-out pairs.

    Batches of `batch_size` in the held-out order (the last may be smaller); the loss
    of a batch is sum of its pair losses / its size, as the trainer's SigLIP loss.
    """
    net, cfg, _, _ = model_lib.model_from_checkpoint(checkpoint)
    t, b = model_lib.logit_params(net)
    image_fn, text_fn = evaluate_lib.model_encoders(net, model_lib.preprocess_contract(cfg))
    images, captions = _holdout_pairs(holdout)
    if not images:
        raise ValueError(f"{holdout}: no usable held-out examples")
    total, batches, flops = 0.0, 0, 0
    for start in range(0, len(images), batch_size):
        (img, txt), f = count_flops(lambda: (image_fn(images[start:start + batch_size]),
                                             text_fn(captions[start:start + batch_size])))
        matrix = losses.siglip_loss_matrix(image=torch.from_numpy(img),
                                           text=torch.from_numpy(txt), logit_scale=t,
                                           logit_bias=b)
        total += float(matrix.sum()) / len(img)
        batches += 1
        flops += f
    return {"loss": total / batches, "flops": flops}


def train_with_early_stopping(config: train_lib.TrainConfig, *, holdout: str,
                              eval_every: int, patience: int,
                              record_url: Optional[str] = None) -> dict:
    """Train `config` (up to total_steps) with held-out early stopping; returns the record.

    Record: {"best_step", "best_checkpoint", "best_holdout_loss", "stopped_at_step",
    "stopped_early", "history": [{"step", "holdout_loss"}], "training_flops" (trained
    steps), "holdout_flops", "flops" (their sum: the ledger's reference training)}.
    """
    if eval_every < 1 or patience < 1:
        raise ValueError("eval_every and patience must be >= 1")
    record_url = record_url or formats.join_url(config.output, "early_stopping.json")
    params = {"eval_every": eval_every, "patience": patience, "holdout": holdout,
              "run": config.run_fields()}
    record = formats.read_json(record_url) if formats.exists(record_url) else None
    if record is not None and record.get("params") != params:
        raise ValueError(f"{record_url} records another early-stopping run; pick another "
                         "output")
    record = record or {"params": params, "history": [], "holdout_flops": 0, "done": False}
    while not record["done"]:
        history = record["history"]
        step = history[-1]["step"] if history else 0
        stop = min(step + eval_every, config.total_steps)
        result = train_lib.train(dataclasses.replace(config, stop_at_step=stop, resume=True))
        measured = holdout_loss(result.checkpoint, holdout, batch_size=config.batch_size)
        history.append({"step": stop, "holdout_loss": measured["loss"],
                        "checkpoint": result.checkpoint})
        record["holdout_flops"] += measured["flops"]
        record["training_flops"] = result.flops
        best = min(history, key=lambda h: (h["holdout_loss"], h["step"]))
        since_best = sum(1 for h in history if h["step"] > best["step"])
        record.update(best_step=best["step"], best_checkpoint=best["checkpoint"],
                      best_holdout_loss=best["holdout_loss"], stopped_at_step=stop,
                      stopped_early=since_best >= patience and stop < config.total_steps,
                      done=since_best >= patience or stop >= config.total_steps)
        record["flops"] = record["training_flops"] + record["holdout_flops"]
        log.info("step %d: held-out loss %.4f (best %.4f at step %d)", stop,
                 measured["loss"], best["holdout_loss"], best["step"])
        formats.write_json_atomic(record_url, record)
    return record
