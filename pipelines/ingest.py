"""`jest-curate ingest`: raw image-text data -> canonical corpus shards, as a Beam pipeline.

    jest-curate ingest --input URL [--input URL ...] --format FORMAT [--format ...]
        --output URL [--source NAME ...] [--blocklist URL] [--dedup image|image-caption|none]
        [--caption-column caption --image-column image --uid-column C --url-column C
         --license-column C] [--captions-csv URL] [beam options, e.g. --runner]

Each --input is one source (named by --source, default its basename; names must
differ), read with its --format (one for all inputs, or one per input):

    parquet      a file, a directory of *.parquet or a glob
    folder       images with .txt sidecars, or a captions CSV
    webdataset   a .tar, a directory of tars or a glob; streamed, never extracted
    img2dataset  img2dataset's output directory (tars + per-shard parquet + _stats.json)

(readers: pipelines/ingest_readers.py and pipelines/tar_stream.py, which also
document the uid rule). Then, for every example: reader problems, uid, blocklist,
image (decodable JPEG/PNG/WebP within byte and pixel limits), caption (non-empty
UTF-8 within --max-caption-chars); then exact duplicates across all inputs
(pipelines/dedup.py). Outputs under OUTPUT (nothing is written anywhere else):

    <shard>.parquet(+.commit)    CORPUS_SCHEMA, rows bucketed by uid hash, sorted by uid
    _dead_letter/                DEAD_LETTER_SCHEMA: every rejected example, its reason
                                 (validate.REASONS) and where it came from
    stats.json                   seen / ingested / dead_lettered, per reason and per source
                                 (ingested + dead_lettered == seen for each); written last,
                                 after both datasets, as the completion marker
"""
import argparse
import dataclasses
import logging
from typing import Callable, Iterable, NamedTuple, Optional

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from jest_curate import formats
from pipelines import dedup, faults, ingest_readers, options, tar_stream, validate
from pipelines.corpus_io import AssignShards, WriteCorpus
from pipelines.ingest_readers import RawExample, ReadConfig

__all__ = ["READERS", "FORMATS", "IngestConfig", "ReadConfig", "RawExample", "IngestCorpus",
           "merge_stats", "work_items", "config_from_args", "run", "main"]

_NAMESPACE = "jest_curate.ingest"


class Reader(NamedTuple):
    """One format: list work items at launch, split and read them in the pipeline."""
    list_items: Callable  # (ReadConfig) -> work items.
    split: Callable  # (item, ReadConfig) -> finer items (e.g. parquet row groups).
    read: Callable  # (item, ReadConfig) -> lists of RawExamples.
    upstream: Optional[Callable] = None  # (item, ReadConfig) -> counts the input reports.


READERS = {
    "parquet": Reader(ingest_readers.parquet_work, ingest_readers.parquet_row_groups,
                      ingest_readers.read_parquet),
    "folder": Reader(ingest_readers.folder_work, ingest_readers.whole, ingest_readers.read_folder),
    "webdataset": Reader(tar_stream.tar_work, ingest_readers.whole, tar_stream.read_tar),
    "img2dataset": Reader(tar_stream.tar_work, ingest_readers.whole, tar_stream.read_tar,
                          tar_stream.img2dataset_upstream),
}
FORMATS = tuple(sorted(READERS))


