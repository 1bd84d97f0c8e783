"""`jest-curate rounds --config FILE --output DIR`: score → select → train, round by round.

Semantics (also in the README):
- The reference model embeds the pool once per scoring settings (cached by the embed
  stage in a directory named by `scoring_key`, which runs may share and never
  overwrite); the pool the rounds draw from is every uid the reference could embed.
- A *pass* is a permutation of that pool by blake2b(seed, "pass", p, uid), cut into
  super-batches of S and written once as candidate shards by the layout job
  (pipelines/layout.py; its pool-mod-S remainder is carried). Round r takes the next K
  super-batches of the current pass; when fewer than K remain, a new pass starts (the
  unused super-batches are reported, never silently reused).
- Rescoring every k rounds: one round job (pipelines/round_job.py) per period embeds the
  candidates of rounds r0..r0+k-1 with the learner checkpoint of step r0·K and selects
  them; those rounds record which checkpoint scored them and how stale it was. The
  learner's step-0 checkpoint scores round 0.
- Every method, uniform included, runs the same round job on the same super-batches, so
  data consumption and code paths are equal; uniform simply needs no learner scoring.
- clip-score (DataComp) keeps the keep_fraction of the pool with the highest reference
  image-text similarity (an exact rule computed by pipelines/clip_score.py, applied by
  the layout), then selects uniformly with S = b: one reference pass, no learner scoring.
- Multi-resolution training (train_low_res_size/fraction) reaches the learner's trainer;
  with score_image_size at the low setting this is Flexi-JEST.
- The trainer continues one run across rounds (schedule over rounds·K steps, optimizer
  state kept): round r trains steps r·K .. (r+1)·K on round r's curated shards.
- Each round has its own directory with a marker per stage; a killed run resumes at the
  first unfinished stage without redoing or duplicating work.

The launcher holds no per-example state: planning is arithmetic on super-batch ranges
(each pass's layout.json says how many it has); every per-example cost is a Beam job's.

Layout: DIR/config.json, DIR/reference_embeddings/<scoring key>/ (unless shared), DIR/
layouts/<layout key>/pNNNN/ (unless shared), DIR/clip_score/rule.json, DIR/passes/
pNNNN.json (the pass's layout, pinned), DIR/learner/ (checkpoints), DIR/rounds/rNNNN/
{slice.json, scored_by.json, selection/, eval.json, round.json}, DIR/summary.json.
"""
import argparse
import dataclasses
import functools
import json
import logging
import posixpath
import shlex
from typing import Optional

from jest_core import sampler
from jest_curate import formats
from jest_curate import hashing
from jest_curate import ledger as ledger_lib
from jest_curate import progress as progress_lib
from pipelines import clip_score as clip_score_stage
from pipelines import embed as embed_stage
from pipelines import layout as layout_stage
from pipelines import options
from pipelines import round_job
from training import evaluate as evaluate_lib
from training import main as trainer_cli
from training import model as model_lib
from training import online as online_lib
from training import scoring
from training import train as train_lib

__all__ = ["plan_round", "scoring_key", "select_method", "run_rounds", "run"]

log = logging.getLogger(__name__)


def _round_dir(output: str, r: int) -> str:
    return formats.join_url(output, "rounds", f"r{r:04d}")


def plan_round(r: int, *, super_batches: int, steps_per_round: int) -> tuple:
    """(pass, first super-batch, stop) of round r, for passes of `super_batches`."""
    K = steps_per_round
    rounds_per_pass = super_batches // K
    if rounds_per_pass < 1:
        raise ValueError(f"the pool has {super_batches} super-batches, fewer than one round "
                         f"needs ({K}, one per step)")
    p, j = divmod(r, rounds_per_pass)
    return p, j * K, (j + 1) * K


@dataclasses.dataclass(frozen=True)
class _Paths:
    output: str
    reference_embeddings: str
    layouts: str  # Root of the pass layouts (shared by runs of one pool and seed).

    def learner(self) -> str:
        return formats.join_url(self.output, "learner")


def scoring_key(cfg: formats.RunConfig) -> str:
    """Names the scoring settings, so each has its own reference embeddings in a shared root."""
    size = f"{cfg.score_image_size}px" if cfg.score_image_size else "native"
    return f"{size}-pd{cfg.score_patch_dropout:g}-{cfg.score_precision}"


