"""On the real demo corpus, a reference trained on the curated set steers JEST off noise."""
import os

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from jest_curate import demo_data
from jest_curate import formats
from pipelines import embed
from pipelines import select
from training import train as train_lib

BEAM = ["--runner=FnApiRunner"]


def _noisy_share(out: str, noisy: dict) -> float:
    manifest = pa.concat_tables(formats.read_shard(s) for s in
                                formats.list_shards(os.path.join(out, "manifest")))
    chosen = [u for u, sel in zip(manifest.column("uid").to_pylist(),
                                  manifest.column("selected").to_pylist()) if sel]
    return sum(noisy[u] for u in chosen) / len(chosen)


def test_jest_selects_fewer_noisy_captions_than_uniform(tmp_path, one_thread):
    data = str(tmp_path / "data")
    demo_data.build_demo_corpus(data, seed=0, noise=0.5, pool_size=1920, curated_size=2000,
                                eval_size=32, retrieval_size=16, shard_size=640)
    reference = train_lib.train(train_lib.TrainConfig(
        model="jest-vit-micro-28", output=str(tmp_path / "reference"),
        data=os.path.join(data, "curated"), data_format="canonical", batch_size=64,
        total_steps=250, learning_rate=1e-3, warmup_steps=25, precision="fp32",
        tensorboard=False))
    learner = train_lib.train(train_lib.TrainConfig(
        model="jest-vit-micro-28", output=str(tmp_path / "learner"), data=None,
        batch_size=64, total_steps=1, stop_at_step=0, precision="fp32", tensorboard=False))
    pool = os.path.join(data, "pool")
    for name, ckpt in (("ref_emb", reference.checkpoint), ("lrn_emb", learner.checkpoint)):
        embed.run(["--corpus", pool, "--model", "jest-vit-micro-28", "--checkpoint", ckpt,
                   "--output", str(tmp_path / name), "--precision", "fp32"] + BEAM)
    noise = pa.concat_tables(formats.read_shard(s) for s in formats.list_shards(
        os.path.join(data, "ground_truth", "noise")))
    noisy = dict(zip(noise.column("uid").to_pylist(), noise.column("noisy").to_pylist()))

    shares = {}
    for method in ("jest", "uniform"):
        cfg = select.SelectConfig(
            corpus=pool, output=str(tmp_path / method), batch_size=64, super_batch_size=320,
            method=method, chunks=16, seed=0, reference=str(tmp_path / "ref_emb"),
            learner=str(tmp_path / "lrn_emb") if method == "jest" else None)
        select.run_select(cfg, test_pipeline=beam.Pipeline(options=PipelineOptions(BEAM)))
        shares[method] = _noisy_share(cfg.output, noisy)
    print("noisy share selected:", shares)
    assert 0.4 < shares["uniform"] < 0.6
    assert shares["jest"] < shares["uniform"] - 0.1
