"""The select pipeline: exact super-batches, accounting, reproducibility, shard formats."""
import collections
import dataclasses
import io
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from jest_curate import formats
from pipelines import select
from tests.conftest import file_digests

D = 16
T, BIAS = 10.0, -10.0


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), i % 256).save(buf, "PNG")
    return buf.getvalue()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _card(name):
    pre = formats.Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    return formats.ModelCard(model_name=name, model_cfg={"embed_dim": D},
                             checkpoint_sha256=name * 8, logit_scale=T, logit_bias=BIAS,
                             preprocess=pre)


def make_corpus(root, *, shards=(60, 50, 47), noisy_every=2, missing=(), undecodable=()):
    """A corpus whose odd examples have captions unrelated to their image.

    The reference model "knows" this (its text embedding of a noisy caption is far from
    the image); the learner is untrained (random embeddings). The images of the uids in
    `undecodable` are not images (a learner that embeds them dead-letters them). Returns
    the noisy uids.
    """
    rng = np.random.default_rng(0)
    corpus, ref, lrn = (os.path.join(root, x) for x in ("corpus", "ref", "lrn"))
    noisy, n = set(), 0
    cards = {"ref": _card("r"), "lrn": _card("l")}
    for r, card in cards.items():
        formats.write_model_card(os.path.join(root, r), card)
    for s, size in enumerate(shards):
        uids = [f"{n + i:06x}" for i in range(size)]
        table = pa.table({
            "uid": uids,
            "image": [b"not an image" if u in undecodable else _png(n + i)
                      for i, u in enumerate(uids)],
            "image_format": ["png"] * size, "caption": [f"caption {u}" for u in uids],
            "source": ["test"] * size, "source_location": [f"s{s}:{i}" for i in range(size)],
            "url": [f"http://example.invalid/{u}" for u in uids], "license": [None] * size})
        info = formats.write_shard(corpus, f"{s:05d}", table, schema=formats.CORPUS_SCHEMA)
        image = _unit(rng.normal(size=(size, D)))
        is_noisy = np.arange(n, n + size) % noisy_every == 1
        noisy |= {u for u, z in zip(uids, is_noisy) if z}
        ref_text = np.where(is_noisy[:, None], _unit(rng.normal(size=(size, D))), image)
        keep = [i for i, u in enumerate(uids) if u not in missing]
        for r, img, txt in (("ref", image, ref_text),
                            ("lrn", _unit(rng.normal(size=(size, D))),
                             _unit(rng.normal(size=(size, D))))):
            emb = formats.Embeddings(
                uids=[uids[i] for i in keep], image=img[keep].astype(np.float16),
                text=txt[keep].astype(np.float16), model_digest=cards[r].model_digest,
                corpus_shard_sha256=info.sha256)
            formats.write_embeddings_shard(os.path.join(root, r), f"{s:05d}", emb)
        n += size
    return corpus, ref, lrn, noisy


def _cfg(root, out="out", **kw):
    corpus, ref, lrn = (os.path.join(root, x) for x in ("corpus", "ref", "lrn"))
    base = dict(corpus=corpus, output=os.path.join(root, out), batch_size=8,
                super_batch_size=40, method="jest", chunks=4, seed=1, round=0,
                reference=ref, learner=lrn)
    return select.SelectConfig(**{**base, **kw})


def _run(cfg, runner="FnApiRunner"):
    pipeline = beam.Pipeline(options=PipelineOptions([f"--runner={runner}"]))
    return select.run_select(cfg, test_pipeline=pipeline)


def _manifest(out):
    return pa.concat_tables(formats.read_shard(s, schema=formats.MANIFEST_SCHEMA)
                            for s in formats.list_shards(os.path.join(out, "manifest")))


def _file_digests(out):
    return file_digests(out, skip=())


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("select"))
    make_corpus(root, missing={"000003", "00005a"})
    return root


@pytest.fixture(scope="module")
def jest_run(corpus_root):
    cfg = _cfg(corpus_root)
    return cfg, _run(cfg)


