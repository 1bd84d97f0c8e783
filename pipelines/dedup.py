"""Exact-duplicate removal across an ingest run (and the corpus it appends to), on keys only.

Reasons, in the order they are decided:

    duplicate_uid            another example with this uid is kept
    duplicate_image_caption  same image bytes and same caption as a kept example
    duplicate_image          same image bytes as a kept example, another caption
                             (mode "image" only: SigLIP treats the second caption of
                             an image in the same batch as a false negative)

Each key keeps the record of smallest rank (generation, source_location, source,
shard, row): generation 0 marks the corpus an `--append` run adds to (its rows always
stay, so its shards never change), 1 this run's rows. So the kept copy does not depend
on the runner's bundling or on input order. Images are compared by a 128-bit blake2b
of their bytes, captions after cleaning.

Only key records move (`formats.INGEST_KEYS_SCHEMA`, ~150 bytes a row), as Arrow
tables, through three stages, each a `CombinePerKey` over hash buckets of the key:

    uid winners    W1  over every key record
    pair winners   W2  over W1, key = (image, caption)     modes image, image-caption
    image winners  W3  over W2, key = image                mode image

Each stage reads the previous stage's output, so nothing joins back to the rows. A
bucket's accumulator holds one record per distinct key in it (a placeholder image
repeated a million times is one entry), and `with_hot_key_fanout` spreads a bucket's
input over several workers first. A row is kept iff it wins every stage, and loses with
the reason of the first stage it loses.

The decisions are applied without touching image bytes: the winners are keyed by their
corpus shard, and each shard with losers gets a drop list (`formats.write_drop_list`,
honoured by every reader through the dataset index) and a dead-letter shard
`_dead_letter/<shard>.dup`. No corpus file is rewritten.
"""
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from jest_curate import formats, hashing
from pipelines.corpus_io import DEAD_LETTER_DIR, KEYS_DIR, AssignShards, ShardOut

__all__ = ["MODES", "KEYS_SCHEMA", "dedup_keys", "winners", "losers", "DropDuplicates"]

_NAMESPACE = "jest_curate.dedup"
MODES = ("image", "image-caption", "none")
KEYS_SCHEMA = formats.INGEST_KEYS_SCHEMA
# In-flight key records: stored keys plus the generation and the pair key.
_RECORD = ("gen", "source_location", "source", "shard", "row", "uid", "image_key",
           "caption_key")
_STAGES = (("uid", "duplicate_uid"), ("pair_key", "duplicate_image_caption"),
           ("image_key", "duplicate_image"))
_STAGES_OF_MODE = {"none": 1, "image-caption": 2, "image": 3}
_DETAILS = {
    "duplicate_uid": "uid also on another example, which is kept (the first by "
                     "source_location)",
    "duplicate_image_caption": "same image and caption (image blake2b {image}) as an "
                               "example that is kept",
    "duplicate_image": "same image (blake2b {image}) as an example with another caption, "
                       "which is kept"}
DUP_SUFFIX = ".dup"  # _dead_letter/<shard>.dup holds a shard's dedup losers.


def dedup_keys(table, *, shard: str = "") -> pa.Table:
    """Corpus rows -> INGEST_KEYS_SCHEMA rows (digests of image bytes and caption)."""
    images = table.column("image").to_pylist()
    captions = table.column("caption").to_pylist()
    return pa.table({
        "uid": table.column("uid"), "source": table.column("source"),
        "source_location": table.column("source_location"),
        "image_key": [hashing.blake2b_fields("image", x).hex() for x in images],
        "caption_key": [hashing.blake2b_fields("caption", c).hex() for c in captions],
        "shard": pa.array([shard] * table.num_rows, pa.string()),
        "row": pa.array(np.arange(table.num_rows), pa.int64()),
    }, schema=KEYS_SCHEMA)


def _in_flight(keys: pa.Table, generation: int) -> pa.Table:
    """Stored key records -> records with a generation."""
    return keys.append_column("gen", pa.array([generation] * keys.num_rows, pa.int8()))


def _with_stage_key(records: pa.Table, key: str) -> pa.Table:
    """Adds the pair key (image + caption digests) for the stage that needs it."""
    if key != "pair_key" or key in records.schema.names:
        return records
    pair = [f"{i}/{c}" for i, c in zip(records.column("image_key").to_pylist(),
                                      records.column("caption_key").to_pylist())]
    return records.append_column("pair_key", pa.array(pair, pa.string()))


