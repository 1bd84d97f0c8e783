"""Embed a corpus with a scoring model: the first step of every JEST round.

    jest-curate embed --corpus CORPUS --model NAME_OR_JSON [--checkpoint URL] --output OUT
    python -m pipelines.embed ... [Beam options: --runner=DataflowRunner --project=...]

JEST scores pairs of examples, so scoring stores embeddings, not losses. The
output is partitioned like the corpus (same shard ids, same row order):

    OUT/model.json                    formats.ModelCard: config, checkpoint sha256, t, b,
                                      preprocessing at the scoring image size, patch
                                      dropout, precision, measured FLOPs per example
    OUT/<shard>.parquet[.commit]      uid + fp16 L2-normalised image/text embeddings,
                                      metadata: model digest, corpus shard sha256
    OUT/_dead_letter/<shard>.parquet  rows that could not be embedded, with a reason
    OUT/_index.json, OUT/_dead_letter/_index.json
                                      the datasets' indexes (formats.write_index), written
                                      at the end, before stats.json
    OUT/stats.json                    rows / embedded / dead_lettered / not_requested,
                                      in total and per shard

Every corpus row is embedded, dead-lettered, or (with --uids, which restricts a run
to a set of uids such as one round's slice of the pool) not requested. A shard whose
committed embeddings carry this model digest (weights, image size, patch dropout,
precision), this corpus shard's sha256 and this --uids file's sha256 is skipped, so a
rerun writes nothing and a grown corpus embeds only its new shards. A directory holds
one model's embeddings: a different model.json is refused unless --overwrite, which
also removes the other model's shards.

The corpus's shards are read from its index on a worker, never put into the job graph;
before a run rewrites a shard, the output's indexes are removed (readers fall back to
the shards' own commit markers) and they are rewritten at the end.

Elements are Arrow batches of ~256 rows, not single examples (Beam costs ~100 us
per element). The model is loaded once per worker process (`shared.Shared`).
"""
import argparse
import json
import logging
import sys
import time
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.utils import shared

from jest_curate import formats
from pipelines import faults, options
from training import scoring

__all__ = ["EmbedCorpus", "OutputConflictError", "run", "main"]

NAMESPACE = "jest_curate.embed"
DEAD_LETTER_DIR = "_dead_letter"
STATS_FILE = "stats.json"
_READ_COLUMNS = ("uid", "image", "caption", "source_location")
_CACHED = "cached"
_UIDS_KEY = "jest.uids_sha256"  # Shard metadata of runs restricted with --uids.
_PROGRESS_SECONDS = 30.0


class _ShardPart(NamedTuple):
    """What one embedded batch contributes to its shard's output."""
    shard: formats.ShardInfo
    offset: int  # Row offset of the batch in the corpus shard.
    uids: list  # Embedded rows only, in row order.
    image: np.ndarray  # [len(uids), d] float16
    text: np.ndarray
    dead_letters: list  # DEAD_LETTER_SCHEMA rows (dicts).
    not_requested: int  # Rows outside --uids.


class OutputConflictError(ValueError):
    """The output directory already holds another model's embeddings."""


def _check_output(output: str, card: formats.ModelCard, overwrite: bool):
    """The existing model.json (a dict) or None; raises if it is another model's."""
    url = formats.join_url(output, "model.json")
    try:
        existing = formats.read_json(url)
    except FileNotFoundError:
        return None
    except ValueError as e:  # Includes json.JSONDecodeError.
        existing = f"unreadable ({e})"
    if not isinstance(existing, dict):
        if overwrite:
            return None
        raise formats.FormatError(f"{url}: not a model card: {str(existing)[:200]}; "
                                  f"pass --overwrite to replace it")
    digest = str(existing.get("model_digest"))
    if digest != card.model_digest and not overwrite:
        raise OutputConflictError(
            f"{output} holds embeddings of another model ({existing.get('model_name')!r}, "
            f"digest {digest[:12]}); this run's digest is {card.model_digest[:12]}. "
            f"Use another --output, or --overwrite to replace them")
    return existing


def _remove_other_models(output: str, digest: str) -> int:
    """Remove embeddings and dead-letter shards not written by model `digest`."""
    removed = 0
    for root in (output, formats.join_url(output, DEAD_LETTER_DIR)):
        if not formats.exists(root):
            continue
        for shard in formats.list_shards(root):
            try:
                theirs = formats.shard_metadata(shard).get("jest.model_digest")
            except pa.ArrowInvalid:  # Damaged: not this model's either.
                theirs = None
            if theirs != digest:
                formats.remove_shard(root, shard.shard_id)
                removed += 1
    return removed


