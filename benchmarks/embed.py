"""Benchmark the scoring pipeline: Beam vs a bare PyTorch loop, and bf16 vs fp32.

    python -m benchmarks.embed [--examples 8192] [--model jest-vit-tiny-32] [--threads N]

1. pipeline_vs_bare_torch: examples/s of `pipelines.embed` (EmbedCorpus on
   FnApiRunner, end to end: launch, model load, read, embed, write) over examples/s
   of a plain loop doing the same work: read the same parquet shards in batches of
   the same size, embed them with the same `ScoringModel.embed` (same model, same
   preprocessing function), same torch threads, write the same embeddings shards.
   Goal >= 0.9. Both outputs are checked to be identical.
2. bf16_vs_fp32: model forward throughput (both towers, preprocessed batches of the
   demo pool) under bf16 autocast over fp32, on the demo's scoring config. Goal >= 3x.

The corpus is the demo pool (`jest_curate.demo_data`) unless --corpus is given. Runs
are interleaved and the best of --repeats is kept, since the machine is shared.
The last line printed is one JSON object.
"""
import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jest_curate import demo_data, flags
from jest_curate import formats
from pipelines import embed
from training import scoring

_COLUMNS = ("uid", "image", "caption")


def _bare_torch(corpus: str, output: str, spec: scoring.ScoringSpec, batch_size: int) -> int:
    """The same work as the pipeline, as a plain loop; returns the rows processed."""
    scorer = scoring.load_scoring_model(spec)  # Measures FLOPs too, like the launcher.
    rows = 0
    for shard in formats.list_shards(corpus):
        uids, images, texts = [], [], []
        for batch in formats.iter_shard_batches(shard, batch_size=batch_size, columns=_COLUMNS):
            batch_uids = batch.column("uid").to_pylist()
            result = scorer.embed(batch.column("image").to_pylist(),
                                  batch.column("caption").to_pylist(), batch_uids)
            uids += [batch_uids[i] for i in result.rows]
            images.append(result.image)
            texts.append(result.text)
            rows += batch.num_rows
        formats.write_embeddings_shard(output, shard.shard_id, formats.Embeddings(
            uids=uids, image=np.concatenate(images), text=np.concatenate(texts),
            model_digest=scorer.card.model_digest, corpus_shard_sha256=shard.sha256))
    return rows


def _pipeline(corpus: str, output: str, spec: scoring.ScoringSpec, batch_size: int,
              threads: int) -> None:
    embed.run(["--corpus", corpus, "--output", output, "--model", spec.model,
               "--precision", spec.precision, "--batch-size", str(batch_size),
               "--num-threads", str(threads), "--runner=FnApiRunner"])


def _same_embeddings(a: str, b: str) -> bool:
    for shard in formats.list_shards(a):
        x = formats.read_embeddings_shard(shard)
        y = formats.read_embeddings_shard(formats.join_url(b, f"{shard.shard_id}.parquet"))
        if x.uids != y.uids or not (np.array_equal(x.image, y.image)
                                    and np.array_equal(x.text, y.text)):
            return False
    return True


def _forward_seconds(scorer: scoring.ScoringModel, batches: list) -> float:
    start = time.perf_counter()
    for pixels, tokens, keys in batches:
        scorer.encode(pixels, tokens, keys)
    return time.perf_counter() - start


def _cpu_bf16_support() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ",".join(found) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="Corpus root; default: a demo pool built in a temp dir.")
    parser.add_argument("--examples", type=int, default=8192, help="Demo pool size.")
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--model", default="jest-vit-tiny-32", help="The demo's scoring model.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--forward-batches", type=int, default=8,
                        help="Batches timed per precision in the bf16/fp32 comparison.")
    args = flags.parse_strict(parser, argv)[0]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        corpus = args.corpus
        if corpus is None:
            demo_data.build_demo_corpus(f"{tmp}/demo", pool_size=args.examples, curated_size=16,
                                        eval_size=16, retrieval_size=0,
                                        shard_size=args.shard_size)
            corpus = f"{tmp}/demo/pool"
        spec = scoring.ScoringSpec(model=args.model)
        examples = sum(s.num_rows for s in formats.list_shards(corpus))

        bare_s, pipe_s = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            _bare_torch(corpus, f"{tmp}/bare{r}", spec, args.batch_size)
            bare_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            _pipeline(corpus, f"{tmp}/pipeline{r}", spec, args.batch_size, args.threads)
            pipe_s.append(time.perf_counter() - start)
            print(f"run {r}: bare torch {examples / bare_s[-1]:.1f} ex/s, "
                  f"pipeline {examples / pipe_s[-1]:.1f} ex/s", flush=True)
        identical = _same_embeddings(f"{tmp}/bare0", f"{tmp}/pipeline0")

        fp32 = scoring.load_scoring_model(spec, measure=False)
        bf16 = scoring.load_scoring_model(scoring.ScoringSpec(model=args.model,
                                                              precision="bf16"), measure=False)
        batches = []
        shard = formats.list_shards(corpus)[0]
        for batch in formats.iter_shard_batches(shard, batch_size=args.batch_size,
                                                columns=_COLUMNS):
            prepared = scoring.prepare_batch(batch.column("image").to_pylist(),
                                             batch.column("caption").to_pylist(), fp32.contract)
            uids = batch.column("uid").to_pylist()
            batches.append((prepared.pixels, prepared.tokens,
                            scoring.patch_dropout_keys([uids[i] for i in prepared.rows])))
            if len(batches) == args.forward_batches:
                break
        forward_examples = sum(len(b[0]) for b in batches)
        _forward_seconds(fp32, batches[:1])  # Warm-up (oneDNN kernel selection).
        _forward_seconds(bf16, batches[:1])
        fp32_s, bf16_s = [], []
        for _ in range(3):
            fp32_s.append(_forward_seconds(fp32, batches))
            bf16_s.append(_forward_seconds(bf16, batches))

    report = {
        "model": args.model, "examples": examples, "batch_size": args.batch_size,
        "threads": args.threads, "cpu_bf16": _cpu_bf16_support(),
        "bare_torch_examples_per_s": round(examples / min(bare_s), 1),
        "pipeline_examples_per_s": round(examples / min(pipe_s), 1),
        "pipeline_vs_bare_torch": round(min(bare_s) / min(pipe_s), 3),
        "outputs_identical": identical,
        "fp32_forward_examples_per_s": round(forward_examples / statistics.median(fp32_s), 1),
        "bf16_forward_examples_per_s": round(forward_examples / statistics.median(bf16_s), 1),
        "bf16_vs_fp32": round(statistics.median(fp32_s) / statistics.median(bf16_s), 3),
    }
    print(f"pipeline / bare torch: {report['pipeline_vs_bare_torch']:.3f} (goal >= 0.9); "
          f"bf16 / fp32 forward: {report['bf16_vs_fp32']:.2f}x (goal >= 3)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
