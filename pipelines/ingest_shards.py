"""Ingest units: one piece of one input, read, validated and written as its own shards;
and the commit that makes the written shards one dataset.

A *unit* is what one DoFn call reads: a tar (webdataset, img2dataset), a parquet row
group, or a chunk of a folder's listing. Its rows are validated and written by that
same call, in input order, as corpus shards of at most `rows_per_shard` rows and
`max_shard_bytes` bytes, with ids derived from (source, unit name):

    OUTPUT/<unit id>-<k>.parquet              CORPUS_SCHEMA rows, k = 0000, 0001, ...
    OUTPUT/_keys/<unit id>-<k>.parquet        INGEST_KEYS_SCHEMA: uid + digests per row
    OUTPUT/_dead_letter/<unit id>-<k>.parquet the unit's rejected examples

where unit id = 24 hex digits of blake2b("ingest-unit", source, unit name) and the
unit name is the input-relative path (plus `#rg=N` for a parquet row group, the first
and last item for a folder chunk). So image bytes never cross a shuffle, and a shard
depends on its unit alone: rerunning, or adding other inputs, rewrites identical bytes
under identical ids. Only the key records (`_keys`, ~150 bytes a row) go on to dedup.
"""
from typing import Iterable, List, NamedTuple

import apache_beam as beam
import fsspec
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from jest_curate import formats, hashing
from pipelines import dedup, faults, validate
from pipelines.corpus_io import DEAD_LETTER_DIR, KEYS_DIR, ShardOut

__all__ = ["Unit", "unit_name", "unit_id", "ShardSplitter", "ShardOut", "IngestUnit",
           "existing_units", "index_fields", "merge_stats", "commit", "KEYS_DIR",
           "DEAD_LETTER_DIR", "MAX_SHARD_BYTES"]

MAX_SHARD_BYTES = 256 << 20
_NAMESPACE = "jest_curate.ingest"


class Unit(NamedTuple):
    """One unit of work: input index, the reader's item, and its stable name."""
    index: int
    item: object
    name: str


def unit_name(fmt: str, item) -> str:
    """The unit's name: relative to its input, so the same data anywhere has the same ids."""
    if fmt == "parquet":
        rel, rg = item[1], item[2]
        return f"{rel}#rg={rg}" if rg >= 0 else f"{rel}#footer"
    if fmt == "folder":
        def where(it):
            return it.rel if it.csv_line is None else f"{it.rel}:{it.csv_line}"
        return f"{where(item[0])}..{where(item[-1])}#{len(item)}"
    return item.rel  # webdataset, img2dataset


def unit_id(source: str, name: str) -> str:
    return hashing.blake2b_fields("ingest-unit", source, name, digest_size=12).hex()


def _row_bytes(table: pa.Table) -> List[int]:
    """Stored size of each row, roughly: image plus every string."""
    sizes = [0] * table.num_rows
    for name in ("image", "caption", "uid", "source_location", "url", "license"):
        for i, v in enumerate(table.column(name).to_pylist()):
            sizes[i] += len(v) if v is not None else 0
    return sizes


class ShardSplitter:
    """Cuts a stream of tables into pieces of <= max_rows rows and <= max_bytes bytes."""

    def __init__(self, *, max_rows: int, max_bytes: int):
        self._max_rows, self._max_bytes = max_rows, max_bytes
        self._pending, self._rows, self._bytes = [], 0, 0

    def add(self, table: pa.Table) -> Iterable[pa.Table]:
        start = 0
        for i, size in enumerate(_row_bytes(table)):
            if self._rows and (self._rows + 1 > self._max_rows
                               or self._bytes + size > self._max_bytes):
                self._pending.append(table.slice(start, i - start))
                start = i
                yield self._take()
            self._rows += 1
            self._bytes += size
        if start < table.num_rows:
            self._pending.append(table.slice(start))

    def close(self) -> Iterable[pa.Table]:
        if self._rows:
            yield self._take()

    def _take(self) -> pa.Table:
        out = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._rows, self._bytes = [], 0, 0
        return out


class _Blocklist:
    """Holder for the shared blocklist (`shared.Shared` needs a weak-referenceable object)."""

    def __init__(self, entries: frozenset):
        self.entries = entries


