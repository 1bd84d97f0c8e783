"""`jest-curate select`: deterministic super-batches, joint selection, curated shards.

    corpus shards ──JoinEmbeddings──► rows (uid, hash, embeddings) per hash bucket
                  ──AssignSuperBatches──► exactly-S super-batches (+ carried remainder)
                  ──SelectSubBatches──► jest_core selection per super-batch
                  ──WriteCuratedShards──► WebDataset tars + sizes.json
                  ──WriteManifest──► one manifest row per corpus example, stats.json

Ranking: every uid gets h = blake2b(seed, shuffle round, uid); ranks follow (h, uid).
A hash-prefix histogram gives each bucket its global offset, so ranks are computed
bucket by bucket (each bucket holds ~16k rows whatever the corpus size) and
super_batch = rank // S. The last S-incomplete super-batch is *carried*: its examples
are not selected this round and get reason "carried"; a later round reshuffles the
whole pool, so they compete again there.

Only uids and embeddings are shuffled. Images are read where they live: each corpus
shard writes the tar bytes of its selected samples to a fragment file, and every
output tar is assembled from byte ranges of those fragments in selection order.

Outputs (OUTPUT/…): shards/{00000..}.tar + shards/sizes.json, manifest/<corpus shard>.parquet,
manifest/_index.json, stats.json, and _SUCCESS written last (the selection's index and
commit marker: every file with its sha256). The corpus's shard list is read from its
index on workers, never put into the job graph.
"""
import argparse
import dataclasses
import json
import logging
import math
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from jest_core import sampler
from jest_core import scores
from jest_curate import formats
from jest_curate import hashing
from pipelines import faults, options, tables
from training.flops import StepFlops

__all__ = ["SelectConfig", "JoinEmbeddings", "AssignSuperBatches", "SelectSubBatches",
           "WriteCuratedShards", "WriteManifest", "CurateRound", "run"]

_NAMESPACE = "jest_curate.select"
_BUCKET_TARGET_ROWS = 16384
_NEEDS = sampler.NEEDS


def needed_embeddings(method: str) -> tuple:
    """The embeddings ("reference", "learner") a method scores with."""
    return sampler.needed_embeddings(method)


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    corpus: str
    output: str
    batch_size: int  # b
    super_batch_size: int  # S
    method: str = "jest"
    chunks: int = 16  # N
    temperature: float = 1.0
    seed: int = 0
    round: int = 0
    shuffle_round: Optional[int] = None  # Permutation key; defaults to `round`.
    super_batch_range: Optional[tuple] = None  # [first, stop) super-batches to select from.
    uids: Optional[str] = None  # Parquet of the uids this round may use (a slice of the pool).
    reference: Optional[str] = None  # Embeddings directories.
    learner: Optional[str] = None
    compute_dtype: str = "fp32"
    batches_per_shard: Optional[int] = None  # Sub-batches per output tar.

    def __post_init__(self):
        if self.method not in _NEEDS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {sorted(_NEEDS)}")
        for role in _NEEDS[self.method]:
            if getattr(self, role) is None:
                raise ValueError(f"method {self.method!r} needs --{role}-embeddings")
        if not 1 <= self.batch_size <= self.super_batch_size:
            raise ValueError(f"need 1 <= batch size ({self.batch_size}) <= super-batch size "
                             f"({self.super_batch_size})")
        if self.compute_dtype not in ("fp32", "bf16"):
            raise ValueError(f"compute dtype must be fp32 or bf16, got {self.compute_dtype}")

    @property
    def permutation_round(self) -> int:
        return self.round if self.shuffle_round is None else self.shuffle_round

    @property
    def shard_batches(self) -> int:
        return self.batches_per_shard or max(1, math.ceil(4096 / self.batch_size))


