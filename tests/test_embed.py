"""Scoring pipeline (issue 5): embeddings, cache, dead letters, checkpoints, FLOPs, Dataflow.

The corpus is real Fashion-MNIST photos (Debian's dataset-fashion-mnist) plus a few
broken images; the model is jest-vit-micro-28 on the CPU, run by FnApiRunner.
"""
import gzip
import io
import logging
import pickle
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from PIL import Image

from jest_curate import cli
from jest_curate import formats
from pipelines import embed
from training import model as model_lib
from training import preprocess
from training import scoring

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
MODEL = "jest-vit-micro-28"
BATCH = 64  # Several batches per shard, so regrouping and row order are exercised.
# fp16 storage: a unit vector's components round to within 2**-11 relative (< 5e-4 absolute).
FP16_ATOL = 2e-3
RUNNER = "--runner=FnApiRunner"

pytestmark = pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                                reason="needs Fashion-MNIST: scripts/get_fashion_mnist.sh")


# --------------------------------------------------------------------------- #
# Fixtures: corpus, checkpoints, one embedded output
# --------------------------------------------------------------------------- #

def _idx(name: str) -> np.ndarray:
    data = gzip.decompress((FASHION_MNIST / name).read_bytes())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""
    data = bytearray(_png(np.zeros((2, 2), np.uint8)))
    ihdr = 12  # 8-byte signature, 4-byte length, then b"IHDR".
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


