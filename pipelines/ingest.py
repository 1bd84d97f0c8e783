"""`jest-curate ingest`: raw image-text data -> canonical corpus shards, as a Beam pipeline.

    jest-curate ingest --input URL --format parquet|folder --output URL [--source NAME]
        [--caption-column caption --image-column image --uid-column C --url-column C
         --license-column C] [--captions-csv URL] [beam options, e.g. --runner]

Formats
  parquet  a file, a directory of *.parquet or a glob; the image column holds bytes
           (or a struct with a `bytes` field, as Hugging Face datasets store images).
  folder   images (recursively) with `.txt` sidecars of the same stem, or a captions CSV
           (--captions-csv, default INPUT/captions.csv if present) whose --image-column
           holds paths relative to INPUT and --caption-column the caption.

Each format is a reader turning one work item (a parquet row group, a list of files)
into `RawExample`s; validation (pipelines/validate.py), shard assignment and writing
are shared. Outputs under OUTPUT:

    <shard>.parquet(+.commit)    CORPUS_SCHEMA, rows bucketed by uid hash, sorted by uid
    _dead_letter/                DEAD_LETTER_SCHEMA: every rejected example with its reason
    stats.json                   seen / ingested / dead_lettered, per reason and per source;
                                 written last, after both writes, as the completion marker

uids: --uid-column values (must be [A-Za-z0-9_-]{1,128}) or 32 hex digits of
blake2b("ingest", source, path relative to INPUT, row or CSV line), stable across reruns.
An unreadable input file is one dead letter (`unreadable_input`).
"""
import argparse
import csv
import dataclasses
import logging
import re
from typing import Iterable, List, NamedTuple, Optional

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from jest_curate import formats, hashing
from pipelines import validate
from pipelines.corpus_io import AssignShards, WriteCorpus

__all__ = ["IngestConfig", "RawExample", "IngestCorpus", "validate_examples", "merge_stats",
           "work_items", "run", "main"]

_NAMESPACE = "jest_curate.ingest"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    input: str
    output: str
    format: str
    source: str
    caption_column: str = "caption"
    image_column: str = "image"
    uid_column: Optional[str] = None
    url_column: Optional[str] = None
    license_column: Optional[str] = None
    captions_csv: Optional[str] = None
    batch_size: int = 256
    rows_per_shard: int = 2048
    max_caption_chars: int = validate.MAX_CAPTION_CHARS

    def __post_init__(self):
        if self.format not in _READERS:
            raise ValueError(f"unknown --format {self.format!r}; expected one of "
                             f"{sorted(_READERS)}")
        if not validate.is_valid_uid(self.source):
            raise ValueError(f"--source {self.source!r}: use 1-128 of [A-Za-z0-9_-]")
        if self.batch_size < 1 or self.rows_per_shard < 1 or self.max_caption_chars < 1:
            raise ValueError("batch size, rows per shard and max caption chars must be >= 1")


@dataclasses.dataclass
class RawExample:
    """One candidate example as a reader found it, before validation."""
    source_location: str
    uid: Optional[str] = None
    image: Optional[bytes] = None
    caption: object = None  # str | bytes | None
    url: Optional[str] = None
    license: Optional[str] = None
    rejection: Optional[validate.Rejection] = None  # Set by the reader (e.g. missing file).


def _derived_uid(source: str, *where) -> str:
    return hashing.blake2b_fields("ingest", source, *where).hex()


def _optional_str(value) -> Optional[str]:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- #
# Readers: work items (built by the launcher) -> RawExamples
# --------------------------------------------------------------------------- #

def _columns(cfg: IngestConfig) -> list:
    """The input columns the configuration names (image, caption, then optional ones)."""
    return [c for c in (cfg.image_column, cfg.caption_column, cfg.uid_column, cfg.url_column,
                        cfg.license_column) if c]


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]