def test_accounting_and_exact_super_batches(jest_run):
    cfg, stats = jest_run
    m = _manifest(cfg.output).to_pylist()
    assert stats["seen"] == len(m) == 157
    assert len({r["uid"] for r in m}) == 157  # Every example decided exactly once.
    reasons = collections.Counter(r["reason"] for r in m)
    assert reasons["dead_letter:missing_reference_embedding"] == 2
    assert stats["dead_letters_by_reason"] == {"missing_reference_embedding": 2}
    # 155 valid examples -> 3 super-batches of exactly 40, 35 carried.
    assert stats["super_batches"] == 3 and stats["carried"] == 35
    assert stats["selected"] == 24 and stats["rejected"] == 96
    assert (stats["selected"] + stats["rejected"] + stats["dead_lettered"] + stats["carried"]
            + stats["outside_slice"]) == stats["seen"]
    per_sb = collections.Counter(r["super_batch"] for r in m if r["reason"] in
                                 ("selected", "rejected"))
    assert sorted(per_sb.values()) == [40, 40, 40]
    chosen = collections.Counter(r["super_batch"] for r in m if r["selected"])
    assert sorted(chosen.values()) == [8, 8, 8]
    for r in m:
        if r["selected"]:
            assert r["chunk"] is not None and r["score"] is not None
            assert r["learner_loss"] is not None and r["reference_loss"] is not None
        else:
            assert r["chunk"] is None and r["position"] is None


def test_shards_hold_whole_sub_batches_in_selection_order(jest_run):
    cfg, stats = jest_run
    shards = os.path.join(cfg.output, "shards")
    sizes = json.load(open(os.path.join(shards, "sizes.json")))
    assert sum(sizes.values()) == stats["selected"]
    samples = [s for name in sorted(sizes)
               for s in formats.iter_wds_samples(os.path.join(shards, name))]
    assert [len(list(formats.iter_wds_samples(os.path.join(shards, n)))) for n in sorted(sizes)] \
        == [sizes[n] for n in sorted(sizes)]
    m = {r["uid"]: r for r in _manifest(cfg.output).to_pylist()}
    for k in range(0, len(samples), cfg.batch_size):
        batch = samples[k:k + cfg.batch_size]
        assert len({s["json"]["super_batch"] for s in batch}) == 1
        assert [s["json"]["position"] for s in batch] == list(range(cfg.batch_size))
    for s in samples:
        assert m[s["uid"]]["selected"] and s["json"]["round"] == 0
        assert s["caption"] == f"caption {s['uid']}" and s["image"] == _png(int(s["uid"], 16))
        assert s["json"]["url"] == f"http://example.invalid/{s['uid']}"
    assert json.load(open(os.path.join(cfg.output, "_SUCCESS")))["files"]
    assert not os.path.exists(os.path.join(cfg.output, "_work"))


def test_jest_avoids_planted_noise(corpus_root, jest_run):
    cfg, stats = jest_run
    _, _, _, noisy = make_corpus(os.path.join(corpus_root, "again"), missing={"000003", "00005a"})
    selected = [r["uid"] for r in _manifest(cfg.output).to_pylist() if r["selected"]]
    noisy_share = sum(u in noisy for u in selected) / len(selected)
    uniform = _cfg(corpus_root, out="uniform", method="uniform")
    _run(uniform)
    uniform_sel = [r["uid"] for r in _manifest(uniform.output).to_pylist() if r["selected"]]
    uniform_share = sum(u in noisy for u in uniform_sel) / len(uniform_sel)
    assert noisy_share < 0.1 < 0.3 < uniform_share
    assert stats["mean_batch_score_selected"] > stats["mean_batch_score_random"]


def test_reproducible_across_reruns_and_runners(corpus_root, jest_run):
    cfg, _ = jest_run
    first = _file_digests(cfg.output)
    bundle = dataclasses.replace(cfg, output=os.path.join(corpus_root, "bundle"))
    _run(bundle, runner="BundleBasedDirectRunner")
    assert _file_digests(bundle.output) == first
    _run(cfg)  # Rerun in place: identical bytes, nothing stale left behind.
    assert _file_digests(cfg.output) == first


def test_new_round_new_permutation_and_slices(corpus_root, jest_run):
    cfg, _ = jest_run
    sb0 = {r["uid"]: r["super_batch"] for r in _manifest(cfg.output).to_pylist()}
    next_round = _cfg(corpus_root, out="r1", round=1, super_batch_range=(1, 3))
    stats = _run(next_round)
    m = _manifest(next_round.output).to_pylist()
    sb1 = {r["uid"]: r["super_batch"] for r in m}
    assert sum(sb0[u] != sb1[u] for u in sb0 if sb0[u] is not None and sb1[u] is not None) > 50
    assert stats["outside_slice"] == 40 and stats["super_batches"] == 2
    assert {r["super_batch"] for r in m if r["reason"] == "outside_slice"} == {0}