def _embed(cfg: formats.RunConfig, *, model: str, checkpoint: str, output: str,
           beam_args, overwrite: bool, device: str) -> dict:
    argv = ["--corpus", cfg.pool, "--model", model, "--checkpoint", checkpoint,
            "--output", output, "--precision", cfg.score_precision, "--device", device,
            "--patch-dropout", str(cfg.score_patch_dropout)]
    if overwrite:
        argv.append("--overwrite")
    if cfg.score_image_size:
        argv += ["--image-size", str(cfg.score_image_size)]
    embed_stage.run(argv + list(beam_args))
    card = formats.read_model_card(output)
    stats = formats.read_json(formats.join_url(output, "stats.json"))
    return {"flops_per_example": card.flops_per_example, "embedded": stats["embedded"]}


def _reference(cfg: formats.RunConfig, paths: _Paths, beam_args, device: str) -> dict:
    """The reference's embeddings of the pool, embedded once (cached by the embed stage).

    A resumed run whose pool and reference are what it recorded skips even the embed
    stage's cache check (which reads every embeddings shard to verify its bytes): a
    restart costs O(shards), not O(pool).
    """
    marker = formats.join_url(paths.output, "reference.json")
    want = {"embeddings": paths.reference_embeddings, "checkpoint": cfg.reference_checkpoint,
            "checkpoint_sha256": formats.sha256_file(cfg.reference_checkpoint),
            "pool_version": layout_stage.pool_version(cfg.pool)}
    if formats.exists(marker) and formats.exists(
            formats.join_url(paths.reference_embeddings, formats.INDEX)):
        recorded = formats.read_json(marker)
        if {k: recorded.get(k) for k in want} == want:
            return {k: recorded[k] for k in ("flops_per_example", "embedded")}
    ref = _embed(cfg, model=cfg.reference_model, checkpoint=cfg.reference_checkpoint,
                 output=paths.reference_embeddings, beam_args=beam_args, overwrite=False,
                 device=device)
    if not formats.exists(marker):  # What the run started from (a change is refused later).
        formats.write_json_atomic(marker, {**want, **ref})
    return ref


