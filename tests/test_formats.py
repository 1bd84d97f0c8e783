"""Round trips and failure modes of every on-disk format in jest_curate.formats."""
import dataclasses
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from jest_curate import formats, hashing


# ----------------------------------------------------------------------------- hashing

def test_fields_are_length_prefixed_and_typed():
    assert hashing.blake2b_fields("ab", "c") != hashing.blake2b_fields("a", "bc")
    assert hashing.blake2b_fields(1) != hashing.blake2b_fields("1")
    assert hashing.blake2b_fields(True) != hashing.blake2b_fields(1)
    assert hashing.blake2b_fields(b"x") != hashing.blake2b_fields("x")
    with pytest.raises(TypeError):
        hashing.blake2b_fields(1.5)


def test_hashes_are_stable_across_processes():
    # Golden values: a change here silently reshuffles every user's rounds.
    assert hashing.hash_u64("seed", 0, "select") == int.from_bytes(
        hashing.blake2b_fields("seed", 0, "select", digest_size=8), "big")
    assert hashing.blake2b_fields("jest", 7).hex() == "fee806cf02deef584d7744650724b90a"
    seeds = {hashing.derive_seed(0, "round", r) for r in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------- sharded parquet

def _corpus_table(n=5, offset=0):
    return pa.table({
        "uid": [f"{i + offset:04x}" for i in range(n)],
        "image": [bytes([i % 256]) * 10 for i in range(n)],
        "image_format": ["png"] * n,
        "caption": [f"caption {i}" for i in range(n)],
        "source": ["test"] * n,
        "source_location": [f"file{i}" for i in range(n)],
        "url": [None] * n,
        "license": ["cc-by"] * n,
    })


def test_corpus_round_trip_and_determinism(tmp_path):
    root = str(tmp_path / "corpus")
    table = _corpus_table()
    info = formats.write_shard(root, "00000", table, schema=formats.CORPUS_SCHEMA)
    again = formats.write_shard(str(tmp_path / "other"), "00000", table,
                                schema=formats.CORPUS_SCHEMA)
    assert info.sha256 == again.sha256 == formats.sha256_file(info.url)
    [listed] = formats.list_shards(root)
    assert listed == info
    back = formats.read_shard(listed, schema=formats.CORPUS_SCHEMA)
    assert back.drop_columns([]).to_pylist() == table.to_pylist()
    batches = list(formats.iter_shard_batches(listed, batch_size=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]


@pytest.mark.parametrize("schema,rows", [
    (formats.LABELED_CORPUS_SCHEMA, None),
    (formats.NOISE_SCHEMA, {"uid": ["a", "b"], "noisy": [True, False],
                            "noise_kind": ["wrong_item", "exact_duplicate"],
                            "caption_kind": ["wrong_item", "clean"]}),
    (formats.MANIFEST_SCHEMA, {
        "uid": ["a", "b"], "round": [0, 0], "super_batch": [3, None],
        "selected": [True, False], "reason": ["selected", "dead_letter:missing_learner"],
        "chunk": [1, None], "position": [0, None], "score": [0.5, None],
        "learner_loss": [1.0, None], "reference_loss": [0.5, None]}),
    (formats.DEAD_LETTER_SCHEMA, {"uid": [None, "x"], "reason": ["bad_tar_path", "empty_caption"],
                                  "detail": ["../etc/passwd", ""], "source_location": ["a", "b"]}),
])
def test_every_parquet_schema_round_trips(tmp_path, schema, rows):
    if rows is None:
        table = _corpus_table().append_column("label", pa.array([1, 2, 3, 4, 5], pa.int32()))
    else:
        table = pa.table(rows)
    info = formats.write_shard(str(tmp_path), "s0", table, schema=schema)
    back = formats.read_shard(info, schema=schema)
    assert back.to_pylist() == table.cast(pa.schema([schema.field(n) for n in schema.names]))\
        .to_pylist()
    assert info.schema_name == schema.metadata[b"jest.schema"].decode()


def test_uncommitted_and_tampered_shards(tmp_path):
    root = str(tmp_path)
    formats.write_shard(root, "00000", _corpus_table(), schema=formats.CORPUS_SCHEMA)
    # A data file without its marker (crashed writer) is invisible.
    formats.write_bytes_atomic(os.path.join(root, "00001.parquet"), b"partial")
    assert [s.shard_id for s in formats.list_shards(root)] == ["00000"]
    # Temp files of in-flight writes are invisible too.
    (tmp_path / "_tmp.abc.00002.parquet").write_bytes(b"x")
    assert [s.shard_id for s in formats.list_shards(root)] == ["00000"]
    # A marker that disagrees with the data is caught on read.
    marker = tmp_path / "00000.parquet.commit"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "num_rows": 99}))
    with pytest.raises(formats.FormatError, match="commit marker says 99"):
        formats.read_shard(formats.list_shards(root)[0])


