"""`jest-curate ingest`: raw image-text data -> canonical corpus shards, as a Beam pipeline.

    jest-curate ingest --input URL [--input URL ...] --format FORMAT [--format ...]
        --output URL [--source NAME ...] [--blocklist URL] [--dedup image|image-caption|none]
        [--append] [--rows-per-shard 2048 --max-shard-bytes 268435456]
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

    <shard>.parquet(+.commit)    CORPUS_SCHEMA rows in input order: each input file (parquet
                                 row group, folder chunk) becomes its own shards, written
                                 by the worker that reads it (pipelines/ingest_shards.py)
    <shard>.drop.parquet         rows dedup removed from that shard (readers skip them)
    _index.json                  the corpus: every shard, its rows, sha256 and drop list
    _keys/                       dedup keys of every shard (what --append dedups against)
    _dead_letter/ (+_index.json) DEAD_LETTER_SCHEMA: every rejected example, its reason
                                 (validate.REASONS) and where it came from
    stats.json                   seen / ingested / dead_lettered, per reason and per source
                                 (ingested + dead_lettered == seen for each); written last,
                                 after both indexes

A rerun rewrites the same shards (same ids, same bytes) and removes shards no longer
produced. `_INCOMPLETE` marks the output while a (re)run fills it; readers refuse it.
--append adds the units (files, row groups, folder chunks) of the inputs that the
corpus does not hold yet as new shards, deduplicated against the corpus's stored keys
(its rows always win); existing shards, ids and digests stay, so embed then embeds
only the new shards. Readers see the old corpus until the new indexes are written.
Units already ingested are not read again: a file changed in place is not noticed.
"""
import argparse
import dataclasses
import logging
from typing import Callable, Iterable, NamedTuple, Optional

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from jest_curate import formats
from pipelines import dedup, ingest_readers, ingest_shards, options, tar_stream, validate
from pipelines.corpus_io import DEAD_LETTER_DIR, ShardOut
from pipelines.ingest_readers import RawExample, ReadConfig
from pipelines.ingest_shards import Unit, merge_stats

__all__ = ["READERS", "FORMATS", "IngestConfig", "ReadConfig", "RawExample", "IngestCorpus",
           "merge_stats", "check_inputs", "config_from_args", "run", "main"]

_NAMESPACE = "jest_curate.ingest"


class Reader(NamedTuple):
    """One format: check it at launch; list, split and read its items on workers."""
    probe: Callable  # (ReadConfig) -> None; raises a clear error if it cannot be read.
    list_items: Callable  # (ReadConfig) -> work items (on a worker).
    split: Callable  # (item, ReadConfig) -> finer items (e.g. parquet row groups).
    read: Callable  # (item, ReadConfig) -> lists of RawExamples.
    upstream: Optional[Callable] = None  # (item, ReadConfig) -> counts the input reports.