def _within(inner: str, outer: str) -> bool:
    """Whether URL `inner` is `outer` or below it (same filesystem)."""
    fs_in, path_in = fsspec.core.url_to_fs(inner.split("*")[0])
    fs_out, path_out = fsspec.core.url_to_fs(outer)
    if fs_in.protocol != fs_out.protocol:
        return False
    path_in, path_out = path_in.rstrip("/"), path_out.rstrip("/")
    return path_in == path_out or path_in.startswith(path_out + "/")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    inputs: tuple  # One ReadConfig per input; their sources differ.
    output: str
    rows_per_shard: int = 2048
    max_caption_chars: int = validate.MAX_CAPTION_CHARS
    max_image_bytes: int = validate.MAX_IMAGE_BYTES
    blocklist: Optional[str] = None  # URL of a text file of uids / source URLs to refuse.
    dedup: str = "image"  # dedup.MODES; uid duplicates are always resolved.
    dedup_rows_per_group: int = 1 << 20

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("give at least one --input")
        for read_cfg in self.inputs:
            if read_cfg.format not in READERS:
                raise ValueError(f"unknown --format {read_cfg.format!r}; expected one of "
                                 f"{FORMATS}")
            if _within(self.output, read_cfg.input) or _within(read_cfg.input, self.output):
                raise ValueError(f"--output {self.output} and --input {read_cfg.input} overlap; "
                                 "write the corpus somewhere else")
        sources = [c.source for c in self.inputs]
        if len(set(sources)) != len(sources):
            raise ValueError(f"source names must differ (uids depend on them): {sources}; "
                             "give one --source per --input")
        if self.dedup not in dedup.MODES:
            raise ValueError(f"--dedup {self.dedup!r} not in {dedup.MODES}")
        if min(self.rows_per_shard, self.max_caption_chars, self.max_image_bytes,
               self.dedup_rows_per_group) < 1:
            raise ValueError("rows per shard, max caption chars and max image bytes must be >= 1")


def _count(source: str, counts: dict) -> None:
    """Beam counters mirroring stats.json (dedup passes negative `ingested` deltas)."""
    for namespace in (_NAMESPACE, f"{_NAMESPACE}.source.{source}"):
        for name in ("seen", "ingested", "dead_lettered"):
            Metrics.counter(namespace, name).inc(counts[name])
        for reason, n in counts["reasons"].items():
            Metrics.counter(namespace, f"dropped_{reason}").inc(n)


class _ReadAndValidate(beam.DoFn):
    """(input index, work item) -> (corpus batch, dead-letter batch, stats) per read batch."""

    def __init__(self, cfg: IngestConfig):
        self._cfg = cfg
        self._blocklist = frozenset()

    def setup(self):
        self._blocklist = validate.read_blocklist(self._cfg.blocklist)

    def process(self, element):
        index, item = element
        faults.maybe_fail("ingest.read", element)
        read_cfg = self._cfg.inputs[index]
        for examples in READERS[read_cfg.format].read(item, read_cfg):
            corpus, dead, stats = validate.validate_examples(
                examples, source=read_cfg.source, blocklist=self._blocklist,
                max_image_bytes=self._cfg.max_image_bytes,
                max_caption_chars=self._cfg.max_caption_chars)
            _count(read_cfg.source, stats[read_cfg.source])
            yield corpus, dead, stats


def _split(element, cfg: IngestConfig) -> Iterable:
    index, item = element
    read_cfg = cfg.inputs[index]
    for part in READERS[read_cfg.format].split(item, read_cfg):
        yield index, part


def _count_deltas(stats: dict) -> dict:
    for source, counts in stats.items():
        _count(source, counts)
    return stats