def _cached_counts(output: str, shard: formats.ShardInfo, digest: str, uids_sha: str):
    """(per-shard stats, (embeddings, dead-letter ShardInfo)) if `output` already has this
    shard from this run's model and uid set, else None."""
    embedded = formats.committed_shard(output, shard.shard_id)
    dead = formats.committed_shard(formats.join_url(output, DEAD_LETTER_DIR), shard.shard_id)
    if embedded is None or dead is None:
        return None
    done = embedded.num_rows + dead.num_rows
    if done > shard.num_rows or (done < shard.num_rows and not uids_sha):
        return None
    for info in (embedded, dead):
        try:
            md = formats.shard_metadata(info)
        except pa.ArrowInvalid:  # A damaged file is re-embedded, not trusted.
            return None
        if (md.get("jest.model_digest") != digest
                or md.get("jest.corpus_shard_sha256") != shard.version
                or md.get(_UIDS_KEY, "") != uids_sha):
            return None
        if formats.sha256_file(info.url) != info.sha256:  # Corrupted since: re-embed.
            return None
    return _shard_stats(shard, embedded.num_rows, dead.num_rows), (embedded, dead)


def _shard_stats(shard: formats.ShardInfo, embedded: int, dead: int) -> dict:
    return {"shard_id": shard.shard_id, "rows": shard.num_rows, "embedded": embedded,
            "dead_lettered": dead, "not_requested": shard.num_rows - embedded - dead}


def _first(pair):
    return pair[0]


class _ClaimOutput(beam.DoFn):
    """Writes model.json (if changed) before any shard is written; yields the digest."""

    def __init__(self, output: str, overwrite: bool):
        self._output = output
        self._overwrite = overwrite

    def process(self, card):
        existing = _check_output(self._output, card, self._overwrite)
        if self._overwrite:
            removed = _remove_other_models(self._output, card.model_digest)
            if removed:
                logging.warning("embed: --overwrite: removed %d shards of other models from %s",
                                removed, self._output)
        if existing != json.loads(json.dumps(card.to_json())):  # Tuples read back as lists.
            formats.write_model_card(self._output, card)
        yield card.model_digest


class _SkipCached(beam.DoFn):
    """Shards already embedded by this model go to the `cached` output as stats."""

    def __init__(self, output: str, digest: str, uids_sha: str):
        self._output = output
        self._digest = digest
        self._uids_sha = uids_sha
        self._cached = Metrics.counter(NAMESPACE, "shards_cached")

    def process(self, shard):
        cached = _cached_counts(self._output, shard, self._digest, self._uids_sha)
        if cached is None:
            yield shard
        else:
            self._cached.inc()
            yield beam.pvalue.TaggedOutput(_CACHED, cached)


class _ReadBatches(beam.DoFn):
    """One corpus shard -> (shard, row offset, RecordBatch of requested rows, number of
    rows not requested), reading at most batch_size rows at a time."""

    def __init__(self, batch_size: int, uids: Optional[str]):
        self._batch_size = batch_size
        self._uids = uids
        self._seen = Metrics.counter(NAMESPACE, "seen")
        self._not_requested = Metrics.counter(NAMESPACE, "not_requested")
        self._batches = Metrics.counter(NAMESPACE, "batches")

    def setup(self):
        self._wanted = formats.read_uids(self._uids) if self._uids else None

    def process(self, shard):
        batches = formats.iter_shard_batches(shard, batch_size=self._batch_size,
                                             columns=_READ_COLUMNS)
        offset, pending = 0, []
        while True:
            try:  # Only reading is guarded: downstream (fused) errors pass through `yield`.
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowInvalid, KeyError) as e:
                raise formats.FormatError(f"{shard.url}: not a readable corpus shard "
                                          f"({type(e).__name__}: {e})") from e
            _check_corpus_columns(batch.schema, shard)
            self._seen.inc(batch.num_rows)
            if self._wanted is None:
                self._batches.inc()
                yield shard, offset, batch, 0
            else:  # Re-batch the requested rows: a slice is sparse in every shard.
                requested = batch.filter(pc.is_in(batch.column("uid"), value_set=self._wanted))
                self._not_requested.inc(batch.num_rows - requested.num_rows)
                pending.append((offset, requested, batch.num_rows - requested.num_rows))
                if sum(p[1].num_rows for p in pending) >= self._batch_size:
                    yield self._merged(shard, pending)
                    pending = []
            offset += batch.num_rows
        if pending:
            yield self._merged(shard, pending)
        if offset != shard.num_rows:
            raise formats.FormatError(f"{shard.url}: has {offset} rows, its commit marker "
                                      f"says {shard.num_rows}")
        if offset == 0:  # An empty shard still gets (empty) outputs.
            yield shard, 0, pa.RecordBatch.from_pylist([], schema=_read_schema()), 0


    def _merged(self, shard, pending):
        """Consecutive filtered batches as one element, keyed by the first one's offset."""
        self._batches.inc()
        table = pa.Table.from_batches([p[1] for p in pending], schema=_read_schema())
        merged = table.combine_chunks().to_batches()
        batch = merged[0] if merged else pa.RecordBatch.from_pylist([], schema=_read_schema())
        return shard, pending[0][0], batch, sum(p[2] for p in pending)