BROKEN = {  # corpus row -> (bytes maker, expected dead-letter reason)
    310: (lambda good: b"this is not an image", "undecodable_image"),
    333: (lambda good: good[:len(good) // 2], "undecodable_image"),  # Truncated PNG.
    401: (lambda good: _png_claiming_size(9000, 9000), "image_too_large"),
}


def _corpus_rows(start: int, stop: int) -> list:
    images, labels = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
    rows = []
    for i in range(start, stop):
        data = _png(images[i])
        reason = None
        if i in BROKEN:
            make, reason = BROKEN[i]
            data = make(data)
        rows.append({"uid": f"fmnist-t10k-{i:05d}", "image": data, "image_format": "png",
                     "caption": f"a photo of a {CLASSES[labels[i]]}", "source": "fashion-mnist",
                     "source_location": f"t10k-images-idx3-ubyte.gz#{i}", "url": None,
                     "license": "MIT"})
    return rows


def _write_corpus_shard(root, shard_id: str, rows: list) -> formats.ShardInfo:
    table = pa.Table.from_pylist(rows, schema=formats.CORPUS_SCHEMA)
    return formats.write_shard(str(root), shard_id, table, schema=formats.CORPUS_SCHEMA)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """shard-000: 300 clean rows; shard-001: 150 rows, 3 broken; shard-002: all broken."""
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus_shard(root, "shard-000", _corpus_rows(0, 300))
    _write_corpus_shard(root, "shard-001", _corpus_rows(300, 450))
    broken = _corpus_rows(450, 452)
    for row in broken:
        row["image"] = b"\x89PNG garbage"
    _write_corpus_shard(root, "shard-002", broken)
    return str(root)


def _state_dict(name: str = MODEL, seed: int = 123) -> tuple:
    _, cfg = model_lib.load_model_config(name)
    torch.manual_seed(seed)
    return model_lib.build_model(cfg).state_dict(), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state_dict, cfg = _state_dict()
    url = str(tmp_path_factory.mktemp("ckpt") / "reference.pt")
    formats.save_checkpoint(url, formats.Checkpoint(state_dict=state_dict, step=7, model_cfg=cfg,
                                                    model_name=MODEL))
    return url


def _counters(result) -> dict:
    found = result.metrics().query(MetricsFilter().with_namespace(embed.NAMESPACE))
    return {c.key.metric.name: c.committed for c in found["counters"]}


def _run(corpus, output, *extra, checkpoint=None):
    argv = ["--corpus", corpus, "--model", MODEL, "--output", str(output),
            "--batch-size", str(BATCH), RUNNER, *extra]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    return embed.run(argv)


@pytest.fixture(scope="module")
def embedded(corpus, checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("embeddings") / "out"
    result = _run(corpus, output, checkpoint=checkpoint)
    return str(output), result


def _snapshot(root) -> dict:
    """(mtime, size) of every file and directory: temp files would change a directory's."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in Path(root).rglob("*")}


# --------------------------------------------------------------------------- #
# The pipeline
# --------------------------------------------------------------------------- #

def test_embeddings_equal_a_direct_model_call(corpus, checkpoint, embedded):
    output, _ = embedded
    ckpt = formats.load_checkpoint(checkpoint)
    _, cfg = model_lib.load_model_config(MODEL)
    model = model_lib.build_model(cfg)
    model_lib.load_weights(model, ckpt.state_dict)
    contract = model_lib.preprocess_contract(cfg)
    card = formats.read_model_card(output)
    assert card.checkpoint_sha256 == formats.sha256_file(checkpoint)
    assert card.preprocess == contract
    assert (card.logit_scale, card.logit_bias) == pytest.approx(model_lib.logit_params(model))
    assert card.flops_per_example > 0

    for shard in formats.list_shards(corpus):
        rows = formats.read_shard(shard).to_pylist()
        good = [r for r in rows if r["uid"] not in _dead_uids(output, shard.shard_id)]
        emb = formats.read_embeddings_shard(formats.join_url(output, f"{shard.shard_id}.parquet"),
                                            expect_model_digest=card.model_digest)
        assert emb.uids == [r["uid"] for r in good]  # Same order as the corpus shard.
        assert emb.corpus_shard_sha256 == shard.sha256
        if not good:
            continue
        with torch.no_grad():
            image, text = model_lib.encode(
                model, preprocess.preprocess_images([r["image"] for r in good], contract),
                preprocess.tokenize([r["caption"] for r in good], contract))
        np.testing.assert_allclose(emb.image.astype(np.float32), image.numpy(), atol=FP16_ATOL)
        np.testing.assert_allclose(emb.text.astype(np.float32), text.numpy(), atol=FP16_ATOL)
        np.testing.assert_allclose(np.linalg.norm(emb.image.astype(np.float32), axis=1), 1.0,
                                   atol=1e-2)


def _dead_uids(output, shard_id) -> set:
    table = formats.read_shard(formats.join_url(str(output), embed.DEAD_LETTER_DIR,
                                                f"{shard_id}.parquet"),
                               schema=formats.DEAD_LETTER_SCHEMA)
    return set(table.column("uid").to_pylist())


def test_every_row_is_embedded_or_dead_lettered(corpus, embedded):
    output, result = embedded
    dead = formats.read_shard(formats.join_url(output, embed.DEAD_LETTER_DIR,
                                               "shard-001.parquet")).to_pylist()
    assert {d["uid"]: d["reason"] for d in dead} == {
        f"fmnist-t10k-{i:05d}": reason for i, (_, reason) in BROKEN.items()}
    for d in dead:
        assert d["detail"]
        assert d["source_location"] == f"t10k-images-idx3-ubyte.gz#{int(d['uid'][-5:])}"
    assert " at 0x" not in " ".join(d["detail"] for d in dead)  # No object addresses.

    stats = formats.read_json(formats.join_url(output, embed.STATS_FILE))
    assert stats["shards"] == {
        "shard-000": {"rows": 300, "embedded": 300, "dead_lettered": 0, "not_requested": 0},
        "shard-001": {"rows": 150, "embedded": 147, "dead_lettered": 3, "not_requested": 0},
        "shard-002": {"rows": 2, "embedded": 0, "dead_lettered": 2, "not_requested": 0}}
    assert (stats["rows"], stats["embedded"], stats["dead_lettered"]) == (452, 447, 5)
    for shard in formats.list_shards(corpus):
        corpus_uids = formats.read_shard(shard, columns=["uid"]).column("uid").to_pylist()
        emb = formats.read_embeddings_shard(formats.join_url(output, f"{shard.shard_id}.parquet"))
        dead_uids = _dead_uids(output, shard.shard_id)
        assert sorted(emb.uids + list(dead_uids)) == sorted(corpus_uids)
        assert not set(emb.uids) & dead_uids

    counters = _counters(result)
    assert counters["seen"] == 452
    assert counters["embedded"] == 447
    assert counters["dead_letter"] == 5
    assert counters["dead_letter_undecodable_image"] == 4
    assert counters["dead_letter_image_too_large"] == 1
    assert counters["batches"] == 5 + 3 + 1
    assert counters["shards_embedded"] == 3
    assert "shards_cached" not in counters


def test_rerun_writes_nothing(corpus, checkpoint, embedded):
    output, _ = embedded
    before = _snapshot(output)
    result = _run(corpus, output, checkpoint=checkpoint)
    assert _snapshot(output) == before
    counters = _counters(result)
    assert counters["shards_cached"] == 3
    assert "shards_embedded" not in counters and "seen" not in counters


def test_grown_corpus_embeds_only_new_shards(corpus, checkpoint, embedded, tmp_path):
    grown, output = tmp_path / "corpus", tmp_path / "out"
    shutil.copytree(corpus, grown)
    shutil.copytree(embedded[0], output)  # copy2 keeps mtimes.
    _write_corpus_shard(grown, "shard-003", _corpus_rows(500, 540))
    before = _snapshot(output)
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    result = embed.run(["--corpus", str(grown), "--model", MODEL, "--output", str(output),
                        "--checkpoint", checkpoint, "--batch-size", str(BATCH)],
                       test_pipeline=pipeline)
    after = _snapshot(output)
    changed = {name for name in after
               if before.get(name) != after[name] and (output / name).is_file()}
    assert changed == {"shard-003.parquet", "shard-003.parquet.commit",
                       "_dead_letter/shard-003.parquet", "_dead_letter/shard-003.parquet.commit",
                       "_index.json", "_dead_letter/_index.json", "stats.json"}
    counters = _counters(result)
    assert (counters["shards_cached"], counters["shards_embedded"], counters["seen"]) == (3, 1, 40)


def test_uids_restricts_the_run_to_a_slice(corpus, checkpoint, embedded, tmp_path):
    """--uids (a round's slice of the pool) embeds only those rows, from the same model."""
    slice_uids = [f"fmnist-t10k-{i:05d}" for i in (3, 77, 299, 305, 310, 451)]
    uids_file = tmp_path / "slice.parquet"
    pq.write_table(pa.table({"uid": pa.array(slice_uids[::-1], pa.string())}),
                           uids_file)
    output = tmp_path / "out"
    result = _run(corpus, output, "--uids", str(uids_file), checkpoint=checkpoint)
    full = {s: formats.read_embeddings_shard(formats.join_url(embedded[0], f"{s}.parquet"))
            for s in ("shard-000", "shard-001")}
    for shard_id, want in (("shard-000", [3, 77, 299]), ("shard-001", [305])):
        emb = formats.read_embeddings_shard(str(output / f"{shard_id}.parquet"))
        assert emb.uids == [f"fmnist-t10k-{i:05d}" for i in want]  # Corpus order.
        rows = [full[shard_id].uids.index(u) for u in emb.uids]
        np.testing.assert_array_equal(emb.image, full[shard_id].image[rows])
    assert _dead_uids(output, "shard-001") == {"fmnist-t10k-00310"}
    assert _dead_uids(output, "shard-002") == {"fmnist-t10k-00451"}
    stats = formats.read_json(str(output / embed.STATS_FILE))
    assert (stats["embedded"], stats["dead_lettered"], stats["not_requested"]) == (4, 2, 446)
    assert _counters(result)["not_requested"] == 446

    before = _snapshot(output)
    assert _counters(_run(corpus, output, "--uids", str(uids_file),
                          checkpoint=checkpoint))["shards_cached"] == 3
    assert _snapshot(output) == before
    pq.write_table(pa.table({"uid": pa.array(slice_uids[:2], pa.string())}), uids_file)
    counters = _counters(_run(corpus, output, "--uids", str(uids_file), checkpoint=checkpoint))
    assert counters["shards_embedded"] == 3 and counters["embedded"] == 2  # Another slice.


def test_other_models_output_is_refused_unless_overwrite(corpus, checkpoint, embedded, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(embedded[0], output)
    old_digest = formats.read_model_card(str(output)).model_digest
    # A shard of the old model whose corpus shard is gone: it must not survive either.
    formats.write_embeddings_shard(str(output), "orphan", formats.read_embeddings_shard(
        str(output / "shard-000.parquet")))
    with pytest.raises(embed.OutputConflictError, match="another model"):
        _run(corpus, output, "--patch-dropout", "0.5", checkpoint=checkpoint)

    _run(corpus, output, "--patch-dropout", "0.5", "--overwrite", checkpoint=checkpoint)
    card = formats.read_model_card(str(output))
    assert card.patch_dropout == 0.5 and card.model_digest != old_digest
    shards = formats.list_shards(str(output))
    assert [s.shard_id for s in shards] == ["shard-000", "shard-001", "shard-002"]
    assert {formats.shard_metadata(s)["jest.model_digest"] for s in shards} == {card.model_digest}


def test_cli_reports_input_errors_in_one_line(corpus, tmp_path, capsys):
    code = cli.main(["embed", "--corpus", corpus, "--model", MODEL, "--output",
                     str(tmp_path / "out"), "--checkpoint", str(tmp_path / "nope.pt"), RUNNER])
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no dataset"):
        _run(str(tmp_path / "no-corpus"), tmp_path / "out")


def test_bad_corpus_shard_is_a_clear_error(tmp_path):
    table = pa.table({"uid": ["a"], "text": ["not a corpus"]})
    formats.write_shard(str(tmp_path / "corpus"), "bad", table, schema=table.schema)
    with pytest.raises(Exception, match="not a readable corpus shard|not a corpus shard"):
        _run(str(tmp_path / "corpus"), tmp_path / "out")
    assert not formats.list_shards(str(tmp_path / "out"))  # Nothing half-written.


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #

def _spec(checkpoint=None, **kw) -> scoring.ScoringSpec:
    return scoring.ScoringSpec(model=MODEL, checkpoint=checkpoint, **kw)


def test_open_clip_train_checkpoint_gives_the_same_embeddings(checkpoint, tmp_path):
    state_dict, _ = _state_dict()
    model = model_lib.build_model(model_lib.load_model_config(MODEL)[1])
    url = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "reference", "state_dict": {f"module.{k}": v
                                                                 for k, v in state_dict.items()},
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}, url)
    rows = _corpus_rows(0, 16)
    args = ([r["image"] for r in rows], [r["caption"] for r in rows], [r["uid"] for r in rows])
    ours = scoring.load_scoring_model(_spec(checkpoint), measure=False).embed(*args)
    theirs = scoring.load_scoring_model(_spec(str(url)), measure=False).embed(*args)
    np.testing.assert_array_equal(ours.image, theirs.image)
    np.testing.assert_array_equal(ours.text, theirs.text)


class _NotWeights:
    pass


def _write(path: Path, payload) -> str:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return str(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case, error, match", [
    ("missing", FileNotFoundError, "checkpoint not found"),
    ("corrupt", formats.CheckpointError, "not a readable torch checkpoint"),
    ("arbitrary_pickle", formats.CheckpointError, "refusing to load"),
    ("plain_pickle", formats.CheckpointError, "not a readable torch checkpoint|refusing"),
    ("list", formats.CheckpointError, "expected a dict"),
    ("dict_without_tensors", formats.CheckpointError, "neither a jest-curate checkpoint"),
    ("other_config", scoring.ModelConfigError, "different model config"),
    ("other_weights", scoring.ModelConfigError, "do not match the model config"),
])
def test_checkpoint_errors_are_clear(case, error, match, checkpoint, tmp_path):
    path = tmp_path / f"{case}.pt"
    if case == "missing":
        url = str(path)
    elif case == "corrupt":
        url = _write(path, Path(checkpoint).read_bytes()[:5000])
    elif case == "arbitrary_pickle":
        url = _write(path, {"state_dict": _NotWeights()})
    elif case == "plain_pickle":
        url = _write(path, pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "list":
        url = _write(path, [torch.zeros(2)])
    elif case == "dict_without_tensors":
        url = _write(path, {"hello": "world"})
    elif case == "other_config":
        state_dict, cfg = _state_dict("jest-vit-tiny-32")
        url = str(path)
        formats.save_checkpoint(url, formats.Checkpoint(state_dict, step=1, model_cfg=cfg))
    else:  # open_clip_train layout (no config inside), weights of another architecture.
        url = _write(path, {"epoch": 1, "state_dict": _state_dict("jest-vit-tiny-32")[0]})
    with pytest.raises(error, match=match):
        scoring.load_scoring_model(_spec(url), measure=False)


def test_workers_refuse_a_checkpoint_that_changed(checkpoint, tmp_path):
    card = scoring.load_scoring_model(_spec(checkpoint), measure=False).card
    changed = str(tmp_path / "changed.pt")
    formats.save_checkpoint(changed, formats.Checkpoint(_state_dict(seed=5)[0], step=8,
                                                        model_cfg=card.model_cfg))
    with pytest.raises(scoring.ModelConfigError, match="file changed"):
        scoring.scorer_from_card(card, checkpoint=changed)
    rebuilt = scoring.scorer_from_card(card, checkpoint=checkpoint)
    assert rebuilt.card.model_digest == card.model_digest


# --------------------------------------------------------------------------- #
# Cheap scoring: patch dropout, resolution, precision, FLOPs
# --------------------------------------------------------------------------- #

def _vit_micro_image_flops(tokens: int, patches: int) -> int:
    """Analytic forward FLOPs of jest-vit-micro-28's image tower (width 64, MLP 128, 2 layers).

    tokens = kept patches + class token; patches = patch-embedding convolutions.
    """
    width, mlp, layers = 64, 128, 2
    per_layer = (2 * tokens * width * 3 * width + 2 * tokens * width * width  # qkv, out
                 + 2 * 2 * tokens * width * mlp  # fc + proj
                 + 2 * 2 * tokens * tokens * width)  # q k^T and attn v
    conv = 2 * patches * (3 * 7 * 7) * width
    return layers * per_layer + conv + 2 * width * 64  # + final projection to embed_dim


def test_patch_dropout_and_low_resolution_lower_measured_flops(checkpoint):
    full = scoring.measure_flops(scoring.load_scoring_model(_spec(checkpoint), measure=False))
    dropped = scoring.measure_flops(
        scoring.load_scoring_model(_spec(checkpoint, patch_dropout=0.5), measure=False))
    low_res = scoring.load_scoring_model(_spec(checkpoint, image_size=14), measure=False)
    assert low_res.card.preprocess.image_size == 14  # Positions resampled from 4x4 to 2x2.
    small = scoring.measure_flops(low_res)

    assert full.image == _vit_micro_image_flops(tokens=17, patches=16)
    assert dropped.image == _vit_micro_image_flops(tokens=9, patches=16)  # 8 of 16 kept.
    assert small.image == _vit_micro_image_flops(tokens=5, patches=4)
    assert full.text == dropped.text == small.text
    assert small.total < dropped.total < full.total

    # open_clip's own PatchDropout is the identity in eval mode: no saving at all.
    _, cfg = model_lib.load_model_config(MODEL)
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    net = model_lib.build_model(cfg).eval()
    card = scoring.load_scoring_model(_spec(), measure=False).card
    assert scoring.measure_flops(scoring.ScoringModel(net, card)).image == full.image


def test_card_records_measured_flops_and_cheap_settings(checkpoint):
    card = scoring.load_scoring_model(_spec(checkpoint, image_size=14, patch_dropout=0.25,
                                            precision="bf16")).card
    assert card.flops_per_example == scoring.measure_flops(
        scoring.load_scoring_model(_spec(checkpoint, image_size=14, patch_dropout=0.25),
                                   measure=False)).total
    assert (card.preprocess.image_size, card.patch_dropout, card.precision) == (14, 0.25, "bf16")
    digests = {scoring.load_scoring_model(_spec(checkpoint, **kw), measure=False).card.model_digest
               for kw in ({}, {"image_size": 14}, {"patch_dropout": 0.25}, {"precision": "bf16"})}
    assert len(digests) == 4  # Each lever is part of the cache key.


def test_patch_dropout_is_deterministic_per_example_and_really_drops(checkpoint):
    rows = _corpus_rows(0, 32)
    images, captions, uids = ([r["image"] for r in rows], [r["caption"] for r in rows],
                              [r["uid"] for r in rows])
    scorer = scoring.load_scoring_model(_spec(checkpoint, patch_dropout=0.5), measure=False)
    together = scorer.embed(images, captions, uids)
    alone = scorer.embed(images[5:6], captions[5:6], uids[5:6])
    reversed_ = scorer.embed(images[::-1], captions[::-1], uids[::-1])
    np.testing.assert_allclose(alone.image[0], together.image[5], atol=1e-3)
    np.testing.assert_allclose(reversed_.image[::-1], together.image, atol=1e-3)
    full = scoring.load_scoring_model(_spec(checkpoint), measure=False).embed(images, captions,
                                                                             uids)
    assert np.abs(full.image - together.image).max() > 1e-2  # Tokens really were dropped.
    np.testing.assert_array_equal(full.text, together.text)  # Text tower untouched.

    dropout = scorer.model.visual.patch_dropout
    kept = dropout.kept_tokens(scoring.patch_dropout_keys(uids), 16)
    assert kept.shape == (32, 8) and (np.diff(kept, axis=1) > 0).all()
    assert len({tuple(k) for k in kept}) > 16  # Different examples keep different tokens.
    with pytest.raises(RuntimeError, match="per-example keys"):
        with torch.no_grad():
            scorer.model.encode_image(torch.zeros(2, 3, 28, 28))


def test_bf16_embeddings_are_close_to_fp32(checkpoint):
    rows = _corpus_rows(0, 32)
    args = ([r["image"] for r in rows], [r["caption"] for r in rows], [r["uid"] for r in rows])
    fp32 = scoring.load_scoring_model(_spec(checkpoint), measure=False).embed(*args)
    bf16 = scoring.load_scoring_model(_spec(checkpoint, precision="bf16"),
                                      measure=False).embed(*args)
    cosine = (fp32.image.astype(np.float32) * bf16.image.astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.98


# --------------------------------------------------------------------------- #
# Dataflow
# --------------------------------------------------------------------------- #

ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


def test_dataflow_gpu_job_builds_offline(corpus, tmp_path, monkeypatch):
    """The README's DataflowRunner command, with --dry_run=True: built, staged, not sent."""
    from apache_beam.runners.dataflow.internal import apiclient

    attempts = []

    def no_network(self, address, *args):
        attempts.append(address)
        raise OSError(f"test forbids network access ({address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    setup_file = str(Path(embed.__file__).resolve().parents[1] / "setup.py")
    output = tmp_path / "out"
    result = embed.run([  # docs/dataflow.md's command, local data paths (see there).
        "--corpus", corpus, "--model", MODEL, "--output", str(output),
        "--image-size", "14", "--patch-dropout", "0.5", "--precision", "fp32",
        "--device", "cuda", "--batch-size", "512",
        "--runner", "DataflowRunner", "--dry_run=True",
        "--project", "jest-curate-demo", "--region", "us-central1",
        "--temp_location", "gs://jest-curate-demo/dataflow/tmp",
        "--staging_location", "gs://jest-curate-demo/dataflow/staging",
        "--machine_type", "n1-standard-8", "--disk_size_gb", "100",
        "--dataflow_service_options", ACCELERATOR,
        "--experiments", "no_use_multiple_sdk_containers",
        "--number_of_worker_harness_threads", "4", "--max_num_workers", "8",
        "--setup_file", setup_file])
    assert attempts == []
    assert not output.exists()  # Nothing ran.
    job = result.job
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"EmbedCorpus/ReadBatches", "EmbedCorpus/Embed", "EmbedCorpus/WriteShards"} <= names
    staged = {d.role_payload for env in job.proto_pipeline.components.environments.values()
              for d in env.dependencies}
    assert any(b"workflow.tar.gz" in p for p in staged)  # The --setup_file sdist.
    assert not any(b"pickled_main_session" in p for p in staged)
    env = apiclient.Environment([], job.options, "dry-run", "gs://jest-curate-demo/tmp/p.pb",
                                proto_pipeline=job.proto_pipeline)
    assert list(env.proto.service_options) == [ACCELERATOR]
    pool = env.proto.worker_pools[0]
    assert (pool.machine_type, pool.disk_size_gb) == ("n1-standard-8", 100)


def test_embed_is_a_jest_curate_command():
    assert cli.COMMANDS["embed"][0] == "pipelines.embed:main"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", "--help"])
    assert exit_info.value.code == 0


def test_loading_at_another_resolution_resamples_positions_quietly(caplog):
    """Online selection loads weights at the scoring resolution every step: open_clip's
    per-resize INFO line stays out of the log; other root INFO records pass."""
    state_dict, cfg = _state_dict()
    net = model_lib.build_model(cfg, image_size=14)
    with caplog.at_level("INFO"):
        model_lib.load_weights(net, state_dict)
        logging.info("Resizing something else")
    assert net.visual.positional_embedding.shape[0] == (14 // 7) ** 2 + 1
    assert [r.getMessage() for r in caplog.records] == ["Resizing something else"]


def test_flops_are_counted_once_per_architecture_and_setting_per_process(checkpoint,
                                                                        monkeypatch):
    calls = []
    measure = scoring.measure_flops
    monkeypatch.setattr(scoring, "_MEASURED", {})
    monkeypatch.setattr(scoring, "measure_flops", lambda s: calls.append(1) or measure(s))
    settings = ({}, {"image_size": 14}, {"patch_dropout": 0.25}, {"precision": "bf16"})
    cards = [scoring.load_scoring_model(_spec(ckpt, **kw)).card
             for ckpt in (checkpoint, None) for kw in settings]  # Weights are not a key.
    assert len(calls) == len(settings)
    for card in cards:
        fresh = scoring.load_scoring_model(_spec(
            None, image_size=card.preprocess.image_size, patch_dropout=card.patch_dropout,
            precision=card.precision), measure=False)
        assert card.flops_per_example == measure(fresh).total


@pytest.mark.parametrize("model", [MODEL, "jest-vit-flexi-32"])
def test_rows_per_forward_pass_do_not_change_fp32_embeddings(model):
    """The round job's and evaluator's forward passes of FORWARD_ROWS rows (faster than
    256 on a CPU) give the embeddings that 256 would, bit for bit."""
    images = _idx("t10k-images-idx3-ubyte.gz")[:300]
    rows = [_png(x) for x in images]
    captions = [f"a photo of item {i}" for i in range(len(rows))]
    uids = [str(i) for i in range(len(rows))]
    scorer = scoring.load_scoring_model(scoring.ScoringSpec(model=model), measure=False)
    by_size = [scoring.embed_rows(scorer, rows, captions, uids, batch_size=n)
               for n in (scoring.FORWARD_ROWS, 256, 300)]
    for image, text, failed in by_size[1:]:
        assert np.array_equal(image, by_size[0][0]) and np.array_equal(text, by_size[0][1])
        assert failed == by_size[0][2] == []