class _Winners(beam.CombineFn):
    """Key records -> the record of smallest rank per `key` (a dict of distinct keys)."""

    def __init__(self, key: str):
        self._key = key

    def create_accumulator(self):
        return {}

    def add_input(self, acc, table):
        cols = [table.column(c).to_pylist() for c in _RECORD]
        for k, record in zip(table.column(self._key).to_pylist(), zip(*cols)):
            held = acc.get(k)
            if held is None or record < held:
                acc[k] = record
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for k, record in acc.items():
                held = out.get(k)
                if held is None or record < held:
                    out[k] = record
        return out

    def extract_output(self, acc):
        columns = list(zip(*acc.values())) if acc else [()] * len(_RECORD)
        types = {"gen": pa.int8(), "row": pa.int64()}
        return pa.table({name: pa.array(list(col), types.get(name, pa.string()))
                         for name, col in zip(_RECORD, columns)})


def winners(table: pa.Table, key: str) -> pa.Table:
    """The records `_Winners` keeps, computed in one process (for tests and tools)."""
    fn = _Winners(key)
    return fn.extract_output(fn.add_input(fn.create_accumulator(),
                                          _with_stage_key(table, key)))


def losers(keys: pa.Table, mode: str, *, generation: int = 1) -> pa.Table:
    """(uid, source_location, reason) of every key record `mode` drops, in one process.

    `keys` holds INGEST_KEYS_SCHEMA columns (`shard`/`row` may be absent: rows then get
    their position as row number).
    """
    if mode not in MODES:
        raise ValueError(f"dedup mode {mode!r} not in {MODES}")
    if "shard" not in keys.schema.names:
        keys = keys.append_column("shard", pa.array([""] * keys.num_rows, pa.string()))
    if "row" not in keys.schema.names:
        keys = keys.append_column("row", pa.array(np.arange(keys.num_rows), pa.int64()))
    records = _in_flight(keys.select(KEYS_SCHEMA.names), generation)
    level = np.zeros(records.num_rows, np.int8)
    position = {(s, r): i for i, (s, r) in enumerate(zip(records.column("shard").to_pylist(),
                                                         records.column("row").to_pylist()))}
    for stage, (key, _) in enumerate(_STAGES[:_STAGES_OF_MODE[mode]], start=1):
        records = winners(records, key)
        for s, r in zip(records.column("shard").to_pylist(), records.column("row").to_pylist()):
            level[position[(s, r)]] = stage
    lost = np.nonzero(level < _STAGES_OF_MODE[mode])[0]
    return pa.table({"uid": keys.column("uid").take(pa.array(lost)),
                     "source_location": keys.column("source_location").take(pa.array(lost)),
                     "reason": pa.array([_STAGES[level[i]][1] for i in lost], pa.string())})


def _count_shuffled(table: pa.Table, stage: str) -> pa.Table:
    Metrics.counter(_NAMESPACE, "key_bytes_shuffled").inc(table.nbytes)
    Metrics.counter(_NAMESPACE, f"key_rows_shuffled_{stage}").inc(table.num_rows)
    return table


class _Stage(beam.PTransform):
    """Key records -> the winner per `key`, bucketed by the key's hash."""

    def __init__(self, key: str, rows_per_group: int, fanout: int):
        super().__init__()
        self._key, self._rows_per_group, self._fanout = key, rows_per_group, fanout

    def expand(self, records):
        return (records
                | "StageKey" >> beam.Map(_with_stage_key, self._key)
                | "Count" >> beam.Map(_count_shuffled, self._key)
                | "Bucket" >> AssignShards(rows_per_shard=self._rows_per_group,
                                           key_column=self._key)
                | "Winners" >> beam.CombinePerKey(_Winners(self._key))
                .with_hot_key_fanout(self._fanout or None)
                | "Tables" >> beam.Values())


def _by_shard(table: pa.Table, level: int) -> Iterable:
    """A stage's winners of this run -> (shard, (level, rows won))."""
    new = table.filter(pc.equal(table.column("gen"), 1))
    shards = new.column("shard").to_numpy(zero_copy_only=False)
    rows = new.column("row").to_numpy()
    order = np.argsort(shards, kind="stable")
    shards, rows = shards[order], rows[order]
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else []
    for start, stop in zip(starts, list(starts[1:]) + [len(shards)]):
        Metrics.counter(_NAMESPACE, "key_bytes_shuffled").inc(
            8 * (stop - start) + len(shards[start]))
        yield str(shards[start]), (level, rows[start:stop])


def _shard_key(out) -> tuple:
    return out.info.shard_id, ("shard", out)


