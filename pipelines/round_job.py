"""`jest-curate round`: score, select and write the rounds of one rescoring period.

    period ──PlanWork──► (round, candidate shard, its super-batches in the round),
                         planned on a worker from the pass's layout index
           ──SelectShards──► per work item: read the candidate shard (+ its reference
                         sidecar), embed it with the learner checkpoint (loaded once per
                         worker), select every super-batch with jest_core, write one
                         curated tar (selection order) and its manifest shard
           ──CommitRounds──► per round: sizes.json, manifest index, stats.json, _SUCCESS

Map-only: no image or embedding crosses a shuffle (only small per-item reports do). A
round is a contiguous range of a pass's super-batches (pipelines/layout.py), so it reads
its candidate shards and nothing else: its cost is O(the round's slice), whatever the
pool. Every method, uniform included, runs this job. Output files are hashed as they
are written; _SUCCESS (written last) lists every file of a round with its sha256.

Outputs per round (OUTPUT/…): shards/{00000..}.tar + shards/sizes.json (open_clip_train
reads them), manifest/{00000..}.parquet (formats.ROUND_MANIFEST_SCHEMA: one row per
candidate, the tar's name) + manifest/_index.json, stats.json, _SUCCESS; and metrics.json
(bytes read, the work's wall and CPU seconds: measured, so the one file that differs
between runs).
"""
import argparse
import dataclasses
import json
import logging
import time
from typing import Any, Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from jest_core import sampler
from jest_curate import formats
from jest_curate import hashing
from pipelines import faults, options
from training import scoring
from training import selection
from training.flops import StepFlops

__all__ = ["RoundSlice", "RoundJobConfig", "SelectRounds", "run_round_job", "run"]

_NAMESPACE = "jest_curate.round"
_WRITER = "jest-curate round"
METRICS = formats.METRICS_FILE  # Measured seconds of the round's work (not reproducible).


@dataclasses.dataclass(frozen=True)
class RoundSlice:
    """Round `round` selects from super-batches [first, stop) of the pass at `layout`."""
    round: int
    layout: str
    first_super_batch: int
    stop_super_batch: int
    output: str