def _train_config(cfg: formats.RunConfig, paths: _Paths, data: Optional[str],
                  stop: int, online: Optional[online_lib.OnlineConfig] = None
                  ) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(online=online,
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


def round_aligned_shard_rows(super_batch_size: int, steps_per_round: int, most: int) -> int:
    """Rows per candidate shard: G super-batches, G the largest divisor of K with G·S <=
    `most` (at least 1), so every round reads whole shards of its own and nothing more."""
    G = max([g for g in range(1, steps_per_round + 1)
             if steps_per_round % g == 0 and g * super_batch_size <= most] or [1])
    return G * super_batch_size


def layout_key(spec: formats.LayoutSpec) -> str:
    """Names a pass layout's family (everything but the pass), readable and unique."""
    fields = dataclasses.asdict(dataclasses.replace(spec, pass_index=0))
    digest = hashing.blake2b_fields(json.dumps(fields, sort_keys=True), digest_size=6).hex()
    return f"S{spec.super_batch_size}-seed{spec.seed % 10**6}-{digest}"


def _what_selects(spec: dict) -> dict:
    """A layout spec less how super-batches are grouped into files (which changes no
    super-batch, no selection and no training order)."""
    return {k: v for k, v in spec.items() if k != "shard_super_batches"}


class _Passes:
    """Each pass's layout, made when a round first needs it and pinned in DIR/passes/.

    A resumed run whose pool, reference embeddings or filter changed is refused instead
    of continuing on another pool.
    """

    def __init__(self, cfg: formats.RunConfig, paths: _Paths, keep: Optional[dict], beam_args):
        self._cfg, self._paths, self._keep, self._beam_args = cfg, paths, keep, beam_args
        self._layouts = {}

    def __call__(self, p: int) -> formats.Layout:
        if p not in self._layouts:
            cfg = self._cfg
            spec = layout_stage.layout_spec(
                pool=cfg.pool, seed=hashing.derive_seed(cfg.seed, "passes"), pass_index=p,
                reference=None if cfg.method == "hard-learner" else
                self._paths.reference_embeddings,
                super_batch_size=cfg.resolved_super_batch_size,
                shard_rows=round_aligned_shard_rows(
                    cfg.resolved_super_batch_size, cfg.steps_per_round,
                    cfg.candidate_shard_rows), keep=self._keep)
            pinned_url = formats.join_url(self._paths.output, "passes", f"p{p:04d}.json")
            root = formats.join_url(self._paths.layouts, layout_key(spec), f"p{p:04d}")
            if formats.exists(pinned_url):
                pinned = formats.read_json(pinned_url)
                if _what_selects(pinned["spec"]) != _what_selects(
                        json.loads(json.dumps(dataclasses.asdict(spec)))):
                    raise ValueError(
                        f"pass {p} of this run was laid out from another pool, reference or "
                        f"filter ({pinned_url}); the inputs changed under the run: use a new "
                        f"output directory")
            layout = layout_stage.run_layout(spec, root, self._beam_args)
            if not formats.exists(pinned_url):
                formats.write_json_atomic(pinned_url, {
                    "layout": _relative(root, self._paths.output),
                    "spec": dataclasses.asdict(spec), "counts": layout.counts})
            self._layouts[p] = layout
        return self._layouts[p]


@dataclasses.dataclass(frozen=True)
class _ScoringJob:
    """Where the scoring jobs run: their device and their extra Beam options."""
    device: str
    beam_args: tuple


def _relative(url: str, root: str) -> str:
    """`url` relative to `root` when inside it (records stay equal when a run moves)."""
    prefix = root.rstrip("/") + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


def _learner_spec(cfg: formats.RunConfig, checkpoint: str, device: str) -> scoring.ScoringSpec:
    return scoring.ScoringSpec(model=cfg.learner_model, checkpoint=checkpoint,
                               image_size=cfg.score_image_size,
                               patch_dropout=cfg.score_patch_dropout,
                               precision=cfg.score_precision, device=device)


def _select_period(cfg, paths, passes, r0: int, beam_args, scoring_job) -> None:
    """One round job for the rounds r0..r0+k-1 that have no committed selection yet."""
    K = cfg.steps_per_round
    method = select_method(cfg.method)
    learner = None
    if "learner" in sampler.needed_embeddings(method):
        checkpoint = train_lib.checkpoint_url(paths.learner(), r0 * K)
        learner = _learner_spec(cfg, checkpoint, scoring_job.device)
        beam_args = list(beam_args) + list(scoring_job.beam_args)
    slices = []
    for r in range(r0, min(r0 + cfg.rescore_every, cfg.rounds)):
        rdir = _round_dir(paths.output, r)
        layout, first, stop = _slice(cfg, paths, passes, r)
        if learner is not None:
            formats.write_json_atomic(formats.join_url(rdir, "scored_by.json"), {
                "checkpoint": posixpath.relpath(learner.checkpoint, paths.output),
                "checkpoint_step": r0 * K, "round_start_step": r * K,
                "staleness_steps": (r - r0) * K})
        slices.append(round_job.RoundSlice(r, layout.root, first, stop,
                                           formats.join_url(rdir, "selection")))
    round_job.run_round_job(round_job.RoundJobConfig(
        slices=tuple(slices), method=method, batch_size=cfg.batch_size,
        super_batch_size=cfg.resolved_super_batch_size, chunks=cfg.chunks,
        temperature=cfg.temperature, seed=cfg.seed, learner=learner), beam_args)


def _slice(cfg, paths, passes, r: int) -> tuple:
    """Round r's pass layout and super-batch range, recorded in its slice.json."""
    p, first, stop = plan_round(r, super_batches=passes(0).super_batches,
                                steps_per_round=cfg.steps_per_round)
    layout = passes(p)
    formats.write_json_atomic(formats.join_url(_round_dir(paths.output, r), "slice.json"), {
        "pass": p, "layout": _relative(layout.root, paths.output), "first_super_batch": first,
        "stop_super_batch": stop, "examples": (stop - first) * layout.spec.super_batch_size})
    return layout, first, stop


def _online(cfg, paths, passes, r: int) -> online_lib.OnlineConfig:
    """Round r selected by the trainer itself, step by step, with its live weights."""
    layout, first, stop = _slice(cfg, paths, passes, r)
    formats.write_json_atomic(formats.join_url(_round_dir(paths.output, r), "scored_by.json"), {
        "checkpoint": None, "mode": "online", "round_start_step": r * cfg.steps_per_round,
        "staleness_steps": 0})
    return online_lib.OnlineConfig(
        layout=layout.root, first_super_batch=first, stop_super_batch=stop,
        output=formats.join_url(_round_dir(paths.output, r), "selection"), round=r,
        method=select_method(cfg.method), chunks=cfg.chunks, temperature=cfg.temperature,
        seed=cfg.seed, image_size=cfg.score_image_size, patch_dropout=cfg.score_patch_dropout,
        precision=cfg.score_precision)


def _run_round(cfg, paths, passes, r, beam_args, scoring_job) -> dict:
    K = cfg.steps_per_round
    rdir = _round_dir(paths.output, r)
    done_url = formats.join_url(rdir, "round.json")
    if formats.exists(done_url):
        return formats.read_json(done_url)
    selection = formats.join_url(rdir, "selection")
    if cfg.selection_mode == "online":
        trained = trainer_cli.train_with_processes(
            _train_config(cfg, paths, None, (r + 1) * K, _online(cfg, paths, passes, r)),
            cfg.train_processes)
    else:
        if not formats.exists(formats.join_url(selection, "_SUCCESS")):
            _select_period(cfg, paths, passes, r - r % cfg.rescore_every, beam_args,
                           scoring_job)
        trained = trainer_cli.train_with_processes(
            _train_config(cfg, paths, formats.join_url(selection, "shards"), (r + 1) * K),
            cfg.train_processes)
    stats = formats.read_json(formats.join_url(selection, "stats.json"))
    scored_url = formats.join_url(rdir, "scored_by.json")
    scored_by = formats.read_json(scored_url) if formats.exists(scored_url) else None
    record = {"round": r, "pass": stats["pass"], "slice_examples": stats["seen"],
              "scored_by": scored_by, "scoring_flops": stats["scoring_flops"],
              "scored_examples": stats["scored"], "step": trained.step,
              "checkpoint": trained.checkpoint, "examples_seen": trained.examples_seen,
              "train_flops": trained.flops, "selection_flops": stats["selection_flops"],
              "selection": {k: stats.get(k) for k in (
                  "selected", "rejected", "carried", "dead_lettered",
                  "mean_batch_score_selected", "mean_batch_score_random")}}
    if cfg.eval_data and ((r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1):
        eval_url = formats.join_url(rdir, "eval.json")
        if not formats.exists(eval_url):
            formats.write_json_atomic(eval_url, _evaluate(cfg, trained.checkpoint))
        record["eval"] = formats.read_json(eval_url)
    formats.write_json_atomic(done_url, record)
    return record


def pass_accounting(layout: formats.Layout, rounds_in_pass: int, steps_per_round: int) -> dict:
    """How a pass's pool was used: curated by rounds, unused at the pass's end, carried."""
    S, K = layout.spec.super_batch_size, steps_per_round
    counts = layout.counts
    return {"pass": layout.spec.pass_index, "pool": counts["pool"],
            "excluded_by_reason": counts["excluded_by_reason"], "rounds": rounds_in_pass,
            "in_rounds": rounds_in_pass * K * S,
            "unused_super_batches": layout.super_batches - rounds_in_pass * K,
            "carried": counts["carried"]}


def run_rounds(cfg: formats.RunConfig, output: str, *, reference_embeddings: Optional[str] = None,
               layouts: Optional[str] = None, beam_args=(), score_device: str = "cpu",
               score_beam_args=(), progress: Optional[progress_lib.RoundProgress] = None
               ) -> dict:
    """Run (or resume) every round of `cfg` under `output`; returns summary.json's contents.

    `reference_embeddings` and `layouts` are shared roots runs may reuse (keyed by what
    determines them). `beam_args` go to every Beam job; `score_beam_args` (e.g. GPU
    worker options) only to the scoring jobs (the reference embed, and the round jobs of
    methods that score with the learner), which score on `score_device`. `progress` is
    called with each round's record as it finishes.
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
        scoring_key(cfg)), layouts or formats.join_url(output, "layouts"))
    reference_flops, per_example = 0, {}
    if cfg.method != "hard-learner":
        if cfg.reference_checkpoint is None:
            raise ValueError(f"method {cfg.method} needs reference_checkpoint (and every method "
                             "draws its pool from the reference embeddings)")
        ref = _reference(cfg, paths, list(beam_args) + list(score_beam_args), score_device)
        if cfg.method != "uniform":  # Uniform consults no scores.
            reference_flops = ref["flops_per_example"] * ref["embedded"]
            per_example["reference_scoring"] = ref["flops_per_example"]
    keep, filter_flops = None, 0
    if cfg.method == "clip-score":  # The pool is what the filter keeps.
        keep = clip_score_stage.run_clip_score_rule(
            paths.reference_embeddings, formats.join_url(output, "clip_score"),
            cfg.keep_fraction, beam_args)
        filter_flops = keep["flops"]
    passes = _Passes(cfg, paths, keep, beam_args)
    plan_round(cfg.rounds - 1, super_batches=passes(0).super_batches,
               steps_per_round=cfg.steps_per_round)  # A pool too small fails here.
    if not formats.exists(train_lib.checkpoint_url(paths.learner(), 0)):
        trainer_cli.train_with_processes(  # Step 0 scores round 0.
            _train_config(cfg, paths, None, 0), cfg.train_processes)
    records = []
    for r in range(cfg.rounds):
        resumed = formats.exists(formats.join_url(_round_dir(output, r), "round.json"))
        records.append(_run_round(cfg, paths, passes, r, beam_args,
                                  _ScoringJob(score_device, tuple(score_beam_args))))
        if progress is not None:
            progress(records[-1], resumed=resumed)
    # Methods that consult the reference pay for training it (jest_curate/ledger.py).
    reference_training = ledger_lib.reference_training_flops(
        cfg.reference_checkpoint, cfg.reference_training_flops) if reference_flops else 0
    scored = [rec for rec in records if rec["scored_examples"]]
    if scored:  # Measured by the round job at the run's scoring settings.
        per_example["learner_scoring"] = scored[0]["scoring_flops"] / scored[0]["scored_examples"]
    if records[-1]["examples_seen"]:  # Mean over every step (mixed resolutions included).
        per_example["training"] = records[-1]["train_flops"] / records[-1]["examples_seen"]
    per_pass = {}
    for rec in records:
        per_pass[rec["pass"]] = per_pass.get(rec["pass"], 0) + 1
    summary = {"name": cfg.name, "method": cfg.method, "seed": cfg.seed,
               "flops_per_example": per_example,
               "reference_training_flops": reference_training,
               "reference_scoring_flops": reference_flops,
               "pool_examples": passes(0).counts["pool"], "filter_flops": filter_flops,
               "passes": records[-1]["pass"] + 1,
               "pass_accounting": [pass_accounting(passes(p), n, cfg.steps_per_round)
                                   for p, n in sorted(per_pass.items())],
               "rounds": []}
    ledgers = ledger_lib.run_ledger(records, reference_training=reference_training,
                                    reference_scoring=reference_flops, filter_flops=filter_flops)
    scoring_total = reference_flops + filter_flops
    for rec, ledger in zip(records, ledgers):
        scoring_total += rec["scoring_flops"]
        summary["rounds"].append({
            "round": rec["round"], "examples_seen": rec["examples_seen"],
            "train_flops": rec["train_flops"], "scoring_flops_cumulative": scoring_total,
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
    p.add_argument("--layouts", help="shared root for the passes' candidate layouts (one "
                                     "directory per pool, seed and S)")
    p.add_argument("--score-device", choices=scoring.DEVICES, default="cpu",
                   help="where the scoring jobs' workers score (cuda on GPU workers)")
    p.add_argument("--score-beam-args", default="",
                   help="Beam options for the scoring jobs only (reference embed; round jobs "
                        "that score with the learner), one shell-quoted string, e.g. GPU "
                        "worker options; the other options go to every job")
    progress_lib.add_verbose_flag(p)
    args, beam_args = options.parse_stage_args(p, argv)
    progress_lib.configure_logging(formats.join_url(args.output, "log.txt"), verbose=args.verbose)
    cfg = formats.read_run_config(args.config)
    summary = run_rounds(cfg, args.output, reference_embeddings=args.reference_embeddings,
                         layouts=args.layouts, beam_args=beam_args,
                         score_device=args.score_device,
                         score_beam_args=shlex.split(args.score_beam_args),
                         progress=progress_lib.RoundProgress(cfg.rounds))
    print(json.dumps(summary["rounds"][-1]))
    return 0