class _ApplyToShard(beam.DoFn):
    """(shard, [its ShardOut, (level, rows won)...]) -> ShardOut with its drop list;
    tagged "dead" ShardOut of `<shard>.dup` and "stats" deltas."""

    def __init__(self, output: str, stages: int):
        self._output, self._stages = output, stages

    def process(self, element):
        shard_id, parts = element
        out, level = None, None
        won = []
        for tag, value in parts:
            if tag == "shard":
                out = value
            else:
                won.append((tag, value))
        level = np.zeros(out.info.rows_in_file, np.int8)
        for stage, rows in won:
            np.maximum.at(level, rows, stage)
        lost = np.nonzero(level < self._stages)[0]
        if not len(lost):
            yield out
            return
        keys = formats.read_shard(formats.join_url(self._output, KEYS_DIR, f"{shard_id}.parquet"),
                                  columns=["uid", "source", "source_location", "image_key"])
        take = pa.array(lost)
        reasons = [_STAGES[level[i]][1] for i in lost]
        uids = keys.column("uid").take(take)
        images = keys.column("image_key").take(take).to_pylist()
        info = formats.write_drop_list(out.info, pa.table({
            "row": pa.array(lost, pa.int64()), "uid": uids, "reason": reasons}))
        yield ShardOut(info, out.fields)
        letters = pa.table({
            "uid": uids, "reason": reasons,
            "detail": [_DETAILS[r].format(image=i[:16]) for r, i in zip(reasons, images)],
            "source_location": keys.column("source_location").take(take)})
        dead = formats.write_shard(formats.join_url(self._output, DEAD_LETTER_DIR),
                                   shard_id + DUP_SUFFIX, letters,
                                   schema=formats.DEAD_LETTER_SCHEMA)
        yield beam.pvalue.TaggedOutput("dead", ShardOut(dead, out.fields))
        stats = {}
        for source, reason in zip(keys.column("source").take(take).to_pylist(), reasons):
            Metrics.counter(_NAMESPACE, f"dropped_{reason}").inc()
            s = stats.setdefault(source, {"seen": 0, "ingested": 0, "dead_lettered": 0,
                                          "reasons": {}})
            s["ingested"] -= 1
            s["dead_lettered"] += 1
            s["reasons"][reason] = s["reasons"].get(reason, 0) + 1
        yield beam.pvalue.TaggedOutput("stats", stats)


class DropDuplicates(beam.PTransform):
    """(new key tables, existing key tables, new corpus ShardOuts) -> (ShardOuts with drop
    lists, dead-letter ShardOuts, stats deltas). See the module docstring."""

    def __init__(self, *, output: str, mode: str = "image", rows_per_group: int = 1 << 20,
                 hot_key_fanout: int = 8):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"dedup mode {mode!r} not in {MODES}")
        self._output, self._mode = output, mode
        self._rows_per_group, self._fanout = rows_per_group, hot_key_fanout

    def expand(self, inputs):
        new_keys, old_keys, shards = inputs
        records = ((new_keys | "New" >> beam.Map(_in_flight, 1),
                    old_keys | "Existing" >> beam.Map(_in_flight, 0))
                   | "AllKeys" >> beam.Flatten())
        won = []
        for stage, (key, _) in enumerate(_STAGES[:_STAGES_OF_MODE[self._mode]], start=1):
            records = records | f"Stage{stage}" >> _Stage(key, self._rows_per_group,
                                                          self._fanout)
            won.append(records | f"ByShard{stage}" >> beam.FlatMap(_by_shard, stage))
        applied = ((shards | "KeyShards" >> beam.Map(_shard_key), *won)
                   | "AllDecisions" >> beam.Flatten()
                   | "GroupByShard" >> beam.GroupByKey()
                   | "Apply" >> beam.ParDo(_ApplyToShard(self._output, len(won)))
                   .with_outputs("dead", "stats", main="shards"))
        return applied.shards, applied.dead, applied.stats


def read_existing_keys(shard: formats.ShardInfo, *, output: str) -> pa.Table:
    """The stored keys of a committed corpus shard, without the rows its drop list removes."""
    keys = formats.read_shard(formats.join_url(output, KEYS_DIR, f"{shard.shard_id}.parquet"),
                              schema=KEYS_SCHEMA)
    dropped = formats.dropped_rows(shard)
    if dropped is not None and len(dropped):
        keep = np.ones(keys.num_rows, bool)
        keep[dropped] = False
        keys = keys.filter(pa.array(keep))
    return keys.replace_schema_metadata(None)