def _manifest_rows(rows: dict, *, reason: str, round_: int, super_batch=None) -> pa.Table:
    n = len(rows["uid"])
    sb = super_batch if super_batch is not None else [None] * n
    return pa.table({
        "shard_id": rows["shard_id"], "row": rows["row"],
        "uid": rows["uid"].astype(str), "round": np.full(n, round_, np.int32),
        "super_batch": pa.array(sb, pa.int64()), "selected": np.zeros(n, bool),
        "reason": [reason] * n, "chunk": pa.nulls(n, pa.int32()),
        "position": pa.nulls(n, pa.int32()), "score": pa.nulls(n, pa.float32()),
        "learner_loss": pa.nulls(n, pa.float32()), "reference_loss": pa.nulls(n, pa.float32()),
    })


# ----------------------------------------------------------------------------- join

def _load_card(root: Optional[str]) -> Optional[formats.ModelCard]:
    return formats.read_model_card(root) if root else None


class _JoinShard(beam.DoFn):
    """One corpus shard → its rows with embeddings, split by hash bucket."""

    def __init__(self, cfg: SelectConfig, bucket_bits: int):
        self._cfg = cfg
        self._bits = bucket_bits
        self._shared = shared.Shared()

    def setup(self):
        self._cards = {role: _load_card(getattr(self._cfg, role)) for role in ("reference",
                                                                                "learner")}
        # Each embeddings dataset's shards by id, from its index, once per worker process.
        self._embedded = {role: tables.shards_by_id(self._shared, root)
                          for role in ("reference", "learner")
                          for root in [getattr(self._cfg, role)] if root}
        self._slice = frozenset(formats.read_uids(self._cfg.uids).to_pylist()) \
            if self._cfg.uids else None

    def process(self, shard: formats.ShardInfo):
        cfg = self._cfg
        faults.maybe_fail("select.join_shard", (cfg.round, shard.shard_id))
        uids = np.array(formats.read_shard(shard, columns=["uid"]).column("uid").to_pylist(),
                        dtype=object)
        rows = {"uid": uids, "shard_id": np.full(len(uids), shard.shard_id, dtype=object),
                "row": np.arange(len(uids), dtype=np.int64)}
        valid = np.ones(len(uids), bool)
        if self._slice is not None:
            valid = np.array([u in self._slice for u in uids], dtype=bool)
            if not valid.all():
                beam.metrics.Metrics.counter(_NAMESPACE, "outside_slice").inc(
                    int((~valid).sum()))
                yield beam.pvalue.TaggedOutput("manifest", _manifest_rows(
                    tables.take(rows, ~valid), reason="outside_slice", round_=cfg.round))
        for role in _NEEDS[cfg.method]:
            emb, found = self._embeddings(role, shard, uids)
            for name, arr in (("image", emb.image), ("text", emb.text)):
                out = np.zeros((len(uids), arr.shape[1]), np.float16)
                out[found >= 0] = arr[found[found >= 0]]
                rows[f"{role}_{name}"] = out
            missing = valid & (found < 0)
            if missing.any():
                reason = f"dead_letter:missing_{role}_embedding"
                beam.metrics.Metrics.counter(_NAMESPACE, f"dropped_missing_{role}").inc(
                    int(missing.sum()))
                yield beam.pvalue.TaggedOutput("manifest", _manifest_rows(
                    tables.take(rows, missing), reason=reason, round_=cfg.round))
            valid &= found >= 0
        rows = tables.take(rows, valid)
        rows["hash"] = np.array([hashing.hash_u64("rank", cfg.seed, cfg.permutation_round, u)
                                 for u in rows["uid"]], dtype=np.uint64)
        bucket = (rows["hash"] >> np.uint64(64 - self._bits)).astype(np.int64) \
            if self._bits else np.zeros(len(rows["uid"]), np.int64)
        beam.metrics.Metrics.counter(_NAMESPACE, "seen").inc(len(uids))
        yield beam.pvalue.TaggedOutput("counts", np.bincount(bucket, minlength=1 << self._bits))
        for b in np.unique(bucket):
            yield int(b), tables.take(rows, bucket == b)

    def _embeddings(self, role: str, shard: formats.ShardInfo, uids):
        card = self._cards[role]
        committed = self._embedded[role].by_id.get(shard.shard_id)
        if committed is None:
            empty = np.zeros((0, 1), np.float16)
            return formats.Embeddings([], empty, empty, "", ""), np.full(len(uids), -1)
        url = committed.url
        # The ShardInfo makes the read check the bytes against the index's sha256.
        emb = formats.read_embeddings_shard(committed, expect_model_digest=card.model_digest)
        if emb.corpus_shard_sha256 != shard.version:
            raise formats.FormatError(
                f"{url}: embeds another version of corpus shard {shard.shard_id} "
                f"(sha256 {emb.corpus_shard_sha256[:12]} vs {shard.version[:12]}); re-run embed")
        position = {u: i for i, u in enumerate(emb.uids)}
        return emb, np.array([position.get(u, -1) for u in uids], dtype=np.int64)