def _parquet_work(cfg: IngestConfig) -> list:
    """[(file url, path relative to INPUT)] of the parquet input, checking its columns."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if any(ch in cfg.input for ch in "*?["):
        paths, root = fs.glob(root), re.split(r"[*?\[]", root)[0].rsplit("/", 1)[0]
    elif fs.isdir(root):
        paths = [p for p in fs.find(root) if p.endswith(".parquet")
                 and not p.rsplit("/", 1)[-1].startswith(("_", "."))]
    else:
        paths, root = ([root] if fs.exists(root) else []), root.rsplit("/", 1)[0]
    if not paths:
        raise FileNotFoundError(f"no parquet files at {cfg.input}")
    with fs.open(sorted(paths)[0], "rb") as f:
        names = pq.read_schema(f).names
    missing = [c for c in _columns(cfg) if c not in names]
    if missing:
        raise ValueError(f"{sorted(paths)[0]}: no column(s) {missing}; it has {names}. "
                         "Set --image-column/--caption-column/... to match.")
    return [(fs.unstrip_protocol(p), _relative(p, root)) for p in sorted(paths)]


def _parquet_row_groups(item, cfg: IngestConfig) -> Iterable:
    """(url, rel) -> (url, rel, row group, first row) so large files read in parallel."""
    url, rel = item
    try:
        with fsspec.open(url, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as e:
        yield url, rel, -1, f"{type(e).__name__}: {e}", 0
        return
    names = meta.schema.to_arrow_schema().names
    missing = [c for c in _columns(cfg) if c not in names]
    if missing:  # A configuration error, not bad data: stop with a clear message.
        raise ValueError(f"{url}: no column(s) {missing}; it has {names}")
    first = 0
    for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        yield url, rel, rg, first, rows
        first += rows


def _image_values(column: pa.Array) -> list:
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise formats.FormatError(f"image column has type {column.type}; expected binary or "
                                  "a struct with a 'bytes' field")
    return column.to_pylist()


def _parquet_examples(batch: pa.RecordBatch, first: int, url: str, rel: str,
                      cfg: IngestConfig) -> List[RawExample]:
    images = _image_values(batch.column(cfg.image_column))
    captions = batch.column(cfg.caption_column).to_pylist()
    optional = {k: batch.column(c).to_pylist() if c else [None] * batch.num_rows
                for k, c in (("uid", cfg.uid_column), ("url", cfg.url_column),
                             ("license", cfg.license_column))}
    return [RawExample(f"{url}#row={first + i}", image=images[i], caption=captions[i],
                       uid=(_optional_str(optional["uid"][i]) if cfg.uid_column
                            else _derived_uid(cfg.source, rel, first + i)),
                       url=_optional_str(optional["url"][i]),
                       license=_optional_str(optional["license"][i]))
            for i in range(batch.num_rows)]


def _read_parquet(item, cfg: IngestConfig) -> Iterable[List[RawExample]]:
    url, rel, rg, first, num_rows = item
    if rg < 0:  # The file's footer could not be read (`first` holds the error): one letter.
        yield [RawExample(url, rejection=validate.Rejection("unreadable_input", first))]
        return
    columns = _columns(cfg)
    row, end = first, first + num_rows
    try:
        with fsspec.open(url, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=cfg.batch_size,
                                                        row_groups=[rg], columns=columns):
                examples = _parquet_examples(batch, row, url, rel, cfg)
                row += batch.num_rows
                yield examples
    except (pa.ArrowInvalid, OSError) as e:  # Corrupt pages: the rest of the group is lost.
        rejection = validate.Rejection("unreadable_input",
                                       f"row group {rg}: {type(e).__name__}: {e}")
        yield [RawExample(f"{url}#row={r}", rejection=rejection) for r in range(row, end)]


def _read_csv(url: str) -> list:
    with fsspec.open(url, "r", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


class _FolderItem(NamedTuple):
    image_url: Optional[str]  # None: the caption names a file that does not exist.
    rel: str  # Image path relative to INPUT.
    where: str  # source_location: the image, the orphan sidecar, or the CSV line.
    caption: Optional[str] = None  # From the CSV.
    sidecar_url: Optional[str] = None
    csv_row: Optional[dict] = None  # Raw CSV row for uid / url / license columns.
    csv_line: Optional[int] = None


def _folder_work(cfg: IngestConfig) -> list:
    """Chunks of `_FolderItem`s: images with their sidecar or CSV caption, and orphans."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no folder at {cfg.input}")
    files = sorted(fs.find(root))
    images = {p for p in files if p.lower().endswith(_IMAGE_EXTENSIONS)}
    url = fs.unstrip_protocol
    csv_url = cfg.captions_csv
    if csv_url is None and fs.exists(f"{root}/captions.csv"):
        csv_url = url(f"{root}/captions.csv")
    items, referenced = [], set()
    if csv_url is not None:
        rows = _read_csv(csv_url)
        header = list(rows[0]) if rows else []
        for c in _columns(cfg):
            if rows and c not in header:
                raise ValueError(f"{csv_url}: no column {c!r}; it has {header}")
        for line, row in enumerate(rows, start=2):  # Line 1 is the header.
            path = f"{root}/{(row.get(cfg.image_column) or '').strip().lstrip('/')}"
            referenced.add(path)
            found = path in images or fs.isfile(path)  # Any file: validation says what is wrong.
            items.append(_FolderItem(url(path) if found else None, _relative(path, root),
                                     f"{csv_url}:{line}", caption=row.get(cfg.caption_column),
                                     csv_row=row, csv_line=line))
    else:
        sidecars = {p[:-len(".txt")] for p in files if p.endswith(".txt")}
        for path in sorted(images):
            stem = path.rsplit(".", 1)[0]
            referenced.add(path)
            items.append(_FolderItem(url(path), _relative(path, root), url(path),
                                     sidecar_url=url(stem + ".txt") if stem in sidecars else None))
        for stem in sorted(sidecars - {p.rsplit(".", 1)[0] for p in images}):
            items.append(_FolderItem(None, _relative(stem, root), url(stem + ".txt"),
                                     sidecar_url=url(stem + ".txt")))
    for path in sorted(images - referenced):  # Images the CSV never mentions have no caption.
        items.append(_FolderItem(url(path), _relative(path, root), url(path)))
    return [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]