def test_errors(corpus_root, tmp_path):
    with pytest.raises(ValueError, match="needs --learner"):
        _cfg(corpus_root, learner=None)
    with pytest.raises(ValueError, match="batch size"):
        _cfg(corpus_root, batch_size=41)
    # Embeddings of another model than model.json claims are refused.
    bad = _cfg(corpus_root, out="bad", reference=os.path.join(corpus_root, "lrn"),
               learner=os.path.join(corpus_root, "ref"))
    formats.write_model_card(os.path.join(str(tmp_path), "swapped"), _card("x"))
    swapped = dataclasses.replace(bad, reference=os.path.join(str(tmp_path), "swapped"))
    for fname in os.listdir(os.path.join(corpus_root, "ref")):
        if fname != "model.json":
            os.link(os.path.join(corpus_root, "ref", fname),
                    os.path.join(str(tmp_path), "swapped", fname))
    with pytest.raises(Exception, match="made by model"):
        _run(swapped)


def test_shards_load_with_webdataset_and_open_clip_train(jest_run):
    import argparse

    import open_clip
    import webdataset as wds
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms

    cfg, stats = jest_run
    shards = os.path.join(cfg.output, "shards")
    names = sorted(json.load(open(os.path.join(shards, "sizes.json"))))
    urls = [os.path.join(shards, n) for n in names]
    seen = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")]
    assert len(seen) == stats["selected"] == len(set(seen))

    brace = os.path.join(shards, "{%s..%s}.tar" % (names[0][:-4], names[-1][:-4]))
    args = argparse.Namespace(train_data=brace, val_data=None, train_num_samples=None,
                              dataset_resampled=False, train_data_upsampling_factors=None,
                              seed=0, batch_size=4, workers=0, world_size=1)
    preprocess = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.tokenize)
    assert info.dataloader.num_samples == stats["selected"]  # Read from our sizes.json.
    images, texts = next(iter(info.dataloader))
    assert images.shape == (4, 3, 8, 8) and texts.shape == (4, 77)


def test_uid_slice_restricts_candidates(corpus_root):
    chosen = [f"{i:06x}" for i in range(1, 157) if i not in (3, 0x5a)][::-1][:80]  # 2 x S
    uids_url = os.path.join(corpus_root, "slice.parquet")
    formats.write_uids(uids_url, chosen)
    cfg = _cfg(corpus_root, out="sliced", uids=uids_url)
    stats = _run(cfg)
    m = _manifest(cfg.output).to_pylist()
    assert stats["outside_slice"] == 157 - 80 and stats["super_batches"] == 2
    assert stats["carried"] == 0 and stats["dead_lettered"] == 0
    assert {r["uid"] for r in m if r["reason"] in ("selected", "rejected")} == set(chosen)


def test_selection_flops_are_measured_per_super_batch(jest_run):
    """stats.json counts the selection matmuls: 3 super-batches of one measured select."""
    import torch
    from jest_core import sampler, scores
    from training.flops import count_flops
    cfg, stats = jest_run
    rng = np.random.default_rng(0)

    def pair():
        return scores.EmbeddingPair(image=torch.from_numpy(_unit(rng.normal(size=(40, D)))).float(),
                                    text=torch.from_numpy(_unit(rng.normal(size=(40, D)))).float(),
                                    logit_scale=T, logit_bias=BIAS)
    inputs = scores.ScoringInputs(learner=pair(), reference=pair(), num_examples=40)
    _, one = count_flops(lambda: sampler.select(
        inputs, method="jest", batch_size=cfg.batch_size, num_chunks=cfg.chunks,
        generator=torch.Generator().manual_seed(0)))
    # At least the cross-term matmuls: 8 S b d (N - 1) / N per super-batch.
    assert one >= 8 * 40 * cfg.batch_size * D * (cfg.chunks - 1) / cfg.chunks
    assert stats["selection_flops"] == stats["super_batches"] * one
