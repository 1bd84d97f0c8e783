"""`jest-curate layout`: one pass of the pool, ranked and written as candidate shards.

    corpus shards ──KeyShards──► (bucket, keys: uid, corpus shard/row, hash) + histogram
                  ──RankBuckets──► (corpus shard, ranks of its rows) ; carried remainder
                  ──RouteRows──► (candidate shard, rows with images + reference embeddings)
                  ──WriteCandidates──► candidates/NNNNNN.parquet + reference/ sidecar
                  ──Commit──► indexes, carried.parquet, layout.json (last)

A pass is a permutation of the pool by (blake2b("pass", seed, pass, uid), uid); super-
batch j holds ranks [j*S, (j+1)*S); the last pool mod S examples are *carried* (they
compete again in the next pass's permutation). The pool is every corpus row the
reference embedded (every row, without a reference), less what a keep filter (clip-
score) drops; the others are counted by reason.

This job is O(pool) and runs once per pass: it is the one place image bytes cross a
shuffle (once, keyed by candidate shard). Ranking moves keys only: a hash-prefix
histogram gives each bucket its global offset. Every later round reads only its
super-batches' candidate shards (pipelines/round_job.py). Nothing per shard or per
example enters the job graph; the corpus's index is read on a worker.
"""
import argparse
import json
import logging
import math
from typing import Any, Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from jest_core import filtering
from jest_curate import formats
from jest_curate import hashing
from pipelines import faults, options, tables

__all__ = ["LayoutPass", "run_layout", "layout_spec", "rank_order", "run"]

_NAMESPACE = "jest_curate.layout"
_MAX_BUCKETS = 256  # Buckets hold >= 16k keys each, and at most this many buckets.
_BUCKET_MIN_ROWS = 16384
_WRITER = "jest-curate layout"


def pass_hashes(uids, *, seed: int, pass_index: int) -> np.ndarray:
    """[n] uint64 blake2b("pass", seed, pass, uid): the pass's permutation key."""
    return np.array([hashing.hash_u64("pass", seed, pass_index, u) for u in uids],
                    dtype=np.uint64)


def rank_order(hashes: np.ndarray, uids) -> np.ndarray:
    """Indices sorting rows by (hash, uid): numpy by hash, uid only within equal hashes."""
    order = np.argsort(hashes, kind="stable")
    h = hashes[order]
    ties = np.flatnonzero(h[1:] == h[:-1])
    if len(ties):  # 64-bit collisions: rare, but the order must not depend on input order.
        starts = ties[np.r_[True, np.diff(ties) > 1]]
        for start in starts:
            stop = start + 1
            while stop < len(h) and h[stop] == h[start]:
                stop += 1
            run = order[start:stop]
            order[start:stop] = sorted(run, key=lambda i: uids[i])
    return order