def test_index_is_the_dataset_and_drop_lists_are_honoured(tmp_path):
    root = str(tmp_path / "ds")
    a = formats.write_shard(root, "a", _corpus_table(5), schema=formats.CORPUS_SCHEMA)
    b = formats.write_shard(root, "b", _corpus_table(3, offset=10), schema=formats.CORPUS_SCHEMA)
    dropped = formats.write_drop_list(a, pa.table({"row": [3, 0], "uid": ["0003", "0000"],
                                                   "reason": ["duplicate_image"] * 2}))
    assert (dropped.num_rows, dropped.rows_in_file, dropped.sha256) == (3, 5, a.sha256)
    assert dropped.version != a.version == a.sha256
    doc = formats.write_index(root, [b, dropped], writer="test", fields={"a": {"source": "s"}})
    assert (doc["num_shards"], doc["num_rows"]) == (2, 6)
    # A shard written after the index is not part of the dataset.
    formats.write_shard(root, "c", _corpus_table(2), schema=formats.CORPUS_SCHEMA)
    listed = formats.list_shards(root)
    assert listed == [dropped, b] and len(formats.scan_shards(root)) == 3
    assert json.loads((tmp_path / "ds" / "_index.json").read_text())["shards"][0]["source"] == "s"
    # Readers skip the dropped rows, whole or in batches.
    want = ["0001", "0002", "0004"]
    assert formats.read_shard(listed[0]).column("uid").to_pylist() == want
    batches = formats.iter_shard_batches(listed[0], batch_size=2)
    assert [u for batch in batches for u in batch.column("uid").to_pylist()] == want
    # A drop list that does not match the index is refused, not trusted.
    (tmp_path / "ds" / "a.drop.parquet").write_bytes(b"tampered")
    with pytest.raises(formats.FormatError, match="do not match the sha256"):
        formats.read_shard(listed[0])
    # Unfinished: _INCOMPLETE wins over an index.
    formats.mark_incomplete(root, "jest-curate ingest")
    with pytest.raises(formats.FormatError, match="ingest did not finish"):
        formats.list_shards(root)
    formats.clear_incomplete(root)
    formats.remove_index(root)  # Without an index: every committed marker.
    assert [s.shard_id for s in formats.list_shards(root)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="distinct"):
        formats.write_drop_list(a, pa.table({"row": [1, 1], "uid": ["x", "x"],
                                             "reason": ["r", "r"]}))


