"""Exact-duplicate removal across a whole ingest run, independent of bundle order.

Checked in this order, each with its own dead-letter reason:

    duplicate_uid            another valid example has the same uid
    duplicate_image_caption  same image bytes and same caption as the kept copy
    duplicate_image          same image bytes as the kept copy, another caption
                             (mode "image" only: SigLIP treats the second caption of
                             an image in the same batch as a false negative)

The kept copy of a group is the one whose (source_location, source) sorts first, so
reruns keep the same copy whatever the runner's bundling. Images are compared by a
128-bit blake2b of their bytes, captions after cleaning.

Only key records (uid, source, source_location, digests: ~100 bytes a row) are
shuffled to find the losers; the rows themselves are then keyed by corpus shard,
co-grouped with the losers of that shard and dropped there, so `kept` is ready
for `corpus_io.WriteCorpus`.
"""
import math
from typing import Iterable, List

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from jest_curate import formats, hashing
from pipelines.corpus_io import AssignShards, shard_of

__all__ = ["MODES", "KEYS_SCHEMA", "LOSERS_SCHEMA", "dedup_keys", "uid_duplicates",
           "image_duplicates", "DropDuplicates"]

_NAMESPACE = "jest_curate.dedup"
MODES = ("image", "image-caption", "none")

KEYS_SCHEMA = pa.schema([
    pa.field("uid", pa.string()), pa.field("source", pa.string()),
    pa.field("source_location", pa.string()),
    pa.field("image_key", pa.string()), pa.field("caption_key", pa.string())])

LOSERS_SCHEMA = pa.schema([
    pa.field("uid", pa.string()), pa.field("source", pa.string()),
    pa.field("source_location", pa.string()),
    pa.field("reason", pa.string()), pa.field("detail", pa.string())])