def _read_folder(chunk: List[_FolderItem], cfg: IngestConfig) -> Iterable[List[RawExample]]:
    examples = []
    for item in chunk:
        row = item.csv_row or {}
        where = (item.rel,) if item.csv_line is None else (item.rel, item.csv_line)
        ex = RawExample(item.where, caption=item.caption,
                        uid=row.get(cfg.uid_column) if cfg.uid_column else _derived_uid(
                            cfg.source, *where),
                        url=row.get(cfg.url_column) or None if cfg.url_column else None,
                        license=row.get(cfg.license_column) or None if cfg.license_column else None)
        if item.image_url is None:
            ex.rejection = validate.Rejection("missing_image", f"no image file for {item.rel}")
        elif item.sidecar_url is None and item.csv_line is None:
            ex.rejection = validate.Rejection("missing_caption",
                                              f"no .txt sidecar or CSV row for {item.rel}")
        else:
            try:
                with fsspec.open(item.image_url, "rb") as f:
                    ex.image = f.read()
                if item.sidecar_url is not None:
                    with fsspec.open(item.sidecar_url, "rb") as f:
                        ex.caption = f.read()
            except FileNotFoundError as e:  # Deleted between listing and reading.
                ex.rejection = validate.Rejection("missing_image", f"disappeared: {e}")
        examples.append(ex)
    yield examples


def _whole(item, cfg: IngestConfig) -> Iterable:
    yield item


# format -> (list work items at launch, split them in the pipeline, read one).
_READERS = {"parquet": (_parquet_work, _parquet_row_groups, _read_parquet),
            "folder": (_folder_work, _whole, _read_folder)}


# --------------------------------------------------------------------------- #
# Shared: validate, split into corpus rows and dead letters, count
# --------------------------------------------------------------------------- #

def _problem(ex: RawExample, max_caption_chars: int) -> Optional[validate.Rejection]:
    return (ex.rejection or validate.uid_problem(ex.uid) or validate.image_problem(ex.image)
            or validate.caption_problem(ex.caption, max_chars=max_caption_chars))