def _read_schema() -> pa.Schema:
    return pa.schema([formats.CORPUS_SCHEMA.field(c) for c in _READ_COLUMNS])


def _check_corpus_columns(schema: pa.Schema, shard: formats.ShardInfo) -> None:
    got = [(f.name, f.type) for f in schema]
    want = [(f.name, f.type) for f in _read_schema()]
    if got != want:
        raise formats.FormatError(f"{shard.url}: not a corpus shard: columns {got}, "
                                  f"expected {want}")


class _EmbedBatches(beam.DoFn):
    """(shard, offset, batch) -> (shard id, part): embeddings plus dead letters."""

    def __init__(self, card: formats.ModelCard, spec: scoring.ScoringSpec):
        self._card = card
        self._spec = spec
        self._shared = shared.Shared()
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._dead = Metrics.counter(NAMESPACE, "dead_letter")
        self._batch_msecs = Metrics.distribution(NAMESPACE, "batch_msecs")

    def _load(self):
        return scoring.scorer_from_card(self._card, checkpoint=self._spec.checkpoint,
                                        device=self._spec.device)

    def setup(self):
        if self._spec.num_threads:
            torch.set_num_threads(self._spec.num_threads)
        self._scorer = self._shared.acquire(
            self._load, tag=f"{self._card.model_digest}/{self._spec.device}")
        self._started, self._last_log, self._count = time.monotonic(), time.monotonic(), 0

    def process(self, element):
        shard, offset, batch, not_requested = element
        faults.maybe_fail("embed.embed_batch", (shard.shard_id, offset))
        start = time.perf_counter()
        uids = batch.column("uid").to_pylist()
        locations = batch.column("source_location").to_pylist()
        result = self._scorer.embed(batch.column("image").to_pylist(),
                                    batch.column("caption").to_pylist(), uids)
        dead = []
        for row, reason, detail in result.failures:
            Metrics.counter(NAMESPACE, f"dead_letter_{reason}").inc()
            dead.append({"uid": uids[row], "reason": reason, "detail": detail,
                         "source_location": locations[row]})
        self._embedded.inc(len(result.rows))
        self._dead.inc(len(dead))
        self._batch_msecs.update(int(1000 * (time.perf_counter() - start)))
        self._log_progress(batch.num_rows)
        yield shard.shard_id, _ShardPart(shard=shard, offset=offset,
                                         uids=[uids[i] for i in result.rows],
                                         image=result.image, text=result.text,
                                         dead_letters=dead, not_requested=not_requested)

    def _log_progress(self, rows: int) -> None:
        self._count += rows
        now = time.monotonic()
        if now - self._last_log >= _PROGRESS_SECONDS:
            elapsed = now - self._started
            logging.info("embed: %d examples in %.0f s (%.1f/s) on this worker",
                         self._count, elapsed, self._count / max(elapsed, 1e-9))
            self._last_log = now


