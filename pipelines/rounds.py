"""`jest-curate rounds --config FILE --output DIR`: score → select → train, round by round.

Semantics (also in the README):
- The reference model embeds the pool once per scoring settings (cached by the embed
  stage in a directory named by `scoring_key`, which runs may share and never
  overwrite); the pool the rounds draw from is every uid the reference could embed.
- A *pass* is a permutation of that pool by blake2b(seed, "pass", p, uid), cut into
  super-batches of S. Round r takes the next K·S examples (K = steps per round) of the
  current pass; when fewer than K super-batches remain, a new pass starts with a new
  permutation (the leftover is reported, never silently reused).
- Rescoring every k rounds: at a rescoring round r0 the learner checkpoint of step r0·K
  embeds the slices of rounds r0..r0+k-1; those rounds record which checkpoint scored
  them and how many steps stale it was. The learner's step-0 checkpoint scores round 0.
- Every method, uniform included, runs the same select stage on the same slices, so data
  consumption and code paths are equal; uniform simply needs no learner scoring.
- clip-score (DataComp) first keeps the keep_fraction of the pool with the highest
  reference image-text similarity (DIR/clip_score/), then draws its passes from that
  kept set with S = b and selects uniformly: one reference pass, no learner scoring.
- Multi-resolution training (train_low_res_size/fraction) reaches the learner's trainer;
  with score_image_size at the low setting this is Flexi-JEST.
- The trainer continues one run across rounds (schedule over rounds·K steps, optimizer
  state kept): round r trains steps r·K .. (r+1)·K on round r's curated shards.
- Each round has its own directory with a marker per stage; a killed run resumes at the
  first unfinished stage without redoing or duplicating work.

Layout: DIR/config.json, DIR/reference_embeddings/<scoring key>/ (unless shared: then
under the shared root, one directory per scoring settings), DIR/learner/
(checkpoints), DIR/learner_embeddings/rNNNN/, DIR/rounds/rNNNN/{slice.parquet,
scored_by.json, selection/, eval.json, round.json}, DIR/summary.json.
"""
import argparse
import dataclasses
import functools
import json
import logging
import posixpath
from typing import Optional

import numpy as np

from jest_core import filtering
from jest_curate import formats
from jest_curate import hashing
from jest_curate import ledger as ledger_lib
from jest_curate import progress as progress_lib
from pipelines import embed as embed_stage
from pipelines import options
from pipelines import select as select_stage
from training import evaluate as evaluate_lib
from training import main as trainer_cli
from training import model as model_lib
from training import train as train_lib

__all__ = ["plan_slices", "scoring_key", "check_selection", "select_method", "clip_score_keep",
           "run_rounds", "run"]

log = logging.getLogger(__name__)


def _round_dir(output: str, r: int) -> str:
    return formats.join_url(output, "rounds", f"r{r:04d}")


def pool_uids(embeddings_dir: Optional[str], corpus: str) -> list:
    """The uids rounds may draw from: those the reference embedded (else the corpus)."""
    root = embeddings_dir or corpus
    uids = []
    for shard in formats.list_shards(root):
        uids += formats.read_shard(shard, columns=["uid"]).column("uid").to_pylist()
    return sorted(uids)