class JoinEmbeddings(beam.PTransform):
    """Corpus shards → (bucket, rows), bucket histograms ("counts"), dead letters ("manifest")."""

    def __init__(self, cfg: SelectConfig, bucket_bits: int):
        super().__init__()
        self._cfg, self._bits = cfg, bucket_bits

    def expand(self, pbegin):
        return (pbegin
                | "Corpus" >> beam.Create([self._cfg.corpus], reshuffle=False)
                | "CorpusShards" >> beam.FlatMap(formats.list_shards)  # The index, on a worker.
                | "Spread" >> beam.Reshuffle()
                | "JoinShard" >> beam.ParDo(_JoinShard(self._cfg, self._bits))
                .with_outputs("counts", "manifest", main="rows"))


# ----------------------------------------------------------------------------- super-batches

class _RankBucket(beam.DoFn):
    def __init__(self, cfg: SelectConfig):
        self._cfg = cfg

    def process(self, element, counts):
        bucket, parts = element
        cfg, S = self._cfg, self._cfg.super_batch_size
        rows = tables.concat(parts)
        order = sorted(range(len(rows["uid"])), key=lambda i: (int(rows["hash"][i]),
                                                               rows["uid"][i]))
        rows = tables.take(rows, np.array(order, dtype=np.int64))
        offset = int(counts[:bucket].sum())
        rows["rank"] = offset + np.arange(len(order), dtype=np.int64)
        super_batch = rows["rank"] // S
        full = int(counts.sum()) // S
        first, stop = cfg.super_batch_range or (0, full)
        carried = super_batch >= full
        outside = ~carried & ((super_batch < first) | (super_batch >= stop))
        for mask, reason in ((carried, "carried"), (outside, "outside_slice")):
            if mask.any():
                beam.metrics.Metrics.counter(_NAMESPACE, reason).inc(int(mask.sum()))
                yield beam.pvalue.TaggedOutput("manifest", _manifest_rows(
                    tables.take(rows, mask), reason=reason, round_=cfg.round,
                    super_batch=super_batch[mask].tolist()))
        keep = ~carried & ~outside
        for sb in np.unique(super_batch[keep]):
            yield int(sb), tables.take(rows, super_batch == sb)


class AssignSuperBatches(beam.PTransform):
    """(bucket, rows) + bucket histograms → (super_batch, rows) of exactly S examples."""

    def __init__(self, cfg: SelectConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, inputs):
        rows, counts = inputs
        histogram = counts | "Histogram" >> beam.CombineGlobally(tables.sum_arrays)
        return (rows
                | "GroupByBucket" >> beam.GroupByKey()
                | "Rank" >> beam.ParDo(_RankBucket(self._cfg),
                                       counts=beam.pvalue.AsSingleton(histogram))
                .with_outputs("manifest", main="super_batches"))


# ----------------------------------------------------------------------------- selection