class IngestUnit(beam.DoFn):
    """Unit -> its corpus, keys and dead-letter shards (written here), plus tagged outputs:
    main: ShardOut of corpus shards; "keys": key tables; "dead": ShardOut; "stats": dict."""

    def __init__(self, cfg, readers: dict):
        self._cfg = cfg  # pipelines.ingest.IngestConfig
        self._readers = readers
        self._shared = shared.Shared()
        self._blocklist = frozenset()

    def setup(self):
        blocklist = self._cfg.blocklist
        # One copy per worker process, however many DoFn instances the runner makes.
        self._blocklist = self._shared.acquire(
            lambda: _Blocklist(validate.read_blocklist(blocklist)),
            tag=f"blocklist:{blocklist}").entries

    def process(self, unit: Unit):
        cfg, read_cfg = self._cfg, self._cfg.inputs[unit.index]
        faults.maybe_fail("ingest.read", (unit.index, unit.item))
        base = unit_id(read_cfg.source, unit.name)
        fields = {"source": read_cfg.source, "unit": unit.name}
        splitter = ShardSplitter(max_rows=cfg.rows_per_shard, max_bytes=cfg.max_shard_bytes)
        dead, totals, shards = [], {}, 0
        for examples in self._readers[read_cfg.format].read(unit.item, read_cfg):
            corpus, letters, stats = validate.validate_examples(
                examples, source=read_cfg.source, blocklist=self._blocklist,
                max_image_bytes=cfg.max_image_bytes, max_caption_chars=cfg.max_caption_chars)
            _add(totals, stats)
            if letters.num_rows:
                dead.append(letters)
            for table in splitter.add(pa.Table.from_batches([corpus]) if isinstance(
                    corpus, pa.RecordBatch) else corpus):
                yield from self._write(f"{base}-{shards:04d}", table, fields)
                shards += 1
        for table in splitter.close():
            yield from self._write(f"{base}-{shards:04d}", table, fields)
            shards += 1
        if dead:
            letters = pa.concat_tables([pa.Table.from_batches([d]) if isinstance(
                d, pa.RecordBatch) else d for d in dead])
            for k, start in enumerate(range(0, letters.num_rows, cfg.rows_per_shard)):
                info = formats.write_shard(
                    formats.join_url(cfg.output, DEAD_LETTER_DIR), f"{base}-{k:04d}",
                    letters.slice(start, cfg.rows_per_shard), schema=formats.DEAD_LETTER_SCHEMA)
                yield beam.pvalue.TaggedOutput("dead", ShardOut(info, fields))
        yield beam.pvalue.TaggedOutput("stats", totals)

    def _write(self, shard_id: str, table: pa.Table, fields: dict):
        root = self._cfg.output
        keys = dedup.dedup_keys(table, shard=shard_id)
        formats.write_shard(formats.join_url(root, KEYS_DIR), shard_id, keys,
                            schema=formats.INGEST_KEYS_SCHEMA)
        info = formats.write_shard(root, shard_id, table, schema=formats.CORPUS_SCHEMA)
        # Committed but not yet acknowledged: a retry must rewrite the same bytes.
        faults.maybe_fail("corpus_io.write_shard", (root, shard_id))
        Metrics.counter(_NAMESPACE, "shards_written").inc()
        yield ShardOut(info, fields)
        yield beam.pvalue.TaggedOutput("keys", keys)