def plan_slices(uids: list, *, seed: int, super_batch_size: int, steps_per_round: int,
                rounds: int) -> list:
    """[(pass, uids of the round's slice)] for every round; see the module docstring."""
    S, K = super_batch_size, steps_per_round
    rounds_per_pass = (len(uids) // S) // K
    if rounds_per_pass < 1:
        raise ValueError(f"the pool has {len(uids)} usable examples, fewer than one round "
                         f"needs (steps per round {K} x super-batch {S} = {K * S})")
    slices, order = [], None
    for r in range(rounds):
        p, j = divmod(r, rounds_per_pass)
        if j == 0:
            order = sorted(uids, key=lambda u: (hashing.hash_u64("pass", seed, p, u), u))
        slices.append((p, order[j * K * S:(j + 1) * K * S]))
    return slices


@dataclasses.dataclass(frozen=True)
class _Paths:
    output: str
    reference_embeddings: str

    def learner(self) -> str:
        return formats.join_url(self.output, "learner")

    def learner_embeddings(self, r0: int) -> str:
        return formats.join_url(self.output, "learner_embeddings", f"r{r0:04d}")


def scoring_key(cfg: formats.RunConfig) -> str:
    """Names the scoring settings, so each has its own reference embeddings in a shared root."""
    size = f"{cfg.score_image_size}px" if cfg.score_image_size else "native"
    return f"{size}-pd{cfg.score_patch_dropout:g}-{cfg.score_precision}"


def _embed(cfg: formats.RunConfig, *, model: str, checkpoint: str, output: str,
           uids: Optional[str], beam_args, overwrite: bool) -> dict:
    argv = ["--corpus", cfg.pool, "--model", model, "--checkpoint", checkpoint,
            "--output", output, "--precision", cfg.score_precision,
            "--patch-dropout", str(cfg.score_patch_dropout)]
    if overwrite:
        argv.append("--overwrite")
    if cfg.score_image_size:
        argv += ["--image-size", str(cfg.score_image_size)]
    if uids:
        argv += ["--uids", uids]
    embed_stage.run(argv + list(beam_args))
    card = formats.read_model_card(output)
    stats = formats.read_json(formats.join_url(output, "stats.json"))
    return {"flops_per_example": card.flops_per_example, "embedded": stats["embedded"]}


def check_selection(stats: dict, r: int, selection: str) -> dict:
    """A round's select stats, unless it lacked reference embeddings for some examples.

    The pool is exactly the uids the reference embedded, so a missing reference
    embedding means the cache changed under the run (e.g. replaced by another model);
    training on what is left would quietly use another data budget. (Learner dead
    letters can be legitimate: the learner's embed may reject an example.)
    """
    missing = (stats.get("dead_letters_by_reason") or {}).get("missing_reference_embedding")
    if missing:
        raise RuntimeError(
            f"round {r}: select dead-lettered {missing} examples for missing reference "
            f"embeddings: the reference embeddings no longer cover the round's slice. "
            f"Remove {selection} to redo the selection once they do")
    return stats


def _train_config(cfg: formats.RunConfig, paths: _Paths, data: Optional[str],
                  stop: int) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
        model=cfg.learner_model, output=paths.learner(), data=data,
        data_format="curated", batch_size=cfg.batch_size,
        total_steps=cfg.rounds * cfg.steps_per_round, stop_at_step=stop,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, seed=hashing.derive_seed(cfg.seed, "learner_init"),
        precision=cfg.train_precision, low_res_size=cfg.train_low_res_size,
        low_res_fraction=cfg.train_low_res_fraction, resume=True, tensorboard=False)


def select_method(method: str) -> str:
    """The select stage's method for a run's: clip-score trains uniformly on its kept set."""
    return "uniform" if method == "clip-score" else method


def clip_score_keep(cfg: formats.RunConfig, reference_embeddings: str, output: str) -> dict:
    """DataComp's CLIP-score filter over the whole pool, once per run (resumable).

    Keeps the keep_fraction of the reference-embedded pool with the highest image-text
    cosine similarity (ties by uid); writes OUTPUT/clip_score/{kept.parquet, stats.json}
    and returns the stats with the kept uids (sorted) under "uids".
    """
    root = formats.join_url(output, "clip_score")
    stats_url, kept_url = (formats.join_url(root, n) for n in ("stats.json", "kept.parquet"))
    if not formats.exists(stats_url):
        digest = formats.read_model_card(reference_embeddings).model_digest
        uids, sims, dim = [], [], 0
        for shard in formats.list_shards(reference_embeddings):
            emb = formats.read_embeddings_shard(shard, expect_model_digest=digest)
            uids += emb.uids
            sims.append(filtering.clip_scores(image=emb.image, text=emb.text))
            dim = emb.image.shape[1]
        sims = np.concatenate(sims) if sims else np.zeros(0, np.float32)
        kept = filtering.top_fraction(sims, fraction=cfg.keep_fraction, keys=uids)
        formats.write_uids(kept_url, sorted(uids[i] for i in kept))
        formats.write_json_atomic(stats_url, {
            "pool": len(uids), "kept": len(kept), "keep_fraction": cfg.keep_fraction,
            "threshold": float(sims[kept].min()) if len(kept) else None,
            "mean_similarity_kept": float(sims[kept].mean()) if len(kept) else None,
            "mean_similarity_pool": float(sims.mean()) if len(sims) else None,
            "flops": filtering.clip_score_flops(len(uids), dim)})
    stats = formats.read_json(stats_url)
    return {**stats, "uids": formats.read_uids(kept_url).to_pylist()}


@functools.lru_cache(maxsize=2)
def eval_data(url: str, max_examples: Optional[int]) -> evaluate_lib.EvalData:
    """Decoded once per process; the first `max_examples` of each split when capped."""
    data = evaluate_lib.load_eval_data(url)
    if max_examples is None:
        return data

    def head(split):
        if split is None:
            return None
        return dataclasses.replace(split, images=split.images[:max_examples],
                                   captions=split.captions[:max_examples],
                                   labels=split.labels[:max_examples])
    return dataclasses.replace(data, zeroshot=head(data.zeroshot),
                               retrieval=head(data.retrieval))