def _pair(rows: dict, role: str, card: formats.ModelCard) -> scores.EmbeddingPair:
    return scores.EmbeddingPair(
        image=torch.from_numpy(rows[f"{role}_image"].astype(np.float32)),
        text=torch.from_numpy(rows[f"{role}_text"].astype(np.float32)),
        logit_scale=card.logit_scale, logit_bias=card.logit_bias)


def _nullable(values: torch.Tensor) -> pa.Array:
    v = values.float().numpy()
    return pa.array(v, pa.float32(), mask=np.isnan(v))


class _SelectSuperBatch(beam.DoFn):
    """One super-batch of exactly S → manifest rows, selected records and batch scores."""

    def __init__(self, cfg: SelectConfig):
        self._cfg = cfg

    def setup(self):
        self._cards = {role: _load_card(getattr(self._cfg, role)) for role in ("reference",
                                                                                "learner")}
        # Selection FLOPs depend on shapes only: measured once per shape, then reused.
        self._flops = StepFlops()

    def process(self, element):
        sb, parts = element
        cfg = self._cfg
        faults.maybe_fail("select.select_super_batch", (cfg.round, sb))
        rows = tables.concat(parts)
        rows = tables.take(rows, np.argsort(rows["rank"], kind="stable"))
        if len(rows["uid"]) != cfg.super_batch_size:  # An invariant of AssignSuperBatches.
            raise RuntimeError(f"super-batch {sb} has {len(rows['uid'])} examples, "
                               f"expected {cfg.super_batch_size}")
        pairs = {role: _pair(rows, role, self._cards[role]) for role in _NEEDS[cfg.method]}
        inputs = scores.ScoringInputs(learner=pairs.get("learner"),
                                      reference=pairs.get("reference"),
                                      num_examples=cfg.super_batch_size)
        generator = torch.Generator().manual_seed(
            hashing.derive_seed(cfg.seed, "select", cfg.round, int(sb)))
        shapes = tuple(tuple(p.image.shape) + tuple(p.text.shape) for p in pairs.values())
        picked, flops = self._flops.run(shapes, lambda: sampler.select(
            inputs, method=cfg.method, batch_size=cfg.batch_size, num_chunks=cfg.chunks,
            temperature=cfg.temperature, generator=generator,
            compute_dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32))
        yield beam.pvalue.TaggedOutput("batch_scores", {"selection_flops": flops})
        yield from self._manifest(sb, rows, picked)
        yield from self._batch_scores(inputs, picked, generator)
        beam.metrics.Metrics.counter(_NAMESPACE, "selected").inc(cfg.batch_size)
        beam.metrics.Metrics.counter(_NAMESPACE, "rejected").inc(
            cfg.super_batch_size - cfg.batch_size)
        beam.metrics.Metrics.counter(_NAMESPACE, "super_batches").inc()

    def _manifest(self, sb, rows, picked: sampler.Selection):
        cfg, S = self._cfg, self._cfg.super_batch_size
        index = picked.indices.numpy()
        selected = np.zeros(S, bool)
        selected[index] = True
        chunk, position, score = (np.full(S, -1, np.int32), np.full(S, -1, np.int32),
                                  np.full(S, np.nan, np.float32))
        chunk[index] = picked.chunk.numpy()
        position[index] = np.arange(len(index), dtype=np.int32)
        score[index] = picked.score.numpy()
        learner_loss = _nullable(picked.learner_loss_diag)
        reference_loss = _nullable(picked.reference_loss_diag)
        table = pa.table({
            "shard_id": rows["shard_id"], "row": rows["row"], "uid": rows["uid"].astype(str),
            "round": np.full(S, cfg.round, np.int32), "super_batch": np.full(S, sb, np.int64),
            "selected": selected,
            "reason": np.where(selected, "selected", "rejected").tolist(),
            "chunk": pa.array(chunk, mask=~selected), "position": pa.array(position, mask=~selected),
            "score": pa.array(score, mask=~selected),
            "learner_loss": learner_loss, "reference_loss": reference_loss})
        yield beam.pvalue.TaggedOutput("manifest", table)
        chosen = table.take(pa.array(index)).drop_columns(["round", "selected", "reason"])
        yield beam.pvalue.TaggedOutput("selected", chosen)

    def _batch_scores(self, inputs, picked, generator):
        kind = sampler.score_kind(self._cfg.method)
        try:
            scores.signed_models(inputs, kind=kind)
        except ValueError:  # uniform without embeddings: nothing to score.
            return
        yield beam.pvalue.TaggedOutput("batch_scores", {
            "selected": scores.batch_score(inputs, picked.indices, kind=kind),
            "random": scores.mean_random_batch_score(inputs, kind=kind,
                                                     batch_size=self._cfg.batch_size,
                                                     num_samples=1, generator=generator)})