def _upstream_stats(element, cfg: IngestConfig) -> Iterable[dict]:
    """Counts the input reports about itself (img2dataset's _stats.json), per source."""
    index, item = element
    read_cfg = cfg.inputs[index]
    upstream = READERS[read_cfg.format].upstream
    if upstream is not None:
        yield {read_cfg.source: {"seen": 0, "ingested": 0, "dead_lettered": 0, "reasons": {},
                                 read_cfg.format: upstream(item, read_cfg)}}


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
    for source, c in by_source.items():
        if c["ingested"] + c["dead_lettered"] != c["seen"]:
            raise RuntimeError(f"ingest lost examples of {source}: {c}")
        for reason, n in c["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    stats = {name: sum(c[name] for c in by_source.values())
             for name in ("seen", "ingested", "dead_lettered")}
    written = (sum(i.num_rows for i in corpus_infos), sum(i.num_rows for i in dead_infos))
    if written != (stats["ingested"], stats["dead_lettered"]):
        raise RuntimeError(f"ingest lost examples: counted {stats}, wrote {written} rows")
    stats.update({
        "reasons": dict(sorted(reasons.items())), "by_source": by_source,
        "inputs": [{"input": c.input, "format": c.format, "source": c.source}
                   for c in cfg.inputs],
        "output": cfg.output, "dedup": cfg.dedup, "blocklist": cfg.blocklist,
        "shards": {i.shard_id: {"rows": i.num_rows, "sha256": i.sha256}
                   for i in sorted(corpus_infos, key=lambda i: i.shard_id)},
        "dead_letter_shards": {i.shard_id: {"rows": i.num_rows, "sha256": i.sha256}
                               for i in sorted(dead_infos, key=lambda i: i.shard_id)}})
    formats.write_json_atomic(formats.join_url(cfg.output, "stats.json"), stats)
    return stats


class IngestCorpus(beam.PTransform):
    """(input index, work item)s -> corpus shards, dead letters and stats.json under OUTPUT.

    Apply to a PCollection of `work_items(cfg)`; returns the PCollection holding the
    stats dict written to OUTPUT/stats.json.
    """

    def __init__(self, cfg: IngestConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, work):
        cfg = self._cfg
        results = (work
                   | "Split" >> beam.FlatMap(_split, cfg)
                   | "Spread" >> beam.Reshuffle()
                   | "ReadAndValidate" >> beam.ParDo(_ReadAndValidate(cfg)))
        kept, duplicates, duplicate_stats = (
            results
            | "ValidRows" >> beam.FlatMap(_corpus_part)
            | "Dedup" >> dedup.DropDuplicates(mode=cfg.dedup, rows_per_shard=cfg.rows_per_shard,
                                              rows_per_group=cfg.dedup_rows_per_group))
        corpus = kept | "WriteCorpus" >> WriteCorpus(cfg.output)
        dead = ((results | "DeadLetters" >> beam.FlatMap(_dead_part), duplicates)
                | "AllDeadLetters" >> beam.Flatten()
                | "AssignDeadLetterShards" >> AssignShards(rows_per_shard=cfg.rows_per_shard,
                                                           key_column="source_location")
                | "WriteDeadLetters" >> WriteCorpus(formats.join_url(cfg.output, "_dead_letter"),
                                                    schema=formats.DEAD_LETTER_SCHEMA,
                                                    sort_by=("source_location", "reason")))
        duplicate_stats = duplicate_stats | "CountDuplicates" >> beam.Map(_count_deltas)
        return ((results | "Stats" >> beam.Map(_stats_part), duplicate_stats,
                 work | "Upstream" >> beam.FlatMap(_upstream_stats, cfg))
                | "AllStats" >> beam.Flatten()
                | "MergeStats" >> beam.CombineGlobally(merge_stats)
                | "WriteStats" >> beam.Map(_write_stats, beam.pvalue.AsList(corpus),
                                           beam.pvalue.AsList(dead), cfg))


def work_items(cfg: IngestConfig) -> list:
    """The launcher's listing of every input: [(input index, work item)]."""
    return [(index, item) for index, read_cfg in enumerate(cfg.inputs)
            for item in READERS[read_cfg.format].list_items(read_cfg)]


def _default_source(url: str) -> str:
    """The input's last path component without extension, as a valid source name."""
    parts = [p for p in url.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]
    name = parts[-1].split(".")[0] if parts else ""
    name = "".join(c if validate.is_valid_uid(c) else "-" for c in name)[:128]
    return name or "input"