def validate_examples(examples: List[RawExample], *, source: str, max_caption_chars: int):
    """(corpus pa.RecordBatch, dead-letter pa.RecordBatch, stats dict) of one reader batch."""
    rows = {name: [] for name in formats.CORPUS_SCHEMA.names}
    dead = {name: [] for name in formats.DEAD_LETTER_SCHEMA.names}
    reasons = {}
    for ex in examples:
        problem = _problem(ex, max_caption_chars)
        if problem is not None:
            reasons[str(problem)] = reasons.get(str(problem), 0) + 1
            for name, value in (("uid", ex.uid if validate.is_valid_uid(ex.uid) else None),
                                ("reason", str(problem)), ("detail", problem.detail[:1000]),
                                ("source_location", ex.source_location)):
                dead[name].append(value)
            continue
        values = {"uid": ex.uid, "image": bytes(ex.image),
                  "image_format": validate.image_format(bytes(ex.image)),
                  "caption": validate.clean_caption(ex.caption), "source": source,
                  "source_location": ex.source_location, "url": ex.url, "license": ex.license}
        for name, value in values.items():
            rows[name].append(value)
    corpus = pa.RecordBatch.from_pydict(rows, schema=formats.CORPUS_SCHEMA)
    dead_letters = pa.RecordBatch.from_pydict(dead, schema=formats.DEAD_LETTER_SCHEMA)
    stats = {source: {"seen": len(examples), "ingested": corpus.num_rows,
                      "dead_lettered": dead_letters.num_rows, "reasons": reasons}}
    return corpus, dead_letters, stats


class _ReadAndValidate(beam.DoFn):
    def __init__(self, cfg: IngestConfig):
        self._cfg = cfg
        self._read = _READERS[cfg.format][2]

    def process(self, item):
        for examples in self._read(item, self._cfg):
            corpus, dead, stats = validate_examples(
                examples, source=self._cfg.source, max_caption_chars=self._cfg.max_caption_chars)
            counts = stats[self._cfg.source]
            for name in ("seen", "ingested", "dead_lettered"):
                Metrics.counter(_NAMESPACE, name).inc(counts[name])
            for reason, n in counts["reasons"].items():
                Metrics.counter(_NAMESPACE, f"dropped_{reason}").inc(n)
            yield corpus, dead, stats


def merge_stats(parts: Iterable[dict]) -> dict:
    """Sum per-source counters: {source: {seen, ingested, dead_lettered, reasons: {...}}}."""
    out = {}
    for part in parts:
        for source, c in part.items():
            acc = out.setdefault(source, {"seen": 0, "ingested": 0, "dead_lettered": 0,
                                          "reasons": {}})
            for name in ("seen", "ingested", "dead_lettered"):
                acc[name] += c[name]
            for reason, n in c["reasons"].items():
                acc["reasons"][reason] = acc["reasons"].get(reason, 0) + n
    return out


def _corpus_part(result):
    if result[0].num_rows:
        yield result[0]


def _dead_part(result):
    if result[1].num_rows:
        yield result[1]


def _stats_part(result):
    return result[2]


def _write_stats(by_source: dict, corpus_infos: list, dead_infos: list, cfg: IngestConfig) -> dict:
    """Totals plus shard lists; refuses to write counts the shards do not bear out."""
    reasons = {}
    for c in by_source.values():
        for reason, n in c["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    stats = {name: sum(c[name] for c in by_source.values())
             for name in ("seen", "ingested", "dead_lettered")}
    written = (sum(i.num_rows for i in corpus_infos), sum(i.num_rows for i in dead_infos))
    if stats["ingested"] + stats["dead_lettered"] != stats["seen"] or written != (
            stats["ingested"], stats["dead_lettered"]):
        raise RuntimeError(f"ingest lost examples: counted {stats}, wrote {written} rows")
    stats.update({
        "reasons": dict(sorted(reasons.items())), "by_source": by_source,
        "input": cfg.input, "format": cfg.format, "output": cfg.output,
        "shards": {i.shard_id: {"rows": i.num_rows, "sha256": i.sha256}
                   for i in sorted(corpus_infos, key=lambda i: i.shard_id)},
        "dead_letter_shards": {i.shard_id: {"rows": i.num_rows, "sha256": i.sha256}
                               for i in sorted(dead_infos, key=lambda i: i.shard_id)}})
    formats.write_json_atomic(formats.join_url(cfg.output, "stats.json"), stats)
    return stats