class SelectSubBatches(beam.PTransform):
    """(super_batch, rows) → "manifest" tables, "selected" tables, "batch_scores" dicts."""

    def __init__(self, cfg: SelectConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, super_batches):
        return (super_batches
                | "GroupBySuperBatch" >> beam.GroupByKey()
                | "Select" >> beam.ParDo(_SelectSuperBatch(self._cfg))
                .with_outputs("manifest", "selected", "batch_scores"))


# ----------------------------------------------------------------------------- curated shards

def _tar_name(index: int) -> str:
    return f"{index:05d}.tar"


class _WriteFragment(beam.DoFn):
    """Selected rows of one corpus shard → tar bytes in a fragment file + their byte ranges."""

    def __init__(self, cfg: SelectConfig):
        self._cfg = cfg
        self._shared = shared.Shared()

    def setup(self):
        corpus = self._cfg.corpus
        self._shards = tables.shards_by_id(self._shared, corpus)

    def process(self, element):
        shard_id, parts = element
        cfg = self._cfg
        chosen = pa.concat_tables(parts).sort_by("row")
        corpus = formats.read_shard(self._shards.by_id[shard_id], schema=formats.CORPUS_SCHEMA)
        images = corpus.take(pa.array(chosen.column("row").to_numpy()))
        first = (cfg.super_batch_range or (0, 0))[0]
        blobs, ranges, offset = [], {}, 0
        for rec, img in zip(chosen.to_pylist(), images.to_pylist()):
            meta = {k: rec[k] for k in ("uid", "super_batch", "chunk", "position", "score",
                                        "learner_loss", "reference_loss")}
            meta.update(round=cfg.round, method=cfg.method, source=img["source"],
                        source_location=img["source_location"], url=img["url"],
                        license=img["license"])
            blob = formats.encode_wds_sample(uid=img["uid"], image=img["image"],
                                             image_format=img["image_format"],
                                             caption=img["caption"], metadata=meta)
            batch_index = rec["super_batch"] - first
            tar_index = batch_index // cfg.shard_batches
            order = (batch_index % cfg.shard_batches, rec["position"])
            ranges.setdefault(tar_index, []).append((order, offset, len(blob)))
            blobs.append(blob)
            offset += len(blob)
        url = formats.join_url(cfg.output, "_work", "fragments", f"{shard_id}.bin")
        data = b"".join(blobs)
        faults.maybe_fail("select.write_fragment", (cfg.round, shard_id), partial_write=(url, data))
        formats.write_bytes_atomic(url, data)
        for tar_index, items in sorted(ranges.items()):
            yield tar_index, (url, items)