class _WriteShard(beam.DoFn):
    """All parts of one shard -> dead letters, then embeddings (committed last)."""

    def __init__(self, output: str, card: formats.ModelCard, uids_sha: str):
        self._output = output
        self._uids_sha = uids_sha
        self._digest = card.model_digest
        self._dim = int(card.model_cfg["embed_dim"])
        self._shards = Metrics.counter(NAMESPACE, "shards_embedded")

    def process(self, element, claimed_digest):
        shard_id, parts = element
        if claimed_digest != self._digest:
            raise RuntimeError(f"output claimed for model {claimed_digest[:12]}, "
                               f"writing {self._digest[:12]}")
        parts = sorted(parts, key=lambda part: part.offset)
        shard = parts[0].shard
        uids = [uid for part in parts for uid in part.uids]
        dead = [row for part in parts for row in part.dead_letters]
        skipped = sum(part.not_requested for part in parts)
        if len(uids) + len(dead) + skipped != shard.num_rows:  # Every row, exactly once.
            raise RuntimeError(f"shard {shard_id}: {len(uids)} embedded + {len(dead)} dead "
                               f"letters + {skipped} not requested != {shard.num_rows} rows")

        def stack(field):
            arrays = [getattr(part, field) for part in parts if len(part.uids)]
            return (np.concatenate(arrays) if arrays
                    else np.zeros((0, self._dim), dtype=np.float16))

        restricted = {_UIDS_KEY: self._uids_sha} if self._uids_sha else {}
        for root in (self._output, formats.join_url(self._output, DEAD_LETTER_DIR)):
            formats.remove_index(root)  # Stale from now on; rewritten once all shards are.
        dead_info = formats.write_shard(formats.join_url(self._output, DEAD_LETTER_DIR), shard_id,
                            pa.Table.from_pylist(dead, schema=formats.DEAD_LETTER_SCHEMA),
                            schema=formats.DEAD_LETTER_SCHEMA, metadata={
                                **restricted, "jest.model_digest": self._digest,
                                "jest.corpus_shard_sha256": shard.version})
        # Dead letters are committed, embeddings not yet: a crash here is mid-shard.
        faults.maybe_fail("embed.write_shard", (self._digest, shard_id))
        info = formats.write_embeddings_shard(self._output, shard_id, formats.Embeddings(
            uids=uids, image=stack("image"), text=stack("text"), model_digest=self._digest,
            corpus_shard_sha256=shard.version), metadata=restricted)
        self._shards.inc()
        logging.info("embed: shard %s written: %d embedded, %d dead letters",
                     shard_id, len(uids), len(dead))
        yield _shard_stats(shard, len(uids), len(dead)), (info, dead_info)


class _WriteStats(beam.DoFn):
    """[(per-shard stats, (embeddings, dead letters ShardInfo))] -> both indexes, then
    OUT/stats.json (rewritten only when it changes)."""

    def __init__(self, output: str, corpus: str, uids: Optional[str]):
        self._output = output
        self._corpus = corpus
        self._uids = uids

    def process(self, per_shard, claimed_digest):
        writer = "jest-curate embed"
        formats.write_index(self._output, [infos[0] for _, infos in per_shard], writer=writer)
        formats.write_index(formats.join_url(self._output, DEAD_LETTER_DIR),
                            [infos[1] for _, infos in per_shard], writer=writer)
        per_shard = [stats for stats, _ in per_shard]
        shards = {s["shard_id"]: {k: v for k, v in s.items() if k != "shard_id"}
                  for s in sorted(per_shard, key=lambda s: s["shard_id"])}
        totals = {key: sum(s[key] for s in shards.values())
                  for key in ("rows", "embedded", "dead_lettered", "not_requested")}
        doc = {"model_digest": claimed_digest, "corpus": self._corpus, "uids": self._uids,
               "num_shards": len(shards), **totals, "shards": shards}
        url = formats.join_url(self._output, STATS_FILE)
        try:
            unchanged = formats.read_json(url) == doc
        except (FileNotFoundError, ValueError):
            unchanged = False
        if not unchanged:
            formats.write_json_atomic(url, doc)
        logging.info("embed: %d shards, %d rows: %d embedded, %d dead letters -> %s",
                     len(shards), totals["rows"], totals["embedded"], totals["dead_lettered"],
                     self._output)
        yield doc