def test_shard_write_errors(tmp_path):
    with pytest.raises(ValueError, match="invalid shard id"):
        formats.write_shard(str(tmp_path), "../x", _corpus_table(), schema=formats.CORPUS_SCHEMA)
    with pytest.raises(formats.FormatError, match="missing columns"):
        formats.write_shard(str(tmp_path), "a", _corpus_table().drop_columns(["caption"]),
                            schema=formats.CORPUS_SCHEMA)
    bad = _corpus_table().set_column(3, "caption", pa.array([None] * 5, pa.string()))
    with pytest.raises(formats.FormatError, match="caption"):
        formats.write_shard(str(tmp_path), "a", bad, schema=formats.CORPUS_SCHEMA)
    with pytest.raises(FileNotFoundError):
        formats.list_shards(str(tmp_path / "nope"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(formats.FormatError, match="not a readable parquet"):
        formats.read_shard(str(tmp_path / "junk.parquet"))


# ----------------------------------------------------------------------------- embeddings

def _embeddings(n=6, d=8, seed=0, digest="m" * 32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return formats.Embeddings(uids=[f"u{i}" for i in range(n)], image=x[0].astype(np.float16),
                              text=x[1].astype(np.float16), model_digest=digest,
                              corpus_shard_sha256="c" * 64)


def test_embeddings_round_trip(tmp_path):
    emb = _embeddings()
    info = formats.write_embeddings_shard(str(tmp_path), "00000", emb)
    back = formats.read_embeddings_shard(info, expect_model_digest=emb.model_digest)
    assert back.uids == emb.uids and back.model_digest == emb.model_digest
    np.testing.assert_array_equal(back.image, emb.image)
    np.testing.assert_array_equal(back.text, emb.text)
    assert back.image.dtype == np.float16
    assert formats.shard_metadata(info)["jest.corpus_shard_sha256"] == "c" * 64


def test_embeddings_refuse_nan_and_other_models(tmp_path):
    emb = _embeddings()
    bad = dataclasses.replace(emb, image=np.full_like(emb.image, np.nan))
    with pytest.raises(ValueError, match="NaN"):
        formats.write_embeddings_shard(str(tmp_path), "a", bad)
    info = formats.write_embeddings_shard(str(tmp_path), "b", emb)
    with pytest.raises(formats.FormatError, match="made by model"):
        formats.read_embeddings_shard(info, expect_model_digest="other")
    # NaNs written by a foreign writer (bypassing our check) are caught on read.
    table = formats.read_shard(info)
    vec = pa.FixedSizeListArray.from_arrays(
        pa.array(np.full(6 * 8, np.nan, np.float16)), 8)
    table = table.set_column(1, "image_embedding", vec)
    formats.write_shard(str(tmp_path), "c", table, schema=table.schema)
    with pytest.raises(formats.FormatError, match="NaN"):
        formats.read_embeddings_shard(formats.list_shards(str(tmp_path))[-1])
    with pytest.raises(formats.FormatError, match="not an embeddings shard"):
        corpus = formats.write_shard(str(tmp_path), "d", _corpus_table(),
                                     schema=formats.CORPUS_SCHEMA)
        formats.read_embeddings_shard(corpus)


# ----------------------------------------------------------------------------- model.json

def _card(**kw):
    base = dict(model_name="m", model_cfg={"embed_dim": 8}, checkpoint_sha256="ab" * 32,
                logit_scale=10.0, logit_bias=-10.0,
                preprocess=formats.Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3),
                flops_per_example=1e6)
    return formats.ModelCard(**{**base, **kw})


def test_model_card_round_trip_and_digest(tmp_path):
    card = _card()
    formats.write_model_card(str(tmp_path), card)
    back = formats.read_model_card(str(tmp_path))
    assert back == card and back.model_digest == card.model_digest
    # Everything that changes embeddings changes the digest; measured FLOPs do not.
    assert _card(precision="bf16").model_digest != card.model_digest
    assert _card(patch_dropout=0.5).model_digest != card.model_digest
    assert _card(checkpoint_sha256="cd" * 32).model_digest != card.model_digest
    assert _card(preprocess=formats.Preprocess(image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
                 ).model_digest != card.model_digest
    assert _card(logit_bias=-9.0).model_digest != card.model_digest
    assert _card(flops_per_example=2e6).model_digest == card.model_digest


def test_model_card_rejects_unknown_keys_and_tampering(tmp_path):
    data = _card().to_json()
    with pytest.raises(formats.FormatError, match="unknown keys"):
        formats.ModelCard.from_json({**data, "typo_key": 1})
    with pytest.raises(formats.FormatError, match="does not match its contents"):
        formats.ModelCard.from_json({**data, "precision": "bf16"})
    with pytest.raises(formats.FormatError, match="inconsistent preprocessing"):
        formats.Preprocess(image_size=32, mean=(0.5,), std=(0.5,) * 3)
    with pytest.raises(FileNotFoundError, match="no model.json"):
        formats.read_model_card(str(tmp_path))


# ----------------------------------------------------------------------------- checkpoints

def _state_dict():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}


def test_checkpoint_round_trip(tmp_path):
    url = str(tmp_path / "ck.pt")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    ck = formats.Checkpoint(state_dict=_state_dict(), step=7, model_cfg={"embed_dim": 8},
                            model_name="m", optimizer=opt.state_dict(),
                            extra={"examples_seen": 123})
    sha = formats.save_checkpoint(url, ck)
    assert sha == formats.sha256_file(url)
    back = formats.load_checkpoint(url)
    assert back.step == 7 and back.model_cfg == {"embed_dim": 8} and back.model_name == "m"
    assert back.extra == {"examples_seen": 123}
    assert torch.equal(back.state_dict["w"], ck.state_dict["w"])
    assert back.optimizer["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]


def test_open_clip_train_checkpoint_is_accepted(tmp_path):
    url = str(tmp_path / "epoch_3.pt")
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in
                                                          _state_dict().items()}}, url)
    back = formats.load_checkpoint(url)
    assert set(back.state_dict) == {"w", "b"} and back.model_cfg is None and back.step == 3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/jest_curate_pwned",))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        formats.load_checkpoint(str(tmp_path / "missing.pt"))
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Exploit()}, evil)
    with pytest.raises(formats.CheckpointError, match="refusing to load"):
        formats.load_checkpoint(str(evil))
    assert not os.path.exists("/tmp/jest_curate_pwned")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(formats.CheckpointError):
        formats.load_checkpoint(str(raw))
    assert not os.path.exists("/tmp/jest_curate_pwned")
    good = tmp_path / "good.pt"
    formats.save_checkpoint(str(good), formats.Checkpoint(_state_dict(), 1, None))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(formats.CheckpointError, match="not a readable torch checkpoint"):
        formats.load_checkpoint(str(truncated))
    notdict = tmp_path / "list.pt"
    torch.save([1, 2], notdict)
    with pytest.raises(formats.CheckpointError, match="expected a dict"):
        formats.load_checkpoint(str(notdict))
    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "weights": [1]}, other)
    with pytest.raises(formats.CheckpointError, match="neither"):
        formats.load_checkpoint(str(other))