class _AssembleTar(beam.DoFn):
    """Byte ranges of one output tar, from several fragments → the tar, in selection order."""

    def __init__(self, cfg: SelectConfig):
        self._cfg = cfg

    def process(self, element):
        tar_index, parts = element
        pieces = sorted((order, url, offset, length) for url, items in parts
                        for order, offset, length in items)
        data = bytearray()
        files = {}
        try:  # Each piece is read by its byte range: no fragment is held whole.
            for _, url, offset, length in pieces:
                if url not in files:
                    files[url] = formats.fsspec.open(url, "rb").open()
                files[url].seek(offset)
                data += files[url].read(length)
        finally:
            for f in files.values():
                f.close()
        data += formats.TAR_END
        name = _tar_name(tar_index)
        url = formats.join_url(self._cfg.output, "shards", name)
        faults.maybe_fail("select.assemble_tar", (self._cfg.round, tar_index),
                          partial_write=(url, data))
        formats.write_bytes_atomic(url, bytes(data))
        yield {"sizes": {name: len(pieces)},
               "sha256": {f"shards/{name}": hashing.sha256_bytes(bytes(data))}}


class WriteCuratedShards(beam.PTransform):
    """"selected" tables → OUTPUT/shards/NNNNN.tar; emits {"sizes": {tar: n}} per tar."""

    def __init__(self, cfg: SelectConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, selected):
        return (selected
                | "SplitByCorpusShard" >> beam.FlatMap(_split_by_shard)
                | "GroupByCorpusShard" >> beam.CombinePerKey(tables.ConcatTables())
                | "WriteFragments" >> beam.ParDo(_WriteFragment(self._cfg))
                | "GroupByTar" >> beam.GroupByKey()
                | "AssembleTars" >> beam.ParDo(_AssembleTar(self._cfg)))


def _split_by_shard(table: pa.Table):
    for shard_id, part in tables.split_by(table, "shard_id"):
        yield str(shard_id), part


class _WriteManifestShard(beam.DoFn):
    def __init__(self, output: str):
        self._output = output

    def process(self, element):
        shard_id, parts = element
        faults.maybe_fail("select.write_manifest", (self._output, shard_id))
        table = pa.concat_tables(parts).sort_by("row")
        rows = table.column("row").to_numpy()
        if len(np.unique(rows)) != len(rows):
            raise RuntimeError(f"corpus shard {shard_id}: an example was decided twice")
        info = formats.write_shard(formats.join_url(self._output, "manifest"), shard_id,
                                   table.drop_columns(["shard_id", "row"]),
                                   schema=formats.MANIFEST_SCHEMA)
        reasons = table.column("reason").to_pylist()
        yield {"reasons": {r: reasons.count(r) for r in set(reasons)},
               "manifest_rows": {shard_id: len(rows)},
               "sha256": {f"manifest/{shard_id}.parquet": info.sha256}}


