"""Online selection: the trainer scores and selects every step's super-batch itself.

JEST as the paper runs it: at step t the learner's *current* weights embed the S
candidates of super-batch first + t (t counted from the round's first step) of a pass
layout (`pipelines/layout.py`), `training.selection.select_super_batch` picks b of them
with the same jest_core call, seed and manifest rows as the round job, and the step
trains on them. The offline round job scores a whole round with the weights of its
first step; comparing the two measures what that staleness costs.

    source = OnlineSource(cfg, batch_size=b, model=trainer.model, ...)
    for batch in source.batches(start):   # lazily: step t selects after step t-1 trained
        trainer.train_step(batch.examples, local=True)

Cost: S learner forward passes per step (at the scoring settings: resolution, patch
dropout, precision) on top of the b forward + backward passes of training, plus the
selection's matmuls; both are counted (`SelectedBatch.scoring_flops`, `.selection_flops`).

Data parallel (N processes): rank k selects b/N of rows [k S/N, (k+1) S/N) of every
super-batch (its own seed, `selection.selection_seed(..., part=(k, N))`) and trains on
them; the global batch is the union. S and b must split over the processes.

Outputs (cfg.output, the round's selection directory):
    online_steps/<super_batch>-r<rank>.parquet   each step's rows, written atomically
                                                 before the step trains (so a kill
                                                 loses none; a resumed step rewrites
                                                 its file with the same bytes)
    manifest/<NNNNN>.parquet + _index.json       at the round's end: the steps' rows, one
                                                 shard per candidate shard as the round
                                                 job writes them (no tars: nothing is
                                                 materialised), then online_steps/ goes
    stats.json, _SUCCESS                         the round job's keys (+ "mode", "world_size")

Selection at step t is a pure function of the weights at step t and the seed, so a run
resumed from a checkpoint re-selects exactly what the interrupted one did.
No Beam here.
"""
import dataclasses
import json
import logging
import time
from typing import Iterator, List, Optional

import numpy as np
import pyarrow as pa
import torch

from jest_core import sampler
from jest_curate import formats
from training import data as data_lib
from training import scoring
from training import selection
from training.distributed import World
from training.flops import StepFlops

__all__ = ["OnlineConfig", "SelectedBatch", "OnlineSource", "source_url", "commit_round",
           "round_complete"]

log = logging.getLogger(__name__)