def bucket_bits(pool_rows: int) -> int:
    buckets = min(_MAX_BUCKETS, max(1, pool_rows // _BUCKET_MIN_ROWS))
    return max(0, math.ceil(math.log2(buckets)))


def pool_version(pool: str) -> str:
    """Identifies the rows a corpus holds (from its index: one read, per-shard entries)."""
    shards = formats.list_shards(pool)
    if not shards:
        raise FileNotFoundError(f"{pool}: no committed corpus shards")
    return hashing.blake2b_fields(*(f for s in shards for f in (
        s.shard_id, s.num_rows, s.version)), digest_size=32).hex()


def layout_spec(*, pool: str, reference: Optional[str], seed: int, pass_index: int,
                super_batch_size: int, shard_rows: int = 4096,
                keep: Optional[dict] = None) -> formats.LayoutSpec:
    """The spec of a pass over `pool`; reads two small files (the indexes' identities)."""
    if super_batch_size < 1:
        raise ValueError(f"super-batch size must be >= 1, got {super_batch_size}")
    version = pool_version(pool)
    digest = formats.read_model_card(reference).model_digest if reference else None
    return formats.LayoutSpec(
        pool=pool, pool_version=version, reference=reference, reference_digest=digest,
        seed=seed, pass_index=pass_index, super_batch_size=super_batch_size,
        shard_super_batches=max(1, shard_rows // super_batch_size), keep=keep)


def _reference(spec, shards, shard: formats.ShardInfo):
    """The reference embeddings of a corpus shard and each row's position in them (-1)."""
    info = shards.by_id.get(shard.shard_id)
    if info is None:
        return None, None
    emb = formats.read_embeddings_shard(info, expect_model_digest=spec.reference_digest)
    if emb.corpus_shard_sha256 != shard.version:
        raise formats.FormatError(
            f"{info.url}: embeds another version of corpus shard {shard.shard_id}; "
            f"re-run the reference embed")
    return emb, {u: i for i, u in enumerate(emb.uids)}


class _KeyShard(beam.DoFn):
    """One corpus shard → (bucket, keys of its pool rows); bucket counts; exclusions."""

    def __init__(self, spec: formats.LayoutSpec, bits: int):
        self._spec, self._bits = spec, bits
        self._shared = shared.Shared()

    def setup(self):
        ref = self._spec.reference
        self._ref = tables.shards_by_id(self._shared, ref) if ref else None

    def process(self, shard: formats.ShardInfo) -> Iterable[Any]:
        spec = self._spec
        faults.maybe_fail("layout.key_shard", (spec.pass_index, shard.shard_id))
        uids = formats.read_shard(shard, columns=["uid"]).column("uid").to_pylist()
        pool = np.ones(len(uids), bool)
        excluded = {}
        if spec.reference:
            emb, position = _reference(spec, self._ref, shard)
            found = np.array([position.get(u, -1) for u in uids] if emb else [-1] * len(uids),
                             dtype=np.int64)
            pool = found >= 0
            excluded["not_embedded"] = int((~pool).sum())
            if spec.keep:
                sims = filtering.clip_scores(image=emb.image, text=emb.text) if emb else \
                    np.zeros(0, np.float32)
                kept = np.zeros(len(uids), bool)
                kept[pool] = filtering.keeps(sims[found[pool]], [u for u, p in zip(uids, pool)
                                                                 if p], spec.keep)
                excluded["filtered"] = int((pool & ~kept).sum())
                pool &= kept
        rows = np.flatnonzero(pool)
        keys = [uids[i] for i in rows]
        hashes = pass_hashes(keys, seed=spec.seed, pass_index=spec.pass_index)
        bucket = (hashes >> np.uint64(64 - self._bits)).astype(np.int64) if self._bits \
            else np.zeros(len(keys), np.int64)
        beam.metrics.Metrics.counter(_NAMESPACE, "pool").inc(len(keys))
        yield beam.pvalue.TaggedOutput("counts", {
            "histogram": np.bincount(bucket, minlength=1 << self._bits), "rows": len(uids),
            **{f"excluded:{k}": v for k, v in excluded.items()}})
        table = pa.table({"uid": pa.array(keys, pa.string()),
                          "corpus_shard": pa.array([shard.shard_id] * len(keys), pa.string()),
                          "corpus_row": pa.array(rows, pa.int64()),
                          "hash": pa.array(hashes, pa.uint64()),
                          "bucket": pa.array(bucket, pa.int64())})
        for b, part in tables.split_by(table, "bucket"):
            yield int(b), part.drop_columns(["bucket"])


class _RankBucket(beam.DoFn):
    """One bucket's keys → ranks, super-batches and candidate shards, by corpus shard."""

    def __init__(self, spec: formats.LayoutSpec):
        self._spec = spec

    def process(self, element, counts) -> Iterable[Any]:
        bucket, parts = element
        counts = counts["histogram"]
        S = self._spec.super_batch_size
        keys = pa.concat_tables(parts)
        uids = keys.column("uid").to_pylist()
        order = rank_order(keys.column("hash").to_numpy(), uids)
        keys = keys.take(pa.array(order)).drop_columns(["hash"])
        rank = int(counts[:bucket].sum()) + np.arange(keys.num_rows, dtype=np.int64)
        full = int(counts.sum()) // S
        keys = keys.append_column("rank", pa.array(rank))
        carried = rank // S >= full
        if carried.any():
            yield beam.pvalue.TaggedOutput("carried", keys.filter(pa.array(carried)))
        for shard_id, part in tables.split_by(keys.filter(pa.array(~carried)), "corpus_shard"):
            yield str(shard_id), part.select(["corpus_row", "rank"])


class _RouteRows(beam.DoFn):
    """One corpus shard's ranked rows → (candidate shard, its rows with images and
    reference embeddings). The corpus shard and its embeddings are read once."""

    def __init__(self, spec: formats.LayoutSpec):
        self._spec = spec
        self._shared = shared.Shared()

    def setup(self):
        spec = self._spec
        self._corpus = tables.shards_by_id(self._shared, spec.pool)
        self._ref = tables.shards_by_id(self._shared, spec.reference) if spec.reference else None

    def process(self, element) -> Iterable[Any]:
        shard_id, parts = element
        spec = self._spec
        S, G = spec.super_batch_size, spec.shard_super_batches
        faults.maybe_fail("layout.route_rows", (spec.pass_index, shard_id))
        assigned = pa.concat_tables(parts).sort_by("corpus_row")
        shard = self._corpus.by_id[shard_id]
        rows = assigned.column("corpus_row").to_numpy()
        corpus = formats.read_shard(shard, schema=formats.CORPUS_SCHEMA, verify_sha256=True)
        out = corpus.take(pa.array(rows))
        rank = assigned.column("rank").to_numpy()
        super_batch = rank // S
        out = (out.append_column("corpus_shard", pa.array([shard_id] * len(rows), pa.string()))
               .append_column("corpus_row", pa.array(rows, pa.int64()))
               .append_column("pass", pa.array(np.full(len(rows), spec.pass_index, np.int32)))
               .append_column("super_batch", pa.array(super_batch, pa.int64()))
               .append_column("rank", pa.array(rank, pa.int64()))
               .append_column("candidate", pa.array(super_batch // G, pa.int64())))
        if spec.reference:
            emb, position = _reference(spec, self._ref, shard)
            at = np.array([position[u] for u in out.column("uid").to_pylist()], dtype=np.int64)
            for name, matrix in (("ref_image", emb.image), ("ref_text", emb.text)):
                flat = pa.array(np.ascontiguousarray(matrix[at]).reshape(-1))
                out = out.append_column(name, pa.FixedSizeListArray.from_arrays(
                    flat, matrix.shape[1]))
        for candidate, part in tables.split_by(out, "candidate"):
            yield int(candidate), part.drop_columns(["candidate"])


def _matrix(rows: pa.Table, name: str) -> np.ndarray:
    column = rows.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(
        -1, column.type.list_size)


class _WriteCandidates(beam.DoFn):
    """One candidate shard's rows → its parquet file (rank order, a row group per
    super-batch) and its reference sidecar; yields its CandidateShard."""

    def __init__(self, spec: formats.LayoutSpec, output: str):
        self._spec, self._output = spec, output

    def process(self, element, counts):
        candidate, parts = element
        counts = counts["histogram"]
        spec = self._spec
        S, G = spec.super_batch_size, spec.shard_super_batches
        faults.maybe_fail("layout.write_candidates", (spec.pass_index, candidate))
        rows = pa.concat_tables(parts).sort_by("rank")
        first = candidate * G
        count = min(G, int(counts.sum()) // S - first)
        want = np.arange(first * S, (first + count) * S, dtype=np.int64)
        if not np.array_equal(rows.column("rank").to_numpy(), want):
            raise RuntimeError(f"candidate shard {candidate}: ranks are not exactly super-"
                               f"batches {first}..{first + count - 1}")
        shard_id = formats.layout_shard_id(candidate)
        info = formats.write_shard(formats.join_url(self._output, "candidates"), shard_id,
                                   rows, schema=formats.CANDIDATE_SCHEMA, row_group_size=S)
        sidecar = None
        if spec.reference:
            sidecar = formats.write_embeddings_shard(
                formats.join_url(self._output, "reference"), shard_id, formats.Embeddings(
                    uids=rows.column("uid").to_pylist(), image=_matrix(rows, "ref_image"),
                    text=_matrix(rows, "ref_text"), model_digest=spec.reference_digest,
                    corpus_shard_sha256=info.sha256), row_group_size=S)
        beam.metrics.Metrics.counter(_NAMESPACE, "candidate_shards").inc()
        yield formats.CandidateShard(info=info, reference=sidecar, first_super_batch=first,
                                     super_batches=count)


def _identity(x):
    return x


def _merge_counts(dicts) -> dict:
    total = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total[k] + v if k in total else v
    return total


class _Commit(beam.DoFn):
    def __init__(self, spec: formats.LayoutSpec, output: str):
        self._spec, self._output = spec, output

    def process(self, _, shards, carried, counts):
        spec, out = self._spec, self._output
        S = spec.super_batch_size
        excluded = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("excluded:")}
        pool_rows = counts["rows"]
        pool = int(counts["histogram"].sum())
        carried = (pa.concat_tables(carried).sort_by("rank") if carried
                   else formats.CARRIED_SCHEMA.empty_table())
        shards = sorted(shards, key=lambda s: s.first_super_batch)
        doc = {"pool_rows": pool_rows, "pool": pool, "excluded_by_reason": excluded,
               "super_batches": pool // S, "carried": carried.num_rows,
               "shards": len(shards)}
        if (pool_rows != pool + sum(excluded.values()) or carried.num_rows != pool % S
                or sum(s.super_batches for s in shards) != pool // S):
            raise RuntimeError(f"layout accounting failed: {doc}")
        formats.write_bytes_atomic(formats.join_url(out, "carried.parquet"),
                                   formats.table_bytes(carried, formats.CARRIED_SCHEMA))
        if spec.reference:
            formats.write_model_card(formats.join_url(out, "reference"),
                                     formats.read_model_card(spec.reference))
        formats.write_layout(out, spec, doc, shards, writer=_WRITER)
        logging.info("layout: pass %d: %d of %d rows in the pool, %d super-batches of %d in "
                     "%d candidate shards, %d carried", spec.pass_index, pool, pool_rows,
                     pool // S, S, len(shards), carried.num_rows)
        yield doc


class LayoutPass(beam.PTransform):
    """The whole layout stage: pool → OUTPUT's candidate shards, sidecar and layout.json."""

    def __init__(self, spec: formats.LayoutSpec, output: str):
        super().__init__()
        self._spec, self._output = spec, output
        # The corpus index's total: one read, nothing per shard kept.
        self._bits = bucket_bits(sum(s.num_rows for s in formats.list_shards(spec.pool)))

    def expand(self, pbegin):
        spec = self._spec
        keyed = (pbegin
                 | "Pool" >> beam.Create([spec.pool], reshuffle=False)
                 | "PoolShards" >> beam.FlatMap(formats.list_shards)  # The index, on a worker.
                 | "Spread" >> beam.Reshuffle()
                 | "KeyShards" >> beam.ParDo(_KeyShard(spec, self._bits))
                 .with_outputs("counts", main="keys"))
        # Bucket histogram, rows and exclusions by reason, summed over the pool's shards.
        counts = beam.pvalue.AsSingleton(
            keyed.counts | "Counts" >> beam.CombineGlobally(_merge_counts).without_defaults())
        ranked = (keyed.keys
                  | "GroupByBucket" >> beam.GroupByKey()
                  | "RankBuckets" >> beam.ParDo(_RankBucket(spec), counts)
                  .with_outputs("carried", main="assigned"))
        written = (ranked.assigned
                   | "GroupByCorpusShard" >> beam.CombinePerKey(tables.ConcatTables())
                   | "RouteRows" >> beam.ParDo(_RouteRows(spec))
                   | "GroupByCandidateShard" >> beam.CombinePerKey(tables.ConcatTables())
                   | "WriteCandidates" >> beam.ParDo(_WriteCandidates(spec, self._output),
                                                     counts))
        # BundleBasedDirectRunner (Beam 2.77) misroutes a tagged output read directly as a
        # side input; a step in between keeps it correct on every runner.
        carried = ranked.carried | "Carried" >> beam.Map(_identity)
        return (pbegin
                | "Once" >> beam.Create([None])
                | "Commit" >> beam.ParDo(_Commit(spec, self._output), beam.pvalue.AsList(written),
                                         beam.pvalue.AsList(carried), counts))


def run_layout(spec: formats.LayoutSpec, output: str, beam_args=(),
               test_pipeline=None) -> Optional[formats.Layout]:
    """Lay out one pass under `output` (skipped if it holds this spec's committed layout;
    refused if it holds another's); returns the layout (None after `--dry_run=True`,
    which builds the job and runs nothing)."""
    try:
        existing = formats.read_layout(output)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if existing.spec != spec:
            raise ValueError(f"{output} holds the layout of another pass or pool "
                             f"({existing.spec}); pick another output")
        return existing
    for stale in (formats.LAYOUT_FILE, "candidates", "reference", "carried.parquet"):
        formats.remove_tree(formats.join_url(output, stale))  # What an interrupted run left.
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    with pipeline as p:
        _ = p | "LayoutPass" >> LayoutPass(spec, output)
    if options.is_dry_run(beam_args):
        return None
    return formats.read_layout(output)


def run(argv=None, test_pipeline=None) -> int:
    p = argparse.ArgumentParser(prog="jest-curate layout", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="the pool: canonical corpus URL")
    p.add_argument("--reference-embeddings",
                   help="the reference's embeddings of the pool: the pool is what it embedded, "
                        "and its embeddings become the layout's sidecar")
    p.add_argument("--output", required=True, help="the pass's layout directory")
    p.add_argument("--seed", type=int, default=0, help="the passes' seed")
    p.add_argument("--pass", dest="pass_index", type=int, default=0, help="pass number")
    p.add_argument("--super-batch-size", type=int, required=True, help="S")
    p.add_argument("--shard-rows", type=int, default=4096,
                   help="rows per candidate shard (rounded down to whole super-batches)")
    args, beam_args = options.parse_stage_args(p, argv)
    spec = layout_spec(pool=args.corpus, reference=args.reference_embeddings, seed=args.seed,
                       pass_index=args.pass_index, super_batch_size=args.super_batch_size,
                       shard_rows=args.shard_rows)
    layout = run_layout(spec, args.output, beam_args, test_pipeline)
    print("dry run: the job was built, nothing ran" if layout is None else
          json.dumps(layout.counts, sort_keys=True))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(run())