READERS = {
    "parquet": Reader(ingest_readers.parquet_work, ingest_readers.parquet_work,
                      ingest_readers.parquet_row_groups, ingest_readers.read_parquet),
    "folder": Reader(ingest_readers.folder_probe, ingest_readers.folder_work,
                     ingest_readers.whole, ingest_readers.read_folder),
    "webdataset": Reader(tar_stream.tar_work, tar_stream.tar_work, ingest_readers.whole,
                         tar_stream.read_tar),
    "img2dataset": Reader(tar_stream.tar_work, tar_stream.tar_work, ingest_readers.whole,
                          tar_stream.read_tar, tar_stream.img2dataset_upstream),
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
    max_shard_bytes: int = ingest_shards.MAX_SHARD_BYTES
    append: bool = False  # Add new inputs' units to the committed corpus at OUTPUT.
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
        # A row larger than the bound gets a shard of its own; images must fit.
        if self.max_shard_bytes < self.max_image_bytes:
            raise ValueError(f"--max-shard-bytes {self.max_shard_bytes} must be at least "
                             f"--max-image-bytes ({self.max_image_bytes})")


def _count(source: str, counts: dict) -> None:
    """Beam counters mirroring stats.json (dedup passes negative `ingested` deltas)."""
    for namespace in (_NAMESPACE, f"{_NAMESPACE}.source.{source}"):
        for name in ("seen", "ingested", "dead_lettered"):
            Metrics.counter(namespace, name).inc(counts[name])
        for reason, n in counts["reasons"].items():
            Metrics.counter(namespace, f"dropped_{reason}").inc(n)


def _list_units(index: int, cfg: IngestConfig) -> Iterable[Unit]:
    """One input -> its units, listed on a worker (the job graph holds input indexes only)."""
    read_cfg = cfg.inputs[index]
    reader = READERS[read_cfg.format]
    for item in reader.list_items(read_cfg):
        yield Unit(index, item, "")


def _split(unit: Unit, cfg: IngestConfig) -> Iterable[Unit]:
    read_cfg = cfg.inputs[unit.index]
    for part in READERS[read_cfg.format].split(unit.item, read_cfg):
        yield Unit(unit.index, part, ingest_shards.unit_name(read_cfg.format, part))


class _SkipIngested(beam.DoFn):
    """--append: drops units the corpus already holds (read from its indexes on the worker)."""

    def __init__(self, cfg: IngestConfig):
        self._cfg = cfg
        self._shared = shared.Shared()

    def setup(self):
        output = self._cfg.output
        self._done = self._shared.acquire(lambda: _Units(ingest_shards.existing_units(output)),
                                          tag=f"units:{output}").units

    def process(self, unit: Unit):
        if (self._cfg.inputs[unit.index].source, unit.name) in self._done:
            Metrics.counter(_NAMESPACE, "units_already_ingested").inc()
            return
        yield unit


class _Units:
    def __init__(self, units: set):
        self.units = units


def _with_upstream(unit: Unit, cfg: IngestConfig) -> Iterable[dict]:
    """Counts the input reports about itself (img2dataset's _stats.json), per source."""
    read_cfg = cfg.inputs[unit.index]
    upstream = READERS[read_cfg.format].upstream
    if upstream is not None:
        yield {read_cfg.source: {"seen": 0, "ingested": 0, "dead_lettered": 0, "reasons": {},
                                 read_cfg.format: upstream(unit.item, read_cfg)}}


def _count_stats(stats: dict) -> dict:
    for source, counts in stats.items():
        _count(source, counts)
    return stats


def _existing_shards(output: str) -> Iterable[formats.ShardInfo]:
    yield from formats.read_index(output)


def _tagged(out: ShardOut, dataset: str) -> tuple:
    return dataset, out


class IngestCorpus(beam.PTransform):
    """The whole ingest stage: inputs -> corpus and dead-letter shards, indexes, stats.json.

    Apply to the pipeline; returns the PCollection holding the stats dict written to
    OUTPUT/stats.json. The job graph holds the config and input indexes only: inputs are
    listed, split into units and read on workers; each unit writes its own shards
    (`pipelines.ingest_shards`), dedup moves key records only (`pipelines.dedup`).
    """

    def __init__(self, cfg: IngestConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, pbegin):
        cfg = self._cfg
        units = (pbegin
                 | "Inputs" >> beam.Create(list(range(len(cfg.inputs))), reshuffle=False)
                 | "ListInputs" >> beam.FlatMap(_list_units, cfg)
                 | "SpreadItems" >> beam.Reshuffle()
                 | "Split" >> beam.FlatMap(_split, cfg))
        if cfg.append:
            units = units | "SkipIngested" >> beam.ParDo(_SkipIngested(cfg))
        units = units | "SpreadUnits" >> beam.Reshuffle()
        read = units | "ReadAndWrite" >> beam.ParDo(
            ingest_shards.IngestUnit(cfg, READERS)).with_outputs("keys", "dead", "stats",
                                                                 main="corpus")
        if cfg.append:
            old_keys = (pbegin
                        | "Corpus" >> beam.Create([cfg.output], reshuffle=False)
                        | "ExistingShards" >> beam.FlatMap(_existing_shards)
                        | "SpreadExisting" >> beam.Reshuffle()
                        | "ExistingKeys" >> beam.Map(dedup.read_existing_keys,
                                                     output=cfg.output))
        else:
            old_keys = pbegin | "NoExistingKeys" >> beam.Create([], reshuffle=False)
        corpus, duplicates, duplicate_stats = (
            (read.keys, old_keys, read.corpus)
            | "Dedup" >> dedup.DropDuplicates(output=cfg.output, mode=cfg.dedup,
                                              rows_per_group=cfg.dedup_rows_per_group))
        dead = (read.dead, duplicates) | "AllDeadLetters" >> beam.Flatten()
        stats = ((read.stats | "CountRead" >> beam.Map(_count_stats),
                  duplicate_stats | "CountDuplicates" >> beam.Map(_count_stats),
                  units | "Upstream" >> beam.FlatMap(_with_upstream, cfg))
                 | "AllStats" >> beam.Flatten()
                 | "MergeStats" >> beam.CombineGlobally(ingest_shards.merge_stats))
        written = ((corpus | "TagCorpus" >> beam.Map(_tagged, "corpus"),
                    dead | "TagDead" >> beam.Map(_tagged, "dead"))
                   | "AllWritten" >> beam.Flatten()
                   | "ListWritten" >> beam.combiners.ToList())
        return stats | "Commit" >> beam.Map(ingest_shards.commit,
                                            beam.pvalue.AsSingleton(written), cfg)


def check_inputs(cfg: IngestConfig) -> None:
    """Clear errors at launch for inputs that cannot be read at all (nothing enters the graph)."""
    for read_cfg in cfg.inputs:
        READERS[read_cfg.format].probe(read_cfg)


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
                        help="key records per dedup bucket (its accumulator holds one ~150 B "
                             "record per distinct key)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--max-shard-bytes", type=int, default=ingest_shards.MAX_SHARD_BYTES,
                        help="bytes per corpus shard (each input file becomes its own shards)")
    parser.add_argument("--append", action="store_true",
                        help="add the inputs' files not yet in the committed corpus at --output "
                             "as new shards, deduplicated against it; existing shards are kept")
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
                        max_shard_bytes=args.max_shard_bytes, append=args.append,
                        max_caption_chars=args.max_caption_chars,
                        max_image_bytes=args.max_image_bytes, blocklist=args.blocklist,
                        dedup=args.dedup, dedup_rows_per_group=args.dedup_rows_per_group)