# ----------------------------------------------------------------------------- run config

def _run_config(**kw):
    base = dict(name="t", seed=3, method="jest", batch_size=8, steps_per_round=2, rounds=2,
                learner_model="jest-vit-micro-28", reference_model="jest-vit-micro-28",
                filter_ratio=0.8, chunks=4)
    return formats.RunConfig(**{**base, **kw})


def test_run_config_round_trip(tmp_path):
    cfg = _run_config()
    assert cfg.resolved_super_batch_size == 40
    url = str(tmp_path / "run.json")
    formats.write_json_atomic(url, cfg.to_json())
    back = formats.read_run_config(url)
    assert back == cfg
    recorded = json.loads(open(url).read())["derived_seeds"]
    assert recorded == cfg.derived_seeds() and len(set(recorded.values())) == len(recorded)
    assert _run_config(seed=4).derived_seeds() != cfg.derived_seeds()


@pytest.mark.parametrize("kw,match", [
    (dict(method="best"), "method"),
    (dict(super_batch_size=40), "exactly one"),
    (dict(filter_ratio=1.0), "filter_ratio"),
    (dict(batch_size=0), "batch_size"),
    (dict(temperature=0.0), "temperature"),
    (dict(score_precision="fp8"), "score_precision"),
    (dict(chunks=16), "chunks"),  # Joint selection draws N <= b chunks.
])
def test_run_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _run_config(**kw)


def test_run_config_rejects_unknown_keys_and_edited_seeds():
    data = _run_config().to_json()
    with pytest.raises(formats.FormatError, match="unknown keys"):
        formats.RunConfig.from_json({**data, "lr": 1})
    with pytest.raises(formats.FormatError, match="derived_seeds"):
        formats.RunConfig.from_json({**data, "derived_seeds": {"select": 1}})