class IngestCorpus(beam.PTransform):
    """Work items of one format -> corpus shards, dead letters and stats.json under OUTPUT.

    Apply to a PCollection of the format's work items (see `work_items`); returns the
    PCollection holding the stats dict written to OUTPUT/stats.json.
    """

    def __init__(self, cfg: IngestConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, work):
        cfg = self._cfg
        results = (work
                   | "Split" >> beam.FlatMap(_READERS[cfg.format][1], cfg)
                   | "Spread" >> beam.Reshuffle()
                   | "ReadAndValidate" >> beam.ParDo(_ReadAndValidate(cfg)))
        corpus = (results
                  | "CorpusRows" >> beam.FlatMap(_corpus_part)
                  | "AssignCorpusShards" >> AssignShards(rows_per_shard=cfg.rows_per_shard)
                  | "WriteCorpus" >> WriteCorpus(cfg.output))
        dead = (results
                | "DeadLetters" >> beam.FlatMap(_dead_part)
                | "AssignDeadLetterShards" >> AssignShards(rows_per_shard=cfg.rows_per_shard,
                                                           key_column="source_location")
                | "WriteDeadLetters" >> WriteCorpus(formats.join_url(cfg.output, "_dead_letter"),
                                                    schema=formats.DEAD_LETTER_SCHEMA,
                                                    sort_by=("source_location", "reason")))
        return (results
                | "Stats" >> beam.Map(_stats_part)
                | "MergeStats" >> beam.CombineGlobally(merge_stats)
                | "WriteStats" >> beam.Map(_write_stats, beam.pvalue.AsList(corpus),
                                           beam.pvalue.AsList(dead), cfg))


def work_items(cfg: IngestConfig) -> list:
    """The launcher's listing of the input: parquet files, or chunks of folder items."""
    return _READERS[cfg.format][0](cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jest-curate ingest",
                                     description="Ingest image-text data into canonical shards.")
    parser.add_argument("--input", required=True, help="file, directory or glob URL")
    parser.add_argument("--format", required=True, choices=sorted(_READERS))
    parser.add_argument("--output", required=True, help="corpus directory URL")
    parser.add_argument("--source", default=None, help="name of this input (default: its basename)")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--image-column", default="image",
                        help="parquet: image bytes; folder CSV: image path relative to INPUT")
    parser.add_argument("--uid-column", default=None, help="default: uids derived from location")
    parser.add_argument("--url-column", default=None)
    parser.add_argument("--license-column", default=None)
    parser.add_argument("--captions-csv", default=None, help="folder: captions CSV URL")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--max-caption-chars", type=int, default=validate.MAX_CAPTION_CHARS)
    return parser


def run(argv=None, test_pipeline=None) -> dict:
    """Parse flags, list the input, run the pipeline; returns the stats written."""
    args, beam_args = _parser().parse_known_args(argv)
    source = args.source or args.input.rstrip("/").rsplit("/", 1)[-1].split(".")[0] or "input"
    cfg = IngestConfig(
        input=args.input, output=args.output, format=args.format, source=source,
        caption_column=args.caption_column, image_column=args.image_column,
        uid_column=args.uid_column, url_column=args.url_column,
        license_column=args.license_column, captions_csv=args.captions_csv,
        batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
        max_caption_chars=args.max_caption_chars)
    items = work_items(cfg)
    stats_url = formats.join_url(cfg.output, "stats.json")
    if formats.exists(stats_url):  # No stale completion marker while shards are rewritten.
        fs, path = fsspec.core.url_to_fs(stats_url)
        fs.rm(path)
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    with pipeline as p:
        _ = (p
             | "ListInput" >> beam.Create(items, reshuffle=False)
             | "Ingest" >> IngestCorpus(cfg))
    stats = formats.read_json(stats_url)
    logging.info("ingested %d of %d examples (%d dead-lettered) into %s", stats["ingested"],
                 stats["seen"], stats["dead_lettered"], cfg.output)
    return stats


def main(argv=None) -> int:
    """Console entry (`jest-curate ingest`): run and print the counts."""
    stats = run(argv)
    print(f"ingested {stats['ingested']} of {stats['seen']} examples into {stats['output']}; "
          f"dead-lettered {stats['dead_lettered']} {stats['reasons']}")
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(main())