def _check_append(cfg: IngestConfig) -> None:
    """--append needs a finished corpus, deduplicated the same way."""
    formats.list_shards(cfg.output)  # Refuses a missing or unfinished dataset.
    try:
        formats.read_index(cfg.output)
        previous = formats.read_json(formats.join_url(cfg.output, "stats.json"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--append: {cfg.output} is not a finished ingest output "
                                f"({e}); ingest it without --append first") from e
    if previous.get("dedup") != cfg.dedup:
        raise ValueError(f"--append: {cfg.output} was deduplicated with --dedup "
                         f"{previous.get('dedup')}, not {cfg.dedup}")
    # Units are known by (source, relative path): another input under a known source name
    # would have its files taken for ones already ingested (and its uids would collide).
    known = {i["source"]: i["input"] for i in previous.get("inputs", [])}
    for read_cfg in cfg.inputs:
        if known.get(read_cfg.source, read_cfg.input) != read_cfg.input:
            raise ValueError(f"--append: source {read_cfg.source!r} already names "
                             f"{known[read_cfg.source]} in {cfg.output}; give "
                             f"{read_cfg.input} another --source")


def run(argv=None, test_pipeline=None) -> dict:
    """Parse flags, check the inputs, run the pipeline; returns the stats written."""
    args, beam_args = options.parse_stage_args(_parser(), argv)
    cfg = config_from_args(args)
    validate.read_blocklist(cfg.blocklist)  # Fail now, not on every worker, if it is unreadable.
    check_inputs(cfg)
    stats_url = formats.join_url(cfg.output, "stats.json")
    if cfg.append:
        _check_append(cfg)
    else:
        # Until the job finishes, readers refuse the output (a killed job leaves part of it);
        # then the old indexes and completion marker go, so nothing stale is left to trust.
        formats.mark_incomplete(cfg.output, "jest-curate ingest")
        for root in (cfg.output, formats.join_url(cfg.output, DEAD_LETTER_DIR)):
            formats.remove_index(root)
        if formats.exists(stats_url):
            fs, path = fsspec.core.url_to_fs(stats_url)
            fs.rm(path)
    # An append changes nothing readers see until its indexes replace the old ones.
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    with pipeline as p:
        _ = p | "Ingest" >> IngestCorpus(cfg)
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
