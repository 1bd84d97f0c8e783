"""DataComp's CLIP-score filter as a Beam stage: the exact keep rule, no pool on one worker.

    reference embeddings ──Scores──► per shard: order keys of the image-text cosines + uids
                         ──HighHistogram──► 16-bit histogram of the keys' high bits
                         ──LowHistogram──► of the low bits inside the boundary bin
                         ──TiedUids──► the uids whose key is exactly the boundary
                         ──Rule──► OUTPUT/rule.json (formats: jest_core.filtering.keep_rule)

The rule keeps exactly `top_fraction(scores, fraction, keys=uids)` of the pool (the
keep_count highest scores, ties by uid), and the layout applies it row by row
(pipelines/layout.py), so neither the launcher nor any worker holds the pool's scores.
"""
import logging
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from jest_core import filtering
from jest_curate import formats
from pipelines import tables

__all__ = ["ClipScoreRule", "run_clip_score_rule"]

RULE = "rule.json"


class _Scores(beam.DoFn):
    def __init__(self, digest: str):
        self._digest = digest

    def process(self, shard: formats.ShardInfo) -> Iterable[Any]:
        emb = formats.read_embeddings_shard(shard, expect_model_digest=self._digest)
        yield (filtering.order_keys(filtering.clip_scores(image=emb.image, text=emb.text)),
               emb.uids, emb.image.shape[1])


def _high(item):
    return filtering.key_histogram(item[0])


def _low(item, high):
    return filtering.key_histogram(item[0], high=high[0])


def _boundary(hist, k):
    return filtering.histogram_boundary(hist, k)


def _tied(item, key):
    keys, uids, _ = item
    at = np.flatnonzero(keys.astype(np.int64) == key)
    return [uids[i] for i in at]


class _Rule(beam.DoFn):
    def __init__(self, output: str, fraction: float, pool: int, digest: str):
        self._output, self._fraction, self._pool = output, fraction, pool
        self._digest = digest

    def process(self, _, high, low, tied, dims) -> Iterable[Any]:
        key = (high[0] << 16) | low[0]
        kept = filtering.keep_count(self._pool, self._fraction)
        rule = filtering.keep_rule(key=key, tied_uids=[u for part in tied for u in part],
                                   need=low[1], kept=kept, pool=self._pool,
                                   fraction=self._fraction)
        rule.update(flops=filtering.clip_score_flops(self._pool, max(dims) if dims else 0),
                    embeddings_digest=self._digest)
        formats.write_json_atomic(formats.join_url(self._output, RULE), rule)
        yield rule


class ClipScoreRule(beam.PTransform):
    """Reference embeddings → the keep rule of their top `fraction` by CLIP score."""

    def __init__(self, embeddings: str, output: str, fraction: float):
        super().__init__()
        self._embeddings, self._output, self._fraction = embeddings, output, fraction
        self._digest = formats.read_model_card(embeddings).model_digest
        self._pool = sum(s.num_rows for s in formats.list_shards(embeddings))  # The index.
        if not self._pool:
            raise ValueError(f"{embeddings}: no embedded examples to filter")

    def expand(self, pbegin):
        k = filtering.keep_count(self._pool, self._fraction)
        scored = (pbegin
                  | "Embeddings" >> beam.Create([self._embeddings], reshuffle=False)
                  | "Shards" >> beam.FlatMap(formats.list_shards)
                  | "Spread" >> beam.Reshuffle()
                  | "Scores" >> beam.ParDo(_Scores(self._digest)))
        high = beam.pvalue.AsSingleton(
            scored | "High" >> beam.Map(_high)
            | "HighHistogram" >> beam.CombineGlobally(tables.sum_arrays).without_defaults()
            | "HighBoundary" >> beam.Map(_boundary, k))
        low = beam.pvalue.AsSingleton(
            scored | "Low" >> beam.Map(_low, high)
            | "LowHistogram" >> beam.CombineGlobally(tables.sum_arrays).without_defaults()
            | "LowBoundary" >> beam.Map(lambda hist, hi: _boundary(hist, hi[1]), high))
        key = beam.pvalue.AsSingleton(
            pbegin | "Key" >> beam.Create([None])
            | "Combine" >> beam.Map(lambda _, hi, lo: (hi[0] << 16) | lo[0], high, low))
        tied = beam.pvalue.AsList(scored | "TiedUids" >> beam.Map(_tied, key))
        dims = beam.pvalue.AsList(scored | "Dims" >> beam.Map(lambda item: item[2]))
        return (pbegin
                | "Once" >> beam.Create([None])
                | "Rule" >> beam.ParDo(_Rule(self._output, self._fraction, self._pool, self._digest),
                                       high, low, tied, dims))


def run_clip_score_rule(embeddings: str, output: str, fraction: float, beam_args=()) -> dict:
    """OUTPUT/rule.json for the pool `embeddings` covers (skipped when already there)."""
    url = formats.join_url(output, RULE)
    if formats.exists(url):
        rule = formats.read_json(url)
        digest = formats.read_model_card(embeddings).model_digest
        if (rule.get("keep_fraction"), rule.get("embeddings_digest")) != (fraction, digest):
            raise ValueError(f"{url} holds the rule of another filter or pool "
                             f"(keep_fraction {rule.get('keep_fraction')}); pick another output")
    else:
        with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
            _ = p | "ClipScoreRule" >> ClipScoreRule(embeddings, output, fraction)
        logging.info("clip-score: rule written to %s", url)
    return formats.read_json(url)