def _add(acc: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(acc.setdefault(key, {}), value)
        else:
            acc[key] = acc.get(key, 0) + value


def merge_stats(parts: Iterable[dict]) -> dict:
    """Sum per-source counters: {source: {seen, ingested, dead_lettered, reasons: {...}}}."""
    out = {}
    for part in parts:
        _add(out, part)
    return out


def existing_units(output: str) -> set:
    """(source, unit name) of every unit an earlier ingest committed into `output`."""
    units = set()
    for root in (output, formats.join_url(output, DEAD_LETTER_DIR)):
        try:
            _, doc = formats.read_index(root, with_doc=True)
        except FileNotFoundError:
            continue
        units.update((e["source"], e["unit"]) for e in doc["shards"] if "unit" in e)
    return units


def index_fields(root: str) -> tuple:
    """(ShardInfos, {shard id: index fields}) of the committed dataset at `root`, or empty."""
    try:
        infos, doc = formats.read_index(root, with_doc=True)
    except FileNotFoundError:
        return [], {}
    keep = ("source", "unit")
    return infos, {e["id"]: {k: e[k] for k in keep if k in e} for e in doc["shards"]}


def _prune(root: str, keep: set, drops: frozenset = frozenset()) -> int:
    """Remove shard files under `root` that the new index does not name (earlier runs'),
    and drop lists of shards that no longer have one (`drops`: ids that do)."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return 0
    stale, removed = set(), 0
    for name in fs.ls(path, detail=False):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("_"):
            continue
        for suffix in (".parquet.commit", ".drop.parquet", ".parquet"):
            if base.endswith(suffix):
                shard_id = base[:-len(suffix)]
                if shard_id not in keep:
                    stale.add(shard_id)
                elif suffix == ".drop.parquet" and shard_id not in drops:
                    fs.rm(name)
                    removed += 1
                break
    for shard_id in sorted(stale):
        formats.remove_shard(root, shard_id)
    return removed + len(stale)


def commit(by_source: dict, written: list, cfg) -> dict:
    """Ingest's last step: checks the counts against the shards, removes earlier runs'
    leftovers, writes both indexes, then stats.json. `written`: (dataset, ShardOut)s."""
    corpus = [out for dataset, out in written if dataset == "corpus"]
    dead = [out for dataset, out in written if dataset == "dead"]
    output = cfg.output
    dead_root = formats.join_url(output, DEAD_LETTER_DIR)
    previous = formats.read_json(formats.join_url(output, "stats.json")) if cfg.append else {}
    if cfg.append:  # The corpus grows: its shards, entries and counts stay as they were.
        old, old_fields = index_fields(output)
        old_dead, old_dead_fields = index_fields(dead_root)
        corpus = [ShardOut(i, old_fields.get(i.shard_id, {})) for i in old] + corpus
        dead = [ShardOut(i, old_dead_fields.get(i.shard_id, {})) for i in old_dead] + dead
        by_source = merge_stats([previous.get("by_source", {}), by_source])
    reasons = {}
    for source, c in by_source.items():
        if c["ingested"] + c["dead_lettered"] != c["seen"]:
            raise RuntimeError(f"ingest lost examples of {source}: {c}")
        for reason, n in c["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    stats = {name: sum(c[name] for c in by_source.values())
             for name in ("seen", "ingested", "dead_lettered")}
    written = (sum(o.info.num_rows for o in corpus), sum(o.info.num_rows for o in dead))
    if written != (stats["ingested"], stats["dead_lettered"]):
        raise RuntimeError(f"ingest lost examples: counted {stats}, wrote {written} rows")
    keep = {o.info.shard_id for o in corpus}
    drops = frozenset(o.info.shard_id for o in corpus if o.info.drop_sha256)
    pruned = (_prune(output, keep, drops) + _prune(formats.join_url(output, KEYS_DIR), keep)
              + _prune(dead_root, {o.info.shard_id for o in dead}))
    Metrics.counter(_NAMESPACE, "stale_shards_removed").inc(pruned)
    writer = "jest-curate ingest"
    formats.write_index(dead_root, [o.info for o in dead], writer=writer,
                        fields={o.info.shard_id: o.fields for o in dead})
    formats.write_index(output, [o.info for o in corpus], writer=writer,
                        fields={o.info.shard_id: o.fields for o in corpus})
    inputs = [{"input": c.input, "format": c.format, "source": c.source} for c in cfg.inputs]
    stats.update({
        "reasons": dict(sorted(reasons.items())), "by_source": by_source,
        "inputs": previous.get("inputs", []) + inputs, "output": output,
        "dedup": cfg.dedup, "blocklist": cfg.blocklist,
        "appends": previous.get("appends", -1) + 1 if cfg.append else 0,
        "num_shards": len(corpus), "num_dead_letter_shards": len(dead),
        "index": formats.INDEX})
    formats.write_json_atomic(formats.join_url(output, "stats.json"), stats)
    return stats