@dataclasses.dataclass(frozen=True)
class RoundJobConfig:
    slices: tuple  # RoundSlice, one per round of the period.
    method: str
    batch_size: int  # b
    super_batch_size: int  # S (the layout's)
    chunks: int = 16
    temperature: float = 1.0
    seed: int = 0
    learner: Optional[scoring.ScoringSpec] = None  # The checkpoint that scores the period.
    compute_dtype: str = "fp32"
    scoring_batch_size: int = scoring.FORWARD_ROWS  # Examples per learner forward pass.

    def __post_init__(self):
        needs = sampler.needed_embeddings(self.method)
        if "learner" in needs and self.learner is None:
            raise ValueError(f"method {self.method!r} needs a learner checkpoint")
        if not 1 <= self.batch_size <= self.super_batch_size:
            raise ValueError(f"need 1 <= batch size ({self.batch_size}) <= super-batch size "
                             f"({self.super_batch_size})")
        if self.compute_dtype not in ("fp32", "bf16"):
            raise ValueError(f"compute dtype must be fp32 or bf16, got {self.compute_dtype}")
        rounds = [s.round for s in self.slices]
        if not rounds or len(set(rounds)) != len(rounds):
            raise ValueError(f"a period needs distinct rounds, got {rounds}")

    @property
    def needs(self) -> tuple:
        return sampler.needed_embeddings(self.method)

    @property
    def settings(self) -> selection.SelectionSettings:
        return selection.SelectionSettings(
            method=self.method, batch_size=self.batch_size, chunks=self.chunks,
            temperature=self.temperature, seed=self.seed, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class _WorkItem:
    slice: RoundSlice
    tar_index: int
    shard: formats.CandidateShard
    first: int  # Super-batches [first, stop) of the shard that belong to the round.
    stop: int


def _tar_name(index: int) -> str:
    return f"{index:05d}.tar"


class _PlanWork(beam.DoFn):
    """A round's slice → one work item per candidate shard it touches (layout index read
    on the worker)."""

    def __init__(self, cfg: RoundJobConfig):
        self._cfg = cfg

    def process(self, piece: RoundSlice) -> Iterable[Any]:
        layout = formats.read_layout(piece.layout)
        if layout.spec.super_batch_size != self._cfg.super_batch_size:
            raise ValueError(f"{piece.layout}: super-batches of {layout.spec.super_batch_size}, "
                             f"the job selects from {self._cfg.super_batch_size}")
        if "reference" in self._cfg.needs and not layout.spec.reference:
            raise ValueError(f"method {self._cfg.method!r} needs reference embeddings; the "
                             f"layout {piece.layout} has none")
        first, stop = piece.first_super_batch, piece.stop_super_batch
        for i, shard in enumerate(layout.shards_between(first, stop)):
            yield _WorkItem(piece, i, shard, max(first, shard.first_super_batch),
                            min(stop, shard.stop_super_batch))


class _SelectShard(beam.DoFn):
    """One work item → its curated tar and manifest shard; yields (round, report)."""

    def __init__(self, cfg: RoundJobConfig, learner_card: Optional[formats.ModelCard]):
        self._cfg, self._learner_card = cfg, learner_card
        self._shared = shared.Shared()

    def setup(self):
        spec, card = self._cfg.learner, self._learner_card
        self._scorer = None
        if card is not None:
            if spec.num_threads:
                torch.set_num_threads(spec.num_threads)
            self._scorer = self._shared.acquire(
                lambda: scoring.scorer_from_card(card, checkpoint=spec.checkpoint,
                                                 device=spec.device),
                tag=f"{card.model_digest}/{spec.device}")
        self._reference_cards = {}
        self._flops = StepFlops()  # Selection FLOPs per shape, measured once.

    def _reference_card(self, layout: str) -> formats.ModelCard:
        if layout not in self._reference_cards:
            self._reference_cards[layout] = formats.read_model_card(
                formats.join_url(layout, "reference"))
        return self._reference_cards[layout]

    def process(self, item: _WorkItem) -> Iterable[Any]:
        cfg, piece = self._cfg, item.slice
        started, cpu = time.perf_counter(), time.process_time()
        faults.maybe_fail("round.select_shard", (piece.round, item.tar_index))
        groups = range(item.first - item.shard.first_super_batch,
                       item.stop - item.shard.first_super_batch)
        data = formats.read_shard_bytes(item.shard.info)
        rows = formats.read_row_groups(data, groups)
        read_bytes = len(data)
        pairs = {}
        if "reference" in cfg.needs:
            side = formats.read_shard_bytes(item.shard.reference)
            read_bytes += len(side)
            card = self._reference_card(piece.layout)
            emb = formats.read_embeddings_shard(
                item.shard.reference, expect_model_digest=card.model_digest,
                table=formats.read_row_groups(side, groups))
            if emb.uids != rows.column("uid").to_pylist():
                raise formats.FormatError(f"{item.shard.reference.url}: rows do not match "
                                          f"candidate shard {item.shard.info.url}")
            pairs["reference"] = (emb.image, emb.text, card)
        valid = np.ones(rows.num_rows, bool)
        dead = np.full(rows.num_rows, None, object)
        if "learner" in cfg.needs:
            image, text, failed = self._embed(rows)
            for i, reason in failed:
                valid[i], dead[i] = False, f"dead_letter:{reason}"
            pairs["learner"] = (image, text, self._learner_card)
        S = cfg.super_batch_size
        manifests, blobs, batch_scores, flops = [], [], [], 0
        for j in range(item.stop - item.first):
            at = slice(j * S, (j + 1) * S)
            table, chosen, scored, f = self._select(piece.round, rows.slice(j * S, S),
                                                    valid[at], dead[at],
                                                    {k: (v[0][at], v[1][at], v[2])
                                                     for k, v in pairs.items()})
            manifests.append(table)
            blobs += self._blobs(rows.slice(j * S, S), chosen, table)
            batch_scores += scored
            flops += f
        name = _tar_name(item.tar_index)
        tar = b"".join(blobs) + formats.TAR_END
        url = formats.join_url(piece.output, "shards", name)
        faults.maybe_fail("round.write_tar", (piece.round, item.tar_index),
                          partial_write=(url, tar))
        formats.write_bytes_atomic(url, tar)
        manifest = pa.concat_tables(manifests)
        info = formats.write_shard(formats.join_url(piece.output, "manifest"), name[:-4],
                                   manifest, schema=formats.ROUND_MANIFEST_SCHEMA)
        reasons = manifest.column("reason").to_pylist()
        beam.metrics.Metrics.counter(_NAMESPACE, "candidates").inc(rows.num_rows)
        yield piece.round, {
            "sizes": {name: len(blobs)}, "manifests": [info],
            "sha256": {f"shards/{name}": hashing.sha256_bytes(tar),
                       f"manifest/{info.shard_id}.parquet": info.sha256},
            "reasons": {r: reasons.count(r) for r in set(reasons)},
            "candidates": rows.num_rows, "super_batches": item.stop - item.first,
            "batch_scores": batch_scores, "selection_flops": flops,
            "scored": int(valid.sum()) if "learner" in cfg.needs else 0,
            "read_bytes": read_bytes, "written_bytes": len(tar) + manifest.nbytes,
            "work_seconds": time.perf_counter() - started,
            "work_cpu_seconds": time.process_time() - cpu}

    def _embed(self, rows: pa.Table):
        """Learner embeddings of every row ([n, d] fp16; failures' rows are zero)."""
        return scoring.embed_rows(self._scorer, rows.column("image").to_pylist(),
                                  rows.column("caption").to_pylist(),
                                  rows.column("uid").to_pylist(),
                                  batch_size=self._cfg.scoring_batch_size)

    def _select(self, round_: int, rows: pa.Table, valid: np.ndarray, dead: np.ndarray,
                pairs: dict):
        """One super-batch → (manifest table, chosen candidate indices in selection order,
        batch scores, selection FLOPs); training.selection, as the trainer's online mode."""
        picked = selection.select_super_batch(rows, round_=round_, valid=valid, dead=dead,
                                              pairs=pairs, settings=self._cfg.settings,
                                              flops=self._flops)
        return picked.manifest, picked.chosen, picked.batch_scores, picked.flops

    def _blobs(self, rows: pa.Table, chosen: np.ndarray, manifest: pa.Table) -> list:
        """The chosen candidates' tar bytes, in selection order."""
        if not len(chosen):
            return []
        picked = rows.take(pa.array(chosen)).to_pylist()
        decided = manifest.take(pa.array(chosen)).to_pylist()
        blobs = []
        for img, rec in zip(picked, decided):
            meta = {k: rec[k] for k in ("uid", "super_batch", "chunk", "position", "score",
                                        "learner_loss", "reference_loss", "round", "pass")}
            meta.update(method=self._cfg.method, source=img["source"],
                        source_location=img["source_location"], url=img["url"],
                        license=img["license"])
            blobs.append(formats.encode_wds_sample(
                uid=img["uid"], image=img["image"], image_format=img["image_format"],
                caption=img["caption"], metadata=meta))
        return blobs


def _merge_reports(reports) -> dict:
    merged = {"sizes": {}, "manifests": [], "sha256": {}, "reasons": {}, "batch_scores": []}
    for r in reports:
        for key in ("sizes", "sha256"):
            merged[key].update(r[key])
        merged["manifests"] += r["manifests"]
        merged["batch_scores"] += r["batch_scores"]
        for k, v in r["reasons"].items():
            merged["reasons"][k] = merged["reasons"].get(k, 0) + v
        for key in ("candidates", "super_batches", "selection_flops", "scored", "read_bytes",
                    "written_bytes", "work_seconds", "work_cpu_seconds"):
            merged[key] = merged.get(key, 0) + r[key]
    return merged


class _CommitRound(beam.DoFn):
    def __init__(self, cfg: RoundJobConfig, learner_card: Optional[formats.ModelCard]):
        self._cfg = cfg
        self._slices = {s.round: s for s in cfg.slices}
        self._scoring_flops = learner_card.flops_per_example if learner_card else 0

    def process(self, element) -> Iterable[Any]:
        r, reports = element
        cfg, piece = self._cfg, self._slices[r]
        report = _merge_reports(reports)
        reasons = report["reasons"]
        dead = {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("dead_letter:")}
        span = piece.stop_super_batch - piece.first_super_batch
        stats = {
            "round": r, "pass": formats.read_layout(piece.layout).spec.pass_index,
            "first_super_batch": piece.first_super_batch,
            "stop_super_batch": piece.stop_super_batch, "super_batches": span,
            "seen": report["candidates"], "selected": reasons.get("selected", 0),
            "rejected": reasons.get("rejected", 0), "carried": 0,
            "dead_lettered": sum(dead.values()), "dead_letters_by_reason": dead,
            "batch_size": cfg.batch_size, "super_batch_size": cfg.super_batch_size,
            "effective_filter_ratio": sampler.effective_filter_ratio(cfg.batch_size,
                                                                     cfg.super_batch_size),
            "method": cfg.method, "seed": cfg.seed, "chunks": cfg.chunks,
            "temperature": cfg.temperature, "selection_flops": report["selection_flops"],
            "scored": report["scored"],
            "scoring_flops": report["scored"] * (self._scoring_flops or 0),
            "written_bytes": report["written_bytes"]}
        if report["batch_scores"]:
            sel, rnd = np.array(sorted(report["batch_scores"])).T
            stats["mean_batch_score_selected"] = float(sel.mean())
            stats["mean_batch_score_random"] = float(rnd.mean())
        accounted = stats["selected"] + stats["rejected"] + stats["dead_lettered"]
        if report["super_batches"] != span or accounted != span * cfg.super_batch_size \
                or report["candidates"] != accounted:
            raise RuntimeError(f"round {r}: accounting failed: {accounted} decisions for "
                               f"{span} super-batches of {cfg.super_batch_size}")
        out = piece.output
        sizes = dict(sorted(report["sizes"].items()))
        shas = dict(report["sha256"])
        for name, doc in (("shards/sizes.json", sizes), ("stats.json", stats)):
            formats.write_json_atomic(formats.join_url(out, name), doc)
            shas[name] = formats.sha256_file(formats.join_url(out, name))  # A small file.
        manifest = formats.join_url(out, "manifest")
        formats.write_index(manifest, report["manifests"], writer=_WRITER)
        shas["manifest/_index.json"] = formats.sha256_file(formats.join_url(manifest,
                                                                            formats.INDEX))
        # What the work measured (seconds, bytes read) varies: beside the outputs.
        formats.write_json_atomic(formats.join_url(out, METRICS), {
            k: report[k] for k in ("read_bytes", "work_seconds", "work_cpu_seconds")})
        # _SUCCESS is the round's index: every file it holds, with its sha256.
        formats.write_json_atomic(formats.join_url(out, "_SUCCESS"),
                                  {"files": dict(sorted(shas.items()))})
        yield stats


class SelectRounds(beam.PTransform):
    """The round job: a period's slices of candidate shards → curated rounds."""

    def __init__(self, cfg: RoundJobConfig, learner_card: Optional[formats.ModelCard] = None):
        super().__init__()
        self._cfg, self._card = cfg, learner_card

    def expand(self, pbegin):
        cfg = self._cfg
        return (pbegin
                | "Slices" >> beam.Create(list(cfg.slices), reshuffle=False)
                | "PlanWork" >> beam.ParDo(_PlanWork(cfg))
                | "Spread" >> beam.Reshuffle()
                | "SelectShards" >> beam.ParDo(_SelectShard(cfg, self._card))
                | "GroupByRound" >> beam.GroupByKey()
                | "CommitRounds" >> beam.ParDo(_CommitRound(cfg, self._card)))


def learner_card(spec: Optional[scoring.ScoringSpec]) -> Optional[formats.ModelCard]:
    """The learner's card (FLOPs measured once, on the launcher); None without a learner."""
    return scoring.load_scoring_model(spec).card if spec is not None else None


def run_round_job(cfg: RoundJobConfig, beam_args=(), test_pipeline=None) -> dict:
    """Run one period's job (rounds already committed are skipped); {round: stats}
    ({} after `--dry_run=True`, which builds the job and runs nothing)."""
    todo = [s for s in cfg.slices
            if not formats.exists(formats.join_url(s.output, "_SUCCESS"))]
    if todo:
        for piece in todo:  # A rerun replaces what an interrupted one left.
            for stale in ("_SUCCESS", "shards", "manifest", "stats.json", METRICS):
                formats.remove_tree(formats.join_url(piece.output, stale))
        job = dataclasses.replace(cfg, slices=tuple(todo))
        card = learner_card(cfg.learner) if "learner" in cfg.needs else None
        pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
        with pipeline as p:
            _ = p | "SelectRounds" >> SelectRounds(job, card)
        if options.is_dry_run(beam_args):
            return {}
    return {s.round: formats.read_json(formats.join_url(s.output, "stats.json"))
            for s in cfg.slices}


def run(argv=None, test_pipeline=None) -> int:
    p = argparse.ArgumentParser(prog="jest-curate round", description=__doc__.split("\n")[0])
    p.add_argument("--layout", required=True, help="the pass's layout (jest-curate layout)")
    p.add_argument("--super-batches", required=True, help="FIRST:STOP super-batches of the pass")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--output", required=True, help="the round's selection directory")
    p.add_argument("--method", default="jest", choices=sorted(sampler.NEEDS))
    p.add_argument("--batch-size", type=int, required=True, help="b")
    p.add_argument("--chunks", type=int, default=16, help="N chunks per sub-batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learner-model", help="learner's open_clip config name or JSON file")
    p.add_argument("--learner-checkpoint", help="the checkpoint that scores this round")
    p.add_argument("--image-size", type=int, help="learner scoring resolution")
    p.add_argument("--patch-dropout", type=float, default=0.0)
    p.add_argument("--precision", choices=scoring.PRECISIONS, default="fp32")
    p.add_argument("--device", choices=scoring.DEVICES, default="cpu")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    args, beam_args = options.parse_stage_args(p, argv)
    first, stop = (int(x) for x in args.super_batches.split(":"))
    layout = formats.read_layout(args.layout)
    learner = scoring.ScoringSpec(
        model=args.learner_model, checkpoint=args.learner_checkpoint,
        image_size=args.image_size, patch_dropout=args.patch_dropout,
        precision=args.precision, device=args.device) if args.learner_model else None
    cfg = RoundJobConfig(
        slices=(RoundSlice(args.round, args.layout, first, stop, args.output),),
        method=args.method, batch_size=args.batch_size,
        super_batch_size=layout.spec.super_batch_size, chunks=args.chunks,
        temperature=args.temperature, seed=args.seed, learner=learner,
        compute_dtype=args.compute_dtype)
    stats = run_round_job(cfg, beam_args, test_pipeline).get(args.round)
    if stats is None:
        print("dry run: the job was built, nothing ran")
        return 0
    print(json.dumps({k: stats[k] for k in ("seen", "selected", "rejected", "dead_lettered")}))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(run())