_WRITER = "jest-curate train (online selection)"
_STEPS = "online_steps"
_REPORT_KEY = "jest.online_step"


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Select super-batches [first, stop) of the pass at `layout` with the live weights."""
    layout: str  # A pass layout (jest-curate layout).
    first_super_batch: int
    stop_super_batch: int
    output: str  # The round's selection directory (manifest/, stats.json, _SUCCESS).
    round: int = 0
    method: str = "jest"
    chunks: int = 16
    temperature: float = 1.0
    seed: int = 0  # The selection seed (the round job's `seed`), not the trainer's.
    image_size: Optional[int] = None  # Learner scoring resolution (None: trained).
    patch_dropout: float = 0.0  # Scoring-time patch dropout.
    precision: str = "fp32"  # Of the scoring forward: fp32 | bf16 autocast.
    compute_dtype: str = "fp32"  # Of the selection matmuls.
    scoring_batch_size: int = scoring.FORWARD_ROWS  # Candidates per learner forward pass.

    def __post_init__(self):
        if not 0 <= self.first_super_batch < self.stop_super_batch:
            raise ValueError(f"online super-batches need 0 <= first < stop, got "
                             f"[{self.first_super_batch}, {self.stop_super_batch})")
        self.settings(1)  # Method, dtype.
        if self.precision not in scoring.PRECISIONS:
            raise ValueError(f"scoring precision must be one of {scoring.PRECISIONS}, "
                             f"got {self.precision!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {self.patch_dropout}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"scoring image size must be >= 1, got {self.image_size}")
        if self.chunks < 1 or self.scoring_batch_size < 1 or self.temperature <= 0:
            raise ValueError("chunks and scoring_batch_size must be >= 1, temperature > 0")

    @property
    def super_batches(self) -> int:
        return self.stop_super_batch - self.first_super_batch

    @property
    def needs(self) -> tuple:
        return sampler.needed_embeddings(self.method)

    def settings(self, batch_size: int) -> selection.SelectionSettings:
        """Selection settings for `batch_size` examples (one rank's share of b)."""
        return selection.SelectionSettings(
            method=self.method, batch_size=batch_size, chunks=self.chunks,
            temperature=self.temperature, seed=self.seed, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class SelectedBatch:
    """One step's selection on this process: its examples and what choosing them cost."""
    examples: List[data_lib.Example]  # This rank's b/N, in selection order.
    super_batch: int
    scoring_flops: float  # This rank's learner forward passes over its candidates.
    selection_flops: int


def source_url(cfg: OnlineConfig) -> str:
    """What the trainer records as its data position's source (a round's slice)."""
    return f"{cfg.layout.rstrip('/')}?super_batches={cfg.first_super_batch}:" \
           f"{cfg.stop_super_batch}"


def _step_id(super_batch: int, rank: int) -> str:
    return f"{super_batch:08d}-r{rank:03d}"


class _SuperBatches:
    """Reads super-batches (and their reference rows) of a layout, one shard in memory.

    Consecutive steps read consecutive super-batches, so the shard holding the current
    one is read (and its sha256 checked) once; `read_bytes` counts what was read.
    """

    def __init__(self, layout: formats.Layout, with_reference: bool):
        self.layout, self.with_reference = layout, with_reference
        self.reference_card = layout.reference_card() if with_reference else None
        self._shard, self._data, self._side = None, None, None
        self.read_bytes = 0

    def _load(self, super_batch: int) -> formats.CandidateShard:
        if self._shard is None or not (self._shard.first_super_batch <= super_batch
                                       < self._shard.stop_super_batch):
            (shard,) = self.layout.shards_between(super_batch, super_batch + 1)
            self._data = formats.read_shard_bytes(shard.info)
            self.read_bytes += len(self._data)
            self._side = None
            if self.with_reference:
                self._side = formats.read_shard_bytes(shard.reference)
                self.read_bytes += len(self._side)
            self._shard = shard
        return self._shard

    def read(self, super_batch: int):
        """(CANDIDATE_SCHEMA rows, reference Embeddings or None) of one super-batch."""
        shard = self._load(super_batch)
        group = [super_batch - shard.first_super_batch]
        rows = formats.read_row_groups(self._data, group)
        if not self.with_reference:
            return rows, None
        emb = formats.read_embeddings_shard(
            shard.reference, expect_model_digest=self.reference_card.model_digest,
            table=formats.read_row_groups(self._side, group))
        if emb.uids != rows.column("uid").to_pylist():
            raise formats.FormatError(f"{shard.reference.url}: rows do not match candidate "
                                      f"shard {shard.info.url}")
        return rows, emb


class OnlineSource:
    """The trainer's data source in online mode (same interface as CuratedShards).

    `batches(start)` yields a `SelectedBatch` per step, super-batch first + start first;
    each is selected when the trainer asks for it, i.e. with the weights `model` holds
    after the previous step.
    """

    def __init__(self, cfg: OnlineConfig, *, batch_size: int, model: torch.nn.Module,
                 model_name: str, model_cfg: dict, world: Optional[World] = None):
        self.cfg, self.world = cfg, world or World()
        self.url = source_url(cfg)
        self.batch_size = batch_size  # b, the global batch.
        self.num_batches = cfg.super_batches  # One per step.
        self.layout = formats.read_layout(cfg.layout)
        S, n = self.layout.spec.super_batch_size, self.world.size
        self.super_batch_size = S
        if cfg.stop_super_batch > self.layout.super_batches:
            raise ValueError(f"{cfg.layout}: super-batches [{cfg.first_super_batch}, "
                             f"{cfg.stop_super_batch}) are outside the pass's "
                             f"{self.layout.super_batches}")
        if S % n or batch_size % n:
            raise ValueError(f"online selection splits every super-batch of {S} and batch of "
                             f"{batch_size} over {n} processes: both must be divisible by {n}")
        if not 1 <= batch_size <= S:
            raise ValueError(f"need 1 <= batch size ({batch_size}) <= super-batch size ({S})")
        self.part = (self.world.rank, n)
        self.settings = cfg.settings(batch_size // n)
        if cfg.method in sampler.JOINT_METHODS:
            sampler.chunk_sizes(batch_size // n, cfg.chunks)  # Raises if chunks > b/N.
        if "reference" in cfg.needs and not self.layout.spec.reference:
            raise ValueError(f"method {cfg.method!r} needs reference embeddings; the layout "
                             f"{cfg.layout} has none")
        self._model = model
        self._reader = _SuperBatches(self.layout, "reference" in cfg.needs)
        self._scorer = None
        if "learner" in cfg.needs:  # On the training model's device.
            self._scorer = scoring.LiveScorer(
                model_name, model_cfg, model.state_dict(), image_size=cfg.image_size,
                patch_dropout=cfg.patch_dropout, precision=cfg.precision,
                device=str(next(model.parameters()).device))
        self._flops = StepFlops()

    @property
    def flops_per_example(self) -> float:
        """Learner scoring FLOPs per candidate (0 when the method needs no learner)."""
        return self._scorer.flops_per_example if self._scorer else 0.0

    def batches(self, start: int = 0) -> Iterator[SelectedBatch]:
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start batch {start} outside [0, {self.num_batches}]")
        if start == 0:  # The round starts (again): what an earlier attempt left goes.
            if self.world.is_main:
                for stale in ("_SUCCESS", "stats.json", "manifest", _STEPS, formats.METRICS_FILE):
                    formats.remove_tree(formats.join_url(self.cfg.output, stale))
            self.world.barrier()
        for i in range(start, self.num_batches):
            yield self.select(self.cfg.first_super_batch + i)

    def select(self, super_batch: int) -> SelectedBatch:
        """Score this rank's part of `super_batch` with the current weights and select it;
        its manifest rows are on disk before this returns."""
        started, cpu = time.perf_counter(), time.process_time()
        read_before = self._reader.read_bytes
        rows, reference = self._reader.read(super_batch)
        k, n = self.part
        per = rows.num_rows // n
        if rows.num_rows != self.super_batch_size:
            raise formats.FormatError(f"{self.cfg.layout}: super-batch {super_batch} has "
                                      f"{rows.num_rows} rows, not {self.super_batch_size}")
        at = slice(k * per, (k + 1) * per)
        rows = rows.slice(k * per, per)
        valid, dead = np.ones(per, bool), np.full(per, None, object)
        pairs, scored = {}, 0
        if reference is not None:
            pairs["reference"] = (reference.image[at], reference.text[at],
                                  self._reader.reference_card)
        if self._scorer is not None:
            scorer = self._scorer.refresh(self._model.state_dict())
            image, text, failed = scoring.embed_rows(
                scorer, rows.column("image").to_pylist(), rows.column("caption").to_pylist(),
                rows.column("uid").to_pylist(), batch_size=self.cfg.scoring_batch_size)
            for i, reason in failed:
                valid[i], dead[i] = False, f"dead_letter:{reason}"
            pairs["learner"] = (image, text, scorer.card)
            scored = int(valid.sum())
        picked = selection.select_super_batch(
            rows, round_=self.cfg.round, valid=valid, dead=dead, pairs=pairs,
            settings=self.settings, flops=self._flops, part=self.part)
        scoring_flops = scored * self.flops_per_example
        report = {"super_batch": super_batch, "rank": k, "candidates": per, "scored": scored,
                  "scoring_flops": scoring_flops, "selection_flops": picked.flops,
                  "batch_scores": picked.batch_scores,
                  "read_bytes": self._reader.read_bytes - read_before,
                  "work_seconds": time.perf_counter() - started,
                  "work_cpu_seconds": time.process_time() - cpu}
        formats.write_shard(formats.join_url(self.cfg.output, _STEPS),
                            _step_id(super_batch, k), picked.manifest,
                            schema=formats.ROUND_MANIFEST_SCHEMA,
                            metadata={_REPORT_KEY: json.dumps(report, sort_keys=True)})
        # Every process learns whether any came up short, so none waits in a collective.
        short = self.world.sum([float(len(picked.chosen) < self.settings.batch_size)])[0]
        if short:
            raise data_lib.DataError(
                f"super-batch {super_batch}: too few scorable candidates for a batch of "
                f"{self.batch_size} (see {self.cfg.output}/{_STEPS})")
        chosen = rows.take(pa.array(picked.chosen)).select(["uid", "image", "caption"])
        examples = [data_lib.Example(uid=r["uid"], image=r["image"], caption=r["caption"])
                    for r in chosen.to_pylist()]
        return SelectedBatch(examples=examples, super_batch=super_batch,
                             scoring_flops=scoring_flops, selection_flops=picked.flops)


# --------------------------------------------------------------------------- #
# The round's end: merge the steps' rows into the round's manifest and stats
# --------------------------------------------------------------------------- #

def round_complete(cfg: OnlineConfig, data_position: dict) -> bool:
    """True when a trainer's data position says every step of the round has trained."""
    return (data_position.get("url") == source_url(cfg)
            and data_position.get("batches") == cfg.super_batches)


def _read_step(cfg: OnlineConfig, super_batch: int, rank: int):
    url = formats.join_url(cfg.output, _STEPS, f"{_step_id(super_batch, rank)}.parquet")
    try:
        table = formats.read_shard(url, schema=formats.ROUND_MANIFEST_SCHEMA)
    except FileNotFoundError:
        step = super_batch - cfg.first_super_batch
        raise FileNotFoundError(f"{url}: missing: rank {rank} has no selection for step "
                                f"{step} of round {cfg.round}") from None
    report = json.loads(formats.shard_metadata(url)[_REPORT_KEY])
    return table.replace_schema_metadata(None), report


def _stats(cfg: OnlineConfig, layout: formats.Layout, manifest: pa.Table, reports: list, *,
           batch_size: int, world_size: int, written_bytes: int) -> dict:
    """stats.json: the round job's keys, from the steps' rows and reports."""
    reasons = manifest.column("reason").to_pylist()
    counts = {r: reasons.count(r) for r in set(reasons)}
    dead = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("dead_letter:")}
    S, span = layout.spec.super_batch_size, cfg.super_batches
    total = {key: sum(r[key] for r in reports) for key in (
        "candidates", "scored", "scoring_flops", "selection_flops", "read_bytes",
        "work_seconds", "work_cpu_seconds")}
    stats = {
        "round": cfg.round, "pass": layout.spec.pass_index,
        "first_super_batch": cfg.first_super_batch, "stop_super_batch": cfg.stop_super_batch,
        "super_batches": span, "seen": manifest.num_rows,
        "selected": counts.get("selected", 0), "rejected": counts.get("rejected", 0),
        "carried": 0, "dead_lettered": sum(dead.values()), "dead_letters_by_reason": dead,
        "batch_size": batch_size, "super_batch_size": S,
        "effective_filter_ratio": sampler.effective_filter_ratio(batch_size, S),
        "method": cfg.method, "seed": cfg.seed, "chunks": cfg.chunks,
        "temperature": cfg.temperature, "selection_flops": total["selection_flops"],
        "scored": total["scored"], "scoring_flops": total["scoring_flops"],
        "written_bytes": written_bytes, "mode": "online", "world_size": world_size}
    batch_scores = [s for r in reports for s in r["batch_scores"]]
    if batch_scores:
        sel, rnd = np.array(sorted(batch_scores)).T
        stats["mean_batch_score_selected"] = float(sel.mean())
        stats["mean_batch_score_random"] = float(rnd.mean())
    accounted = stats["selected"] + stats["rejected"] + stats["dead_lettered"]
    if accounted != span * S or total["candidates"] != accounted \
            or stats["selected"] != span * batch_size:
        raise RuntimeError(f"round {cfg.round}: accounting failed: {accounted} decisions "
                           f"({stats['selected']} selected) for {span} super-batches of {S} "
                           f"(b = {batch_size})")
    return stats


def commit_round(cfg: OnlineConfig, *, batch_size: int, world_size: int) -> dict:
    """Merge every step's rows (all ranks) into the round's manifest and stats; returns the
    stats. Idempotent: a committed round (its _SUCCESS) is read back, not rewritten."""
    success = formats.join_url(cfg.output, "_SUCCESS")
    if formats.exists(success):
        return formats.read_json(formats.join_url(cfg.output, "stats.json"))
    layout = formats.read_layout(cfg.layout)
    infos, tables, reports, shas = [], [], [], {}
    root = formats.join_url(cfg.output, "manifest")
    for i, shard in enumerate(layout.shards_between(cfg.first_super_batch,
                                                    cfg.stop_super_batch)):
        parts = []
        for sb in range(max(cfg.first_super_batch, shard.first_super_batch),
                        min(cfg.stop_super_batch, shard.stop_super_batch)):
            for rank in range(world_size):
                table, report = _read_step(cfg, sb, rank)
                parts.append(table)
                reports.append(report)
        table = pa.concat_tables(parts)
        info = formats.write_shard(root, f"{i:05d}", table, schema=formats.ROUND_MANIFEST_SCHEMA)
        infos.append(info)
        tables.append(table)
        shas[f"manifest/{info.shard_id}.parquet"] = info.sha256
    manifest = pa.concat_tables(tables)
    stats = _stats(cfg, layout, manifest, reports, batch_size=batch_size,
                   world_size=world_size, written_bytes=manifest.nbytes)
    formats.write_index(root, infos, writer=_WRITER)
    shas["manifest/_index.json"] = formats.sha256_file(formats.join_url(root, formats.INDEX))
    formats.write_json_atomic(formats.join_url(cfg.output, "stats.json"), stats)
    shas["stats.json"] = formats.sha256_file(formats.join_url(cfg.output, "stats.json"))
    # What was read (more after a resume) and the seconds it took: beside the outputs.
    formats.write_json_atomic(formats.join_url(cfg.output, formats.METRICS_FILE), {
        k: sum(r[k] for r in reports) for k in ("read_bytes", "work_seconds",
                                                "work_cpu_seconds")})
    formats.write_json_atomic(success, {"files": dict(sorted(shas.items()))})
    formats.remove_tree(formats.join_url(cfg.output, _STEPS))
    log.info("round %d (online): %d selected of %d candidates in %d steps", cfg.round,
             stats["selected"], stats["seen"], cfg.super_batches)
    return stats