class WriteManifest(beam.PTransform):
    """Manifest tables from every stage → one manifest shard per corpus shard, row order."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, decisions):
        return (decisions
                | "SplitByCorpusShard" >> beam.FlatMap(_split_by_shard)
                | "GroupByCorpusShard" >> beam.CombinePerKey(tables.ConcatTables())
                | "WriteShard" >> beam.ParDo(_WriteManifestShard(self._output)))


# ----------------------------------------------------------------------------- commit

def _merge_reports(reports) -> dict:
    merged = {"sizes": {}, "reasons": {}, "manifest_rows": {}, "batch_scores": [],
              "selection_flops": 0, "sha256": {}}
    for r in reports:
        merged["selection_flops"] += r.get("selection_flops", 0)
        merged["sizes"].update(r.get("sizes", {}))
        merged["sha256"].update(r.get("sha256", {}))
        merged["manifest_rows"].update(r.get("manifest_rows", {}))
        for k, v in r.get("reasons", {}).items():
            merged["reasons"][k] = merged["reasons"].get(k, 0) + v
        merged["batch_scores"].extend(r.get("batch_scores", []))
        if "selected" in r:  # One super-batch's scores; merged reports carry lists.
            merged["batch_scores"].append((r["selected"], r["random"]))
    return merged


class _Commit(beam.DoFn):
    def __init__(self, cfg: SelectConfig, corpus_rows: int):
        self._cfg, self._corpus_rows = cfg, corpus_rows

    def process(self, report):
        cfg = self._cfg
        reasons = report["reasons"]
        dead = {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("dead_letter:")}
        stats = {
            "seen": self._corpus_rows, "selected": reasons.get("selected", 0),
            "rejected": reasons.get("rejected", 0), "carried": reasons.get("carried", 0),
            "outside_slice": reasons.get("outside_slice", 0),
            "dead_lettered": sum(dead.values()), "dead_letters_by_reason": dead,
            "super_batches": reasons.get("selected", 0) // cfg.batch_size,
            "batch_size": cfg.batch_size, "super_batch_size": cfg.super_batch_size,
            "effective_filter_ratio": sampler.effective_filter_ratio(cfg.batch_size,
                                                                     cfg.super_batch_size),
            "method": cfg.method, "round": cfg.round, "seed": cfg.seed,
            "shuffle_round": cfg.permutation_round, "chunks": cfg.chunks,
            "temperature": cfg.temperature,
            # Matmul FLOPs of selection (measured with FlopCounterMode, per shape).
            "selection_flops": report["selection_flops"],
        }
        if report["batch_scores"]:
            sel, rnd = np.array(sorted(report["batch_scores"])).T
            stats["mean_batch_score_selected"] = float(sel.mean())
            stats["mean_batch_score_random"] = float(rnd.mean())
        accounted = sum(stats[k] for k in ("selected", "rejected", "carried", "outside_slice",
                                           "dead_lettered"))
        if accounted != self._corpus_rows or sum(report["manifest_rows"].values()) != accounted:
            raise RuntimeError(f"accounting failed: {accounted} decisions for "
                               f"{self._corpus_rows} corpus rows")
        sizes = dict(sorted(report["sizes"].items()))
        out = cfg.output
        formats.write_json_atomic(formats.join_url(out, "shards", "sizes.json"), sizes)
        formats.write_json_atomic(formats.join_url(out, "stats.json"), stats)
        formats.remove_tree(formats.join_url(out, "_work"))
        # Tars and manifest shards were hashed as they were written; only the small
        # JSON files are read back.
        shas = dict(report["sha256"])
        for name in ("shards/sizes.json", "stats.json"):
            shas[name] = formats.sha256_file(formats.join_url(out, name))
        manifest = formats.join_url(out, "manifest")
        formats.write_index(manifest, [formats.ShardInfo(
            shard_id=s, url=formats.join_url(manifest, f"{s}.parquet"), num_rows=n,
            sha256=shas[f"manifest/{s}.parquet"], schema_name="manifest/v1")
            for s, n in sorted(report["manifest_rows"].items())], writer="jest-curate select")
        shas["manifest/_index.json"] = formats.sha256_file(formats.join_url(manifest,
                                                                            formats.INDEX))
        # _SUCCESS is the selection's index: every file it holds, with its sha256.
        formats.write_json_atomic(formats.join_url(out, "_SUCCESS"), {"files": shas})
        yield stats


class CurateRound(beam.PTransform):
    """The whole select stage: corpus + embeddings → curated shards, manifest, stats."""

    def __init__(self, cfg: SelectConfig):
        super().__init__()
        self._cfg = cfg
        shards = formats.list_shards(cfg.corpus)  # The index: one read, nothing kept.
        if not shards:
            raise ValueError(f"no committed corpus shards under {cfg.corpus}")
        total = sum(s.num_rows for s in shards)
        self._corpus_rows = total
        self._bits = max(0, math.ceil(math.log2(max(1, total / _BUCKET_TARGET_ROWS))))

    def expand(self, pbegin):
        cfg = self._cfg
        joined = pbegin | "JoinEmbeddings" >> JoinEmbeddings(cfg, self._bits)
        ranked = (joined.rows, joined.counts) | "AssignSuperBatches" >> AssignSuperBatches(cfg)
        chosen = ranked.super_batches | "SelectSubBatches" >> SelectSubBatches(cfg)
        sizes = chosen.selected | "WriteCuratedShards" >> WriteCuratedShards(cfg)
        manifests = ((joined.manifest, ranked.manifest, chosen.manifest)
                     | "AllDecisions" >> beam.Flatten()
                     | "WriteManifest" >> WriteManifest(cfg.output))
        return ((sizes, manifests, chosen.batch_scores)
                | "AllReports" >> beam.Flatten()
                | "MergeReports" >> beam.CombineGlobally(_merge_reports)
                | "Commit" >> beam.ParDo(_Commit(cfg, self._corpus_rows)))


# ----------------------------------------------------------------------------- CLI

def _check_embeddings_dirs(cfg: SelectConfig) -> None:
    """Refuse model.json files whose contract or digest is inconsistent (read validates)."""
    for role in ("reference", "learner"):
        root = getattr(cfg, role)
        if root:
            formats.read_model_card(root)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="jest-curate select", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="canonical corpus URL")
    p.add_argument("--reference-embeddings", help="embeddings dir of the reference model")
    p.add_argument("--learner-embeddings", help="embeddings dir of the learner checkpoint")
    p.add_argument("--output", required=True, help="output URL (overwritten on rerun)")
    p.add_argument("--batch-size", type=int, required=True, help="b: examples per sub-batch")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--filter-ratio", type=float, help="f; S = round(b / (1 - f))")
    g.add_argument("--super-batch-size", type=int, help="S")
    p.add_argument("--chunks", type=int, default=16, help="N chunks per sub-batch")
    p.add_argument("--temperature", type=float, default=1.0, help="tau")
    p.add_argument("--method", default="jest", choices=sorted(_NEEDS))
    p.add_argument("--seed", type=int, default=0, help="root seed")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--shuffle-round", type=int, help="permutation key (default: --round)")
    p.add_argument("--super-batch-range", help="FIRST:STOP super-batches to select from")
    p.add_argument("--uids", help="parquet of the uids this round may use; others are "
                                  "recorded as outside_slice")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batches-per-shard", type=int, help="sub-batches per output tar")
    return options.parse_stage_args(p, argv)


def config_from_args(args) -> SelectConfig:
    S = args.super_batch_size or sampler.super_batch_size(args.batch_size, args.filter_ratio)
    rng = tuple(int(x) for x in args.super_batch_range.split(":")) \
        if args.super_batch_range else None
    return SelectConfig(
        corpus=args.corpus, output=args.output, batch_size=args.batch_size,
        super_batch_size=S, method=args.method, chunks=args.chunks,
        temperature=args.temperature, seed=args.seed, round=args.round,
        shuffle_round=args.shuffle_round, super_batch_range=rng, uids=args.uids,
        reference=args.reference_embeddings, learner=args.learner_embeddings,
        compute_dtype=args.compute_dtype, batches_per_shard=args.batches_per_shard)


def run_select(cfg: SelectConfig, beam_args=(), test_pipeline=None) -> dict:
    """Run one select stage; returns stats.json's contents."""
    _check_embeddings_dirs(cfg)
    # A rerun replaces the previous output: uncommit first, then clear stale files.
    for stale in ("_SUCCESS", "shards", "manifest", "_work", "stats.json"):
        formats.remove_tree(formats.join_url(cfg.output, stale))
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    with pipeline as p:
        _ = p | "CurateRound" >> CurateRound(cfg)
    return formats.read_json(formats.join_url(cfg.output, "stats.json"))


def run(argv=None, test_pipeline=None) -> int:
    args, beam_args = parse_args(argv)
    stats = run_select(config_from_args(args), beam_args, test_pipeline)
    logging.info("select: %s", json.dumps(stats))
    print(json.dumps({k: stats[k] for k in ("seen", "selected", "rejected", "carried",
                                            "dead_lettered")}))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(run())