def evaluate_checkpoint(checkpoint: str, data: evaluate_lib.EvalData) -> dict:
    net, model_cfg, _, _ = model_lib.model_from_checkpoint(checkpoint)
    contract = model_lib.preprocess_contract(model_cfg)
    image_fn, text_fn = evaluate_lib.model_encoders(net, contract)
    return evaluate_lib.evaluate_dir(image_fn, text_fn, data)


def _evaluate(cfg: formats.RunConfig, checkpoint: str) -> dict:
    return evaluate_checkpoint(checkpoint, eval_data(cfg.eval_data, cfg.eval_max_examples))


def _run_round(cfg, paths, r, slices, beam_args) -> dict:
    K, b = cfg.steps_per_round, cfg.batch_size
    rdir = _round_dir(paths.output, r)
    done_url = formats.join_url(rdir, "round.json")
    if formats.exists(done_url):
        return formats.read_json(done_url)
    pass_index, slice_uids = slices[r]
    slice_url = formats.join_url(rdir, "slice.parquet")
    if not formats.exists(slice_url):
        formats.write_uids(slice_url, slice_uids)

    scored_by, learner_dir, scoring = None, None, {"flops": 0, "examples": 0}
    method = select_method(cfg.method)
    needs = select_stage.needed_embeddings(method)
    if "learner" in needs:
        r0 = r - r % cfg.rescore_every
        learner_dir = paths.learner_embeddings(r0)
        checkpoint = train_lib.checkpoint_url(paths.learner(), r0 * K)
        if r == r0:  # A rescoring round scores the slices of the next k rounds at once.
            union_url = learner_dir + "_uids.parquet"
            rounds_scored = range(r0, min(r0 + cfg.rescore_every, cfg.rounds))
            formats.write_uids(union_url, {u for q in rounds_scored for u in slices[q][1]})
            # This run's own directory: a rerun replaces what an interrupted one left.
            emb = _embed(cfg, model=cfg.learner_model, checkpoint=checkpoint,
                         output=learner_dir, uids=union_url, beam_args=beam_args,
                         overwrite=True)
            scoring = {"flops": emb["flops_per_example"] * emb["embedded"],
                       "examples": emb["embedded"]}
        scored_by = {"checkpoint": posixpath.relpath(checkpoint, paths.output),
                     "checkpoint_step": r0 * K,
                     "round_start_step": r * K, "staleness_steps": (r - r0) * K}
        formats.write_json_atomic(formats.join_url(rdir, "scored_by.json"), scored_by)

    selection = formats.join_url(rdir, "selection")
    if not formats.exists(formats.join_url(selection, "_SUCCESS")):
        select_stage.run_select(select_stage.SelectConfig(
            corpus=cfg.pool, output=selection, batch_size=b,
            super_batch_size=cfg.resolved_super_batch_size, method=method,
            chunks=cfg.chunks, temperature=cfg.temperature, seed=cfg.seed, round=r,
            uids=slice_url,
            reference=paths.reference_embeddings if "reference" in needs else None,
            learner=learner_dir), beam_args)
    select_stats = check_selection(formats.read_json(formats.join_url(selection, "stats.json")),
                                   r, selection)

    trained = trainer_cli.train_with_processes(
        _train_config(cfg, paths, formats.join_url(selection, "shards"), (r + 1) * K),
        cfg.train_processes)
    record = {"round": r, "pass": pass_index, "slice_examples": len(slice_uids),
              "scored_by": scored_by, "scoring_flops": scoring["flops"],
              "scored_examples": scoring["examples"], "step": trained.step,
              "checkpoint": trained.checkpoint, "examples_seen": trained.examples_seen,
              "train_flops": trained.flops,
              "selection_flops": select_stats.get("selection_flops", 0),
              "selection": {k: select_stats.get(k) for k in (
                  "selected", "rejected", "carried", "dead_lettered",
                  "mean_batch_score_selected", "mean_batch_score_random")}}
    if cfg.eval_data and ((r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1):
        eval_url = formats.join_url(rdir, "eval.json")
        if not formats.exists(eval_url):
            formats.write_json_atomic(eval_url, _evaluate(cfg, trained.checkpoint))
        record["eval"] = formats.read_json(eval_url)
    formats.write_json_atomic(done_url, record)
    return record


def run_rounds(cfg: formats.RunConfig, output: str, *, reference_embeddings: Optional[str] = None,
               beam_args=(), progress: Optional[progress_lib.RoundProgress] = None) -> dict:
    """Run (or resume) every round of `cfg` under `output`; returns summary.json's contents.

    `progress` is called with each round's record as it finishes.
    """
    if cfg.pool is None:
        raise ValueError("the run config needs `pool` (the canonical corpus to curate)")
    config_url = formats.join_url(output, "config.json")
    if formats.exists(config_url):
        if formats.RunConfig.from_json(formats.read_json(config_url)) != cfg:
            raise ValueError(f"{output} holds a run with another config; pick another output")
    else:
        formats.write_json_atomic(config_url, cfg.to_json())
    # Runs may share the reference embeddings (a cache keyed by scoring settings); never
    # overwritten, so a run with another reference model is refused, not served its scores.
    paths = _Paths(output, formats.join_url(
        reference_embeddings or formats.join_url(output, "reference_embeddings"),
        scoring_key(cfg)))
    reference_flops, per_example = 0, {}
    if cfg.method != "hard-learner":
        if cfg.reference_checkpoint is None:
            raise ValueError(f"method {cfg.method} needs reference_checkpoint (and every method "
                             "draws its pool from the reference embeddings)")
        ref = _embed(cfg, model=cfg.reference_model, checkpoint=cfg.reference_checkpoint,
                     output=paths.reference_embeddings, uids=None, beam_args=beam_args,
                     overwrite=False)
        if cfg.method != "uniform":  # Uniform consults no scores.
            reference_flops = ref["flops_per_example"] * ref["embedded"]
            per_example["reference_scoring"] = ref["flops_per_example"]
    uids = pool_uids(None if cfg.method == "hard-learner" else paths.reference_embeddings,
                     cfg.pool)
    filter_flops = 0
    if cfg.method == "clip-score":  # The pool is what the filter keeps.
        kept = clip_score_keep(cfg, paths.reference_embeddings, output)
        uids, filter_flops = kept["uids"], kept["flops"]
    slices = plan_slices(uids, seed=hashing.derive_seed(cfg.seed, "passes"),
                         super_batch_size=cfg.resolved_super_batch_size,
                         steps_per_round=cfg.steps_per_round, rounds=cfg.rounds)
    if not formats.exists(train_lib.checkpoint_url(paths.learner(), 0)):
        trainer_cli.train_with_processes(  # Step 0 scores round 0.
            _train_config(cfg, paths, None, 0), cfg.train_processes)
    records = []
    for r in range(cfg.rounds):
        resumed = formats.exists(formats.join_url(_round_dir(output, r), "round.json"))
        records.append(_run_round(cfg, paths, r, slices, beam_args))
        if progress is not None:
            progress(records[-1], resumed=resumed)
    # Methods that consult the reference pay for training it (jest_curate/ledger.py).
    reference_training = ledger_lib.reference_training_flops(
        cfg.reference_checkpoint, cfg.reference_training_flops) if reference_flops else 0
    scored = [rec for rec in records if rec["scored_examples"]]
    if scored:  # Measured by the embed stage at the run's scoring settings.
        per_example["learner_scoring"] = scored[0]["scoring_flops"] / scored[0]["scored_examples"]
    if records[-1]["examples_seen"]:  # Mean over every step (mixed resolutions included).
        per_example["training"] = records[-1]["train_flops"] / records[-1]["examples_seen"]
    summary = {"name": cfg.name, "method": cfg.method, "seed": cfg.seed,
               "flops_per_example": per_example,
               "reference_training_flops": reference_training,
               "reference_scoring_flops": reference_flops,
               "pool_examples": len(uids), "filter_flops": filter_flops,
               "passes": records[-1]["pass"] + 1, "rounds": []}
    ledgers = ledger_lib.run_ledger(records, reference_training=reference_training,
                                    reference_scoring=reference_flops, filter_flops=filter_flops)
    scoring = reference_flops + filter_flops
    for rec, ledger in zip(records, ledgers):
        scoring += rec["scoring_flops"]
        summary["rounds"].append({
            "round": rec["round"], "examples_seen": rec["examples_seen"],
            "train_flops": rec["train_flops"], "scoring_flops_cumulative": scoring,
            "total_flops": ledger["all_in"], "total_flops_amortised": ledger["amortised"],
            "ledger": ledger,
            "staleness_steps": (rec["scored_by"] or {}).get("staleness_steps"),
            "eval": rec.get("eval")})
    formats.write_json_atomic(formats.join_url(output, "summary.json"), summary)
    return summary


def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jest-curate rounds", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config JSON (see configs/)")
    p.add_argument("--output", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--reference-embeddings", help="shared root for reference embeddings (one directory per scoring settings)")
    progress_lib.add_verbose_flag(p)
    args, beam_args = options.parse_stage_args(p, argv)
    progress_lib.configure_logging(formats.join_url(args.output, "log.txt"), verbose=args.verbose)
    cfg = formats.read_run_config(args.config)
    summary = run_rounds(cfg, args.output, reference_embeddings=args.reference_embeddings,
                         beam_args=beam_args, progress=progress_lib.RoundProgress(cfg.rounds))
    print(json.dumps(summary["rounds"][-1]))
    return 0
