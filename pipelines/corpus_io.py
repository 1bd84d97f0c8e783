"""Beam transforms for sharded canonical parquet (layout and commit markers: formats.py).

    shards = p | ReadCorpus(url, batch_size=256)           # (shard_id, pa.RecordBatch)
    keyed = batches | AssignShards(rows_per_shard=2048)     # (shard_id, pa.RecordBatch)
    infos = keyed | WriteCorpus(url)                        # formats.ShardInfo per shard

Shard assignment is deterministic: `AssignShards` puts a row in shard
`hash_u64("shard", key) % num_shards` (key = the row's uid), with `num_shards` fixed or
derived from the total row count, named `00003-of-00008`. `WriteCorpus` takes any
`(shard_id, batch)` pairs (callers may key rows themselves, e.g. by corpus shard), and
sorts each shard by its sort columns then every other column, so a shard's bytes never
depend on bundle order or on how rows were batched. Committed shards from an earlier run
that this run did not write are removed (`prune_stale`), so a rerun replaces its output.
(Ingest writes its shards where it reads its inputs instead: `pipelines.ingest_shards`;
`AssignShards` buckets its dedup keys.)
"""
import math
from typing import Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from jest_curate import formats, hashing
from pipelines import faults

__all__ = ["ReadCorpus", "AssignShards", "WriteCorpus", "shard_of", "ShardOut", "KEYS_DIR",
           "DEAD_LETTER_DIR"]

_NAMESPACE = "jest_curate.corpus_io"
KEYS_DIR = "_keys"  # Ingest: dedup keys per corpus shard.
DEAD_LETTER_DIR = "_dead_letter"


class ShardOut(NamedTuple):
    """A shard a stage wrote, with the extra fields of its index entry (e.g. its source)."""
    info: formats.ShardInfo
    fields: dict


def shard_of(key: Optional[str], num_shards: int) -> int:
    """The shard index of a row key (None counts as ''), stable across processes."""
    return hashing.hash_u64("shard", key or "") % num_shards


def _list_committed(root: str) -> list:
    return formats.list_shards(root)


class _ReadShardBatches(beam.DoFn):
    """One committed shard -> record batches in row order, checked against its marker."""

    def __init__(self, batch_size: int, columns: Optional[Sequence[str]],
                 schema: Optional[pa.Schema], with_offsets: bool):
        self._batch_size = batch_size
        self._columns = list(columns) if columns else None
        self._schema = schema
        self._with_offsets = with_offsets
        self._shards = Metrics.counter(_NAMESPACE, "shards_read")
        self._rows = Metrics.counter(_NAMESPACE, "rows_read")

    def process(self, shard: formats.ShardInfo) -> Iterable:
        if self._schema is not None:
            with fsspec.open(shard.url, "rb") as f:
                got = pq.read_schema(f)
            want = self._schema if self._columns is None else pa.schema(
                [self._schema.field(c) for c in self._columns])
            missing = [(f.name, f.type) for f in want if got.get_field_index(f.name) < 0
                       or got.field(f.name).type != f.type]
            if missing:
                raise formats.FormatError(f"{shard.url}: lacks or mistypes columns {missing}")
        offset = 0
        for batch in formats.iter_shard_batches(shard, batch_size=self._batch_size,
                                                columns=self._columns):
            yield (shard.shard_id, offset, batch) if self._with_offsets else (shard.shard_id, batch)
            offset += batch.num_rows
        if offset != shard.num_rows:
            raise formats.FormatError(f"{shard.url}: read {offset} rows, its commit marker "
                                      f"says {shard.num_rows}")
        self._shards.inc()
        self._rows.inc(offset)