def dedup_keys(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Corpus rows -> KEYS_SCHEMA rows (digests of image bytes and caption)."""
    images = batch.column("image").to_pylist()
    captions = batch.column("caption").to_pylist()
    return pa.RecordBatch.from_pydict({
        "uid": batch.column("uid"), "source": batch.column("source"),
        "source_location": batch.column("source_location"),
        "image_key": [hashing.blake2b_fields("image", x).hex() for x in images],
        "caption_key": [hashing.blake2b_fields("caption", c).hex() for c in captions],
    }, schema=KEYS_SCHEMA)


def _runs(table: pa.Table, key_columns: tuple):
    """Rows grouped by equal keys, each group in (source_location, source) order."""
    cols = {name: table.column(name).to_pylist() for name in KEYS_SCHEMA.names}
    order = sorted(range(table.num_rows), key=lambda i: (
        tuple(cols[k][i] for k in key_columns), cols["source_location"][i], cols["source"][i]))
    run = []
    for i in order:
        if run and any(cols[k][i] != cols[k][run[0]] for k in key_columns):
            yield cols, run
            run = []
        run.append(i)
    if run:
        yield cols, run


def _losers_table(rows: List[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LOSERS_SCHEMA)


def uid_duplicates(table: pa.Table):
    """(survivors as KEYS_SCHEMA, losers as LOSERS_SCHEMA): one row kept per uid."""
    keep, losers = [], []
    for cols, run in _runs(table, ("uid",)):
        winner = run[0]
        keep.append(winner)
        for i in run[1:]:
            losers.append({name: cols[name][i] for name in ("uid", "source", "source_location")}
                          | {"reason": "duplicate_uid", "detail": (
                              f"uid also at {cols['source_location'][winner]} "
                              f"(source {cols['source'][winner]}), which is kept")})
    return table.take(pa.array(sorted(keep), pa.int64())), _losers_table(losers)


def image_duplicates(table: pa.Table, mode: str) -> pa.Table:
    """LOSERS_SCHEMA rows: repeats of an image (mode "image") or image+caption pair."""
    if mode not in MODES:
        raise ValueError(f"dedup mode {mode!r} not in {MODES}")
    if mode == "none":
        return _losers_table([])
    key = ("image_key",) if mode == "image" else ("image_key", "caption_key")
    losers = []
    for cols, run in _runs(table, key):
        winner = run[0]
        for i in run[1:]:
            same_caption = cols["caption_key"][i] == cols["caption_key"][winner]
            losers.append({name: cols[name][i] for name in ("uid", "source", "source_location")}
                          | {"reason": ("duplicate_image_caption" if same_caption
                                        else "duplicate_image"),
                             "detail": (f"same image{' and caption' if same_caption else ''} "
                                        f"as uid {cols['uid'][winner]} at "
                                        f"{cols['source_location'][winner]}, which is kept")})
    return _losers_table(losers)


class _ResolveUids(beam.DoFn):
    """A group of key records -> survivors (main) and `losers`."""

    def process(self, element):
        _, batches = element
        survivors, losers = uid_duplicates(pa.Table.from_batches(list(batches)))
        if losers.num_rows:
            yield beam.pvalue.TaggedOutput("losers", losers)
        yield from survivors.to_batches()


def _image_losers(element, mode: str) -> Iterable[pa.Table]:
    _, batches = element
    losers = image_duplicates(pa.Table.from_batches(list(batches)), mode)
    if losers.num_rows:
        yield losers


def _num_rows(batch) -> int:
    return batch.num_rows


def _num_shards(valid_rows: int, loser_rows: int, rows_per_shard: int) -> int:
    return max(1, math.ceil((valid_rows - loser_rows) / rows_per_shard))


def _by_shard(batch, num_shards: int) -> Iterable:
    """Rows keyed by their corpus shard (as corpus_io.AssignShards names it)."""
    buckets = {}
    for row, uid in enumerate(batch.column("uid").to_pylist()):
        buckets.setdefault(shard_of(uid, num_shards), []).append(row)
    for bucket, rows in sorted(buckets.items()):
        yield f"{bucket:05d}-of-{num_shards:05d}", batch.take(pa.array(rows, pa.int64()))


def _drop_losers(element) -> Iterable:
    """(shard_id, {"rows", "losers"}) -> (shard_id, rows that are not losers)."""
    shard_id, grouped = element
    lost = {row for t in grouped["losers"] for row in zip(
        *(t.column(c).to_pylist() for c in ("uid", "source", "source_location")))}
    kept, dropped = [], 0
    for batch in grouped["rows"]:
        ids = zip(*(batch.column(c).to_pylist() for c in ("uid", "source", "source_location")))
        mask = [row not in lost for row in ids]
        dropped += mask.count(False)
        kept.append(batch.filter(pa.array(mask, pa.bool_())))
    if dropped != len(lost):  # Identities must be unique; anything else loses examples.
        raise RuntimeError(f"shard {shard_id}: {len(lost)} duplicates to drop, matched {dropped}")
    table = pa.Table.from_batches([b for b in kept if b.num_rows], schema=formats.CORPUS_SCHEMA)
    if table.num_rows:
        yield shard_id, table


def _dead_letters(losers: pa.Table) -> Iterable[pa.RecordBatch]:
    for reason in losers.column("reason").to_pylist():
        Metrics.counter(_NAMESPACE, f"dropped_{reason}").inc()
    yield from losers.select(formats.DEAD_LETTER_SCHEMA.names).cast(
        formats.DEAD_LETTER_SCHEMA).to_batches()


def _loser_stats(losers: pa.Table) -> dict:
    """Per-source stats deltas: each loser moves from ingested to dead_lettered."""
    stats = {}
    for source, reason in zip(losers.column("source").to_pylist(),
                              losers.column("reason").to_pylist()):
        s = stats.setdefault(source, {"seen": 0, "ingested": 0, "dead_lettered": 0,
                                      "reasons": {}})
        s["ingested"] -= 1
        s["dead_lettered"] += 1
        s["reasons"][reason] = s["reasons"].get(reason, 0) + 1
    return stats


class DropDuplicates(beam.PTransform):
    """Valid corpus batches -> (kept `(shard_id, table)`, dead-letter batches, stats deltas).

    `kept` is keyed like `AssignShards(rows_per_shard=...)` over the rows that survive;
    `rows_per_group` bounds the key records one worker holds while finding losers.
    """

    def __init__(self, *, mode: str = "image", rows_per_shard: int = 2048,
                 rows_per_group: int = 1 << 20):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"dedup mode {mode!r} not in {MODES}")
        self._mode = mode
        self._rows_per_shard = rows_per_shard
        self._rows_per_group = rows_per_group

    def expand(self, valid):
        keys = valid | "Keys" >> beam.Map(dedup_keys)
        by_uid = (keys
                  | "GroupUids" >> AssignShards(rows_per_shard=self._rows_per_group)
                  | "GatherUids" >> beam.GroupByKey()
                  | "ResolveUids" >> beam.ParDo(_ResolveUids()).with_outputs("losers",
                                                                            main="survivors"))
        image_losers = (by_uid.survivors
                        | "GroupImages" >> AssignShards(rows_per_shard=self._rows_per_group,
                                                        key_column="image_key")
                        | "GatherImages" >> beam.GroupByKey()
                        | "ResolveImages" >> beam.FlatMap(_image_losers, self._mode))
        losers = (by_uid.losers, image_losers) | "AllLosers" >> beam.Flatten()
        loser_rows = (losers
                      | "CountLosers" >> beam.Map(_num_rows)
                      | "TotalLosers" >> beam.CombineGlobally(sum))
        num_shards = (valid
                      | "CountRows" >> beam.Map(_num_rows)
                      | "TotalRows" >> beam.CombineGlobally(sum)
                      | "NumShards" >> beam.Map(_num_shards, beam.pvalue.AsSingleton(loser_rows),
                                                self._rows_per_shard))
        shards = beam.pvalue.AsSingleton(num_shards)
        kept = ({"rows": valid | "RowsByShard" >> beam.FlatMap(_by_shard, shards),
                 "losers": losers | "LosersByShard" >> beam.FlatMap(_by_shard, shards)}
                | "JoinLosers" >> beam.CoGroupByKey()
                | "DropLosers" >> beam.FlatMap(_drop_losers))
        dead = losers | "DeadLetters" >> beam.FlatMap(_dead_letters)
        stats = losers | "Stats" >> beam.Map(_loser_stats)
        return kept, dead, stats