def _per_input(values: Optional[list], n: int, flag: str, default) -> list:
    if not values:
        return [default(i) for i in range(n)]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"give one {flag} for all inputs or one per --input ({n}), "
                         f"not {len(values)}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jest-curate ingest",
                                     description="Ingest image-text data into canonical shards.")
    parser.add_argument("--input", required=True, action="append",
                        help="file, directory or glob URL; repeat for several sources")
    parser.add_argument("--format", required=True, action="append", choices=FORMATS,
                        help="one for all inputs, or one per --input")
    parser.add_argument("--output", required=True, help="corpus directory URL")
    parser.add_argument("--source", action="append",
                        help="name of each input (default: its basename); part of derived uids")
    parser.add_argument("--caption-column", default="caption",
                        help="parquet/CSV column; tars: .json field used without a .txt member")
    parser.add_argument("--image-column", default="image",
                        help="parquet: image bytes; folder CSV: image path relative to INPUT")
    parser.add_argument("--uid-column", default=None,
                        help="column / .json field holding uids (default: derived, see docs)")
    parser.add_argument("--url-column", default=None, help="default: 'url' when present")
    parser.add_argument("--license-column", default=None,
                        help="default: 'license', 'licence' or 'LICENSE' when present")
    parser.add_argument("--captions-csv", default=None, help="folder: captions CSV URL")
    parser.add_argument("--blocklist", default=None,
                        help="text file of uids and/or source URLs to refuse (takedowns)")
    parser.add_argument("--dedup", default="image", choices=dedup.MODES,
                        help="image: keep one example per image bytes (other captions of it "
                             "are SigLIP false negatives); image-caption: only exact pairs "
                             "(keeps COCO-style multi-caption images); none. Repeated uids "
                             "are always resolved")
    parser.add_argument("--dedup-rows-per-group", type=int, default=1 << 20,
                        help="key records (~100 B each) one worker compares at once")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--max-caption-chars", type=int, default=validate.MAX_CAPTION_CHARS)
    parser.add_argument("--max-image-bytes", type=int, default=validate.MAX_IMAGE_BYTES,
                        help="encoded image size limit; also caps every tar member read")
    return parser


def config_from_args(args) -> IngestConfig:
    n = len(args.input)
    fmts = _per_input(args.format, n, "--format", None)
    sources = _per_input(args.source, n, "--source", lambda i: _default_source(args.input[i]))
    inputs = tuple(ReadConfig(
        input=url, format=fmt, source=source, caption_column=args.caption_column,
        image_column=args.image_column, uid_column=args.uid_column, url_column=args.url_column,
        license_column=args.license_column, captions_csv=args.captions_csv,
        batch_size=args.batch_size, max_member_bytes=args.max_image_bytes)
        for url, fmt, source in zip(args.input, fmts, sources))
    return IngestConfig(inputs=inputs, output=args.output, rows_per_shard=args.rows_per_shard,
                        max_caption_chars=args.max_caption_chars,
                        max_image_bytes=args.max_image_bytes, blocklist=args.blocklist,
                        dedup=args.dedup, dedup_rows_per_group=args.dedup_rows_per_group)


def run(argv=None, test_pipeline=None) -> dict:
    """Parse flags, list the inputs, run the pipeline; returns the stats written."""
    args, beam_args = options.parse_stage_args(_parser(), argv)
    cfg = config_from_args(args)
    validate.read_blocklist(cfg.blocklist)  # Fail now, not on every worker, if it is unreadable.
    items = work_items(cfg)
    stats_url = formats.join_url(cfg.output, "stats.json")
    if formats.exists(stats_url):  # No stale completion marker while shards are rewritten.
        fs, path = fsspec.core.url_to_fs(stats_url)
        fs.rm(path)
    # Until the job finishes, readers refuse the output (a killed job leaves part of it).
    formats.mark_incomplete(cfg.output, "jest-curate ingest")
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    with pipeline as p:
        _ = (p
             | "ListInput" >> beam.Create(items, reshuffle=False)
             | "Ingest" >> IngestCorpus(cfg))
    stats = formats.read_json(stats_url)
    formats.clear_incomplete(cfg.output)
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