class ReadCorpus(beam.PTransform):
    """Committed shards of a sharded parquet dataset as `(shard_id, pa.RecordBatch)`.

    Shards are listed when the pipeline runs, on a worker, from the dataset's index
    (`formats.list_shards`), and read in parallel without the rows of their drop lists;
    batches hold at most `batch_size` rows and come in row order within a shard. `with_offsets=True`
    yields `(shard_id, first_row, batch)` so a later stage can restore row order.
    `schema` (optional) is checked against every shard before it is read.
    """

    def __init__(self, root: str, *, batch_size: int = 256,
                 columns: Optional[Sequence[str]] = None, schema: Optional[pa.Schema] = None,
                 with_offsets: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._root = root
        self._read = _ReadShardBatches(batch_size, columns, schema, with_offsets)

    def expand(self, pbegin):
        return (pbegin
                | "Root" >> beam.Create([self._root])
                | "ListShards" >> beam.FlatMap(_list_committed)
                | "Spread" >> beam.Reshuffle()
                | "ReadBatches" >> beam.ParDo(self._read))


def _split_by_shard(batch, num_shards: int, key_column: str) -> Iterable:
    if batch.num_rows == 0:
        return
    keys = batch.column(key_column).to_pylist()
    buckets = [shard_of(k, num_shards) for k in keys]
    rows_by_bucket = {}
    for row, bucket in enumerate(buckets):
        rows_by_bucket.setdefault(bucket, []).append(row)
    for bucket in sorted(rows_by_bucket):
        shard_id = f"{bucket:05d}-of-{num_shards:05d}"
        yield shard_id, batch.take(pa.array(rows_by_bucket[bucket], pa.int64()))


def _num_rows(batch) -> int:
    return batch.num_rows


def _num_shards(total_rows: int, rows_per_shard: int) -> int:
    return max(1, math.ceil(total_rows / rows_per_shard))


class AssignShards(beam.PTransform):
    """`pa.RecordBatch`es -> `(shard_id, batch)` with rows bucketed by a hash of `key_column`.

    Give `num_shards`, or `rows_per_shard` to derive it from the total row count
    (one extra pass over batch sizes, no data).
    """

    def __init__(self, *, num_shards: Optional[int] = None, rows_per_shard: Optional[int] = None,
                 key_column: str = "uid"):
        super().__init__()
        if (num_shards is None) == (rows_per_shard is None):
            raise ValueError("give exactly one of num_shards and rows_per_shard")
        if (num_shards or rows_per_shard) < 1:
            raise ValueError("num_shards / rows_per_shard must be >= 1")
        self._num_shards = num_shards
        self._rows_per_shard = rows_per_shard
        self._key_column = key_column

    def expand(self, batches):
        if self._num_shards is not None:
            return batches | "Split" >> beam.FlatMap(_split_by_shard, self._num_shards,
                                                     self._key_column)
        num_shards = (batches
                      | "CountRows" >> beam.Map(_num_rows)
                      | "Total" >> beam.CombineGlobally(sum)
                      | "NumShards" >> beam.Map(_num_shards, self._rows_per_shard))
        return batches | "Split" >> beam.FlatMap(
            _split_by_shard, beam.pvalue.AsSingleton(num_shards), self._key_column)


def _sorted_table(batches: Sequence, sort_by: Sequence[str], schema: pa.Schema) -> pa.Table:
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in batches]
    table = pa.concat_tables([t.select(schema.names).replace_schema_metadata(None)
                              for t in tables])
    # Every other sortable column breaks ties, so equal keys cannot expose input order.
    orderable = [f.name for f in schema if f.name not in sort_by and not pa.types.is_nested(f.type)]
    return table.sort_by([(name, "ascending") for name in list(sort_by) + orderable])


class _WriteShard(beam.DoFn):
    def __init__(self, root: str, schema: pa.Schema, sort_by: Sequence[str],
                 metadata: Optional[dict]):
        self._root = root
        self._schema = schema
        self._sort_by = tuple(sort_by)
        self._metadata = metadata
        self._shards = Metrics.counter(_NAMESPACE, "shards_written")
        self._rows = Metrics.counter(_NAMESPACE, "rows_written")

    def process(self, element) -> Iterable[formats.ShardInfo]:
        shard_id, batches = element
        table = _sorted_table(list(batches), self._sort_by, self._schema)
        info = formats.write_shard(self._root, shard_id, table, schema=self._schema,
                                   metadata=self._metadata)
        # Committed but not yet acknowledged: a retry must rewrite the same bytes.
        faults.maybe_fail("corpus_io.write_shard", (self._root, shard_id))
        self._shards.inc()
        self._rows.inc(info.num_rows)
        yield info


def _prune_stale(written: list, root: str) -> list:
    """Uncommit and delete committed shards this run did not write; returns `written` sorted."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)  # An empty dataset is an empty committed directory.
    keep = {info.shard_id for info in written}
    stale = [s.shard_id for s in formats.list_shards(root, allow_incomplete=True)
             if s.shard_id not in keep]
    for shard_id in stale:
        formats.remove_shard(root, shard_id)
    Metrics.counter(_NAMESPACE, "stale_shards_removed").inc(len(stale))
    return sorted(written, key=lambda info: info.shard_id)


class WriteCorpus(beam.PTransform):
    """`(shard_id, pa.RecordBatch | pa.Table)` -> one committed shard per id; yields ShardInfo.

    All rows of a shard are gathered on one worker, sorted by `sort_by` (then by every
    other column) and written with `formats.write_shard`, so equal inputs give
    byte-identical shards. With `prune_stale`, shards under `root` from an earlier run
    that this run did not write are removed before the ShardInfos are emitted.
    """

    def __init__(self, root: str, *, schema: pa.Schema = formats.CORPUS_SCHEMA,
                 sort_by: Sequence[str] = ("uid",), prune_stale: bool = True,
                 metadata: Optional[dict] = None):
        super().__init__()
        missing = [c for c in sort_by if c not in schema.names]
        if missing:
            raise ValueError(f"sort_by columns {missing} are not in the schema")
        self._root = root
        self._write = _WriteShard(root, schema, sort_by, metadata)
        self._prune_stale = prune_stale

    def expand(self, keyed_batches):
        infos = (keyed_batches
                 | "GroupByShard" >> beam.GroupByKey()
                 | "WriteShard" >> beam.ParDo(self._write))
        if not self._prune_stale:
            return infos
        return (infos
                | "AllWritten" >> beam.combiners.ToList()
                | "PruneStale" >> beam.FlatMap(_prune_stale, self._root))