class EmbedCorpus(beam.PTransform):
    """Corpus shards -> per-shard embeddings, dead letters, model.json and stats.json.

    At construction the model is built once on the launcher (to write its card and
    measure FLOPs; bad checkpoints fail here), the corpus is listed, and the output
    is checked for another model's embeddings. Returns a PCollection of per-shard
    stats dicts (cached shards included).
    """

    def __init__(self, *, corpus: str, output: str, spec: scoring.ScoringSpec,
                 batch_size: int = 256, uids: Optional[str] = None, overwrite: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._corpus = corpus
        self._output = output
        self._spec = spec
        self._batch_size = batch_size
        self._uids = uids
        self._overwrite = overwrite
        self.card = None  # Set by expand().

    def expand(self, pbegin):
        self.card = card = scoring.load_scoring_model(self._spec).card
        _check_output(self._output, card, self._overwrite)
        shards = formats.list_shards(self._corpus)  # The corpus's index: one read.
        if not shards:
            raise FileNotFoundError(f"{self._corpus}: no committed corpus shards")
        uids_sha = ""
        if self._uids:
            logging.info("embed: only the %d uids in %s", len(formats.read_uids(self._uids)),
                         self._uids)
            uids_sha = formats.sha256_file(self._uids)
        logging.info("embed: %d corpus shards, model %s (digest %s, %.3g FLOPs/example)",
                     len(shards), card.model_name, card.model_digest[:12],
                     card.flops_per_example)

        claim = beam.pvalue.AsSingleton(
            pbegin
            | "ModelCard" >> beam.Create([card])
            | "ClaimOutput" >> beam.ParDo(_ClaimOutput(self._output, self._overwrite)))
        checked = (
            pbegin
            | "Corpus" >> beam.Create([self._corpus], reshuffle=False)
            | "CorpusShards" >> beam.FlatMap(formats.list_shards)  # On a worker.
            | "SpreadCorpusShards" >> beam.Reshuffle()
            | "SkipCached" >> beam.ParDo(_SkipCached(self._output, card.model_digest, uids_sha))
            .with_outputs(_CACHED, main="todo"))
        written = (
            checked.todo
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadBatches" >> beam.ParDo(_ReadBatches(self._batch_size, self._uids))
            | "Embed" >> beam.ParDo(_EmbedBatches(card, self._spec))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShard(self._output, card, uids_sha), claim))
        per_shard = (written, checked[_CACHED]) | "AllShards" >> beam.Flatten()
        _ = (per_shard
             | "CollectStats" >> beam.combiners.ToList()
             | "WriteStats" >> beam.ParDo(
                 _WriteStats(self._output, self._corpus, self._uids), claim))
        return per_shard | "PerShardStats" >> beam.Map(_first)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="jest-curate embed",
        description="Embed corpus shards with a reference or learner model. Options not "
                    "listed here go to Beam (--runner, --project, --region, ...).")
    parser.add_argument("--corpus", required=True, help="Canonical corpus root (URL).")
    parser.add_argument("--model", required=True,
                        help="open_clip config name (e.g. jest-vit-tiny-32, ViT-B-16) or a "
                             "JSON config file.")
    parser.add_argument("--checkpoint", default=None,
                        help="Weights: a jest-curate checkpoint or open_clip_train epoch_N.pt. "
                             "Without it the model is the config's init under --init-seed.")
    parser.add_argument("--output", required=True, help="Embeddings root (URL).")
    parser.add_argument("--uids", default=None,
                        help="Parquet file with a string 'uid' column (e.g. a round's slice of "
                             "the pool): embed only these rows; the others are counted as "
                             "not_requested.")
    parser.add_argument("--image-size", type=int, default=None,
                        help="Scoring resolution (cheap scoring); default: the trained one.")
    parser.add_argument("--patch-dropout", type=float, default=0.0,
                        help="Fraction of image tokens dropped at scoring time (ViTs).")
    parser.add_argument("--precision", choices=scoring.PRECISIONS, default="fp32")
    parser.add_argument("--device", choices=scoring.DEVICES, default="cpu",
                        help="Device on the workers.")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="Examples per Beam element and per forward pass.")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads per worker process (default: torch's choice).")
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace another model's embeddings in --output.")
    return options.parse_stage_args(parser, argv)


def run(argv=None, test_pipeline=None):
    """Build and run the pipeline; returns the finished PipelineResult."""
    args, beam_args = _parse_args(argv)
    spec = scoring.ScoringSpec(
        model=args.model, checkpoint=args.checkpoint, image_size=args.image_size,
        patch_dropout=args.patch_dropout, precision=args.precision, device=args.device,
        init_seed=args.init_seed, num_threads=args.num_threads)
    pipeline_options = PipelineOptions(beam_args)
    setup = pipeline_options.view_as(SetupOptions)
    if setup.save_main_session is None:  # Beam pickles __main__ by default; nothing needs it.
        setup.save_main_session = False
    pipeline = test_pipeline or beam.Pipeline(options=pipeline_options)
    _ = pipeline | "EmbedCorpus" >> EmbedCorpus(
        corpus=args.corpus, output=args.output, spec=spec, batch_size=args.batch_size,
        uids=args.uids, overwrite=args.overwrite)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def main(argv=None) -> int:
    """`jest-curate embed`: input errors are reported in one line, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(argv)
    except (FileNotFoundError, formats.FormatError, formats.CheckpointError,
            scoring.ModelConfigError, OutputConflictError) as e:
        print(f"jest-curate embed: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Import under the package name so workers unpickle pipelines.embed, not __main__.
    from pipelines.embed import main as _main
    sys.exit(_main())
