"""Broken inputs past ingest: each a clear error (or a dead letter), never a wrong result.

Corrupt or truncated embeddings files, embeddings of another model or corpus version,
NaNs in embeddings (stored, or produced by a broken model), hand-edited model cards,
and checkpoints that are arbitrary pickles.
"""
import builtins
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from jest_curate import formats
from pipelines import embed
from pipelines import rounds
from tests.test_select import _card, _cfg, _run, make_corpus
from training import model as model_lib
from training import train as train_lib

MODEL = "jest-vit-micro-28"
SHARD = "00001"


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inputs"))
    make_corpus(root)
    return root


@pytest.fixture
def damaged(corpus_root, tmp_path):
    """A private copy of the reference embeddings to damage; returns (cfg, its root)."""
    ref = str(tmp_path / "ref")
    shutil.copytree(os.path.join(corpus_root, "ref"), ref)
    return _cfg(corpus_root, out=str(tmp_path / "out"), reference=ref), ref


def _shard_url(root: str) -> str:
    return os.path.join(root, f"{SHARD}.parquet")


def _assert_refused(cfg, match: str) -> None:
    with pytest.raises(Exception, match=match):
        _run(cfg)
    assert not os.path.exists(os.path.join(cfg.output, "_SUCCESS"))
    assert not os.path.exists(os.path.join(cfg.output, "stats.json"))


def test_truncated_embeddings_are_a_clear_error(damaged):
    cfg, ref = damaged
    url = _shard_url(ref)
    with open(url, "rb") as f:
        data = f.read()
    with open(url, "wb") as f:
        f.write(data[:len(data) // 2])
    _assert_refused(cfg, "do not match the sha256 in its commit marker")
    # Even a marker rewritten to vouch for the truncated bytes does not make them readable.
    marker = formats.read_json(url + ".commit")
    formats.write_json_atomic(url + ".commit", {**marker, "sha256": formats.sha256_file(url)})
    _assert_refused(cfg, "not a readable parquet file")


def _flip_until_silently_wrong(url: str) -> int:
    """Flip one bit of the file so that parquet still decodes it, to other values."""
    with open(url, "rb") as f:
        good = f.read()
    original = formats.read_embeddings_shard(url)
    for pos in range(len(good) // 4, len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x04
        with open(url, "wb") as f:
            f.write(bytes(bad))
        try:
            decoded = formats.read_embeddings_shard(url)  # A URL: no marker, no sha check.
        except (formats.FormatError, ValueError, OSError):
            continue
        if not np.array_equal(decoded.image, original.image):
            return pos
    raise AssertionError("no silently-wrong bit flip found")


def test_corrupted_embeddings_are_refused_not_used(damaged):
    cfg, ref = damaged
    _flip_until_silently_wrong(_shard_url(ref))  # Parquet itself would not notice...
    _assert_refused(cfg, "do not match the sha256")  # ...the commit marker's sha256 does.


def test_embed_reembeds_a_corrupted_shard_instead_of_trusting_its_cache(corpus_root, tmp_path):
    output = str(tmp_path / "emb")
    argv = ["--corpus", os.path.join(corpus_root, "corpus"), "--model", MODEL,
            "--output", output, "--batch-size", "64", "--runner=FnApiRunner"]
    embed.run(argv)
    before = formats.read_embeddings_shard(formats.committed_shard(output, SHARD))
    _flip_until_silently_wrong(_shard_url(output))
    with pytest.raises(formats.FormatError, match="sha256"):
        formats.read_embeddings_shard(formats.committed_shard(output, SHARD))
    embed.run(argv)  # The rerun sees the damage and re-embeds that shard.
    after = formats.read_embeddings_shard(formats.committed_shard(output, SHARD))
    assert after.uids == before.uids and np.array_equal(after.image, before.image)


def test_embeddings_of_another_model_or_corpus_version_are_refused(corpus_root, damaged):
    cfg, ref = damaged
    good = formats.read_embeddings_shard(_shard_url(ref))
    corpus_sha = good.corpus_shard_sha256
    # One shard's file metadata names another model than the directory's model.json.
    formats.write_embeddings_shard(ref, SHARD, formats.Embeddings(
        good.uids, good.image, good.text, _card("x").model_digest, corpus_sha))
    _assert_refused(cfg, "made by model")
    # The right model, but embeddings of an older version of the corpus shard.
    formats.write_embeddings_shard(ref, SHARD, formats.Embeddings(
        good.uids, good.image, good.text, good.model_digest, "0" * 64))
    _assert_refused(cfg, "embeds another version of corpus shard")


def test_nan_embeddings_in_a_file_are_refused(damaged):
    cfg, ref = damaged
    good = formats.read_embeddings_shard(_shard_url(ref))
    image = good.image.copy()
    image[3, 5] = np.nan
    d = image.shape[1]

    def vectors(arr):
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), d)

    # write_embeddings_shard refuses NaNs, so write the file as a buggy writer would.
    table = pa.table([pa.array(good.uids), vectors(image), vectors(good.text)],
                     schema=formats.embeddings_schema(d))
    formats.write_shard(ref, SHARD, table, schema=formats.embeddings_schema(d), metadata={
        "jest.model_digest": good.model_digest,
        "jest.corpus_shard_sha256": good.corpus_shard_sha256})
    _assert_refused(cfg, "NaN")


def test_a_model_that_outputs_nan_fails_embed_and_commits_no_embeddings(corpus_root, tmp_path):
    _, cfg = model_lib.load_model_config(MODEL)
    net = model_lib.build_model(cfg)
    state = net.state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    checkpoint = str(tmp_path / "nan.pt")
    formats.save_checkpoint(checkpoint, formats.Checkpoint(state_dict=state, step=0,
                                                           model_cfg=cfg, model_name=MODEL))
    output = str(tmp_path / "emb")
    with pytest.raises(Exception, match="contain NaN"):
        embed.run(["--corpus", os.path.join(corpus_root, "corpus"), "--model", MODEL,
                   "--checkpoint", checkpoint, "--output", output, "--runner=FnApiRunner"])
    assert not any(n.endswith(".parquet.commit") for n in os.listdir(output))
    assert not os.path.exists(os.path.join(output, "stats.json"))


def test_a_hand_edited_model_card_is_refused(damaged):
    cfg, ref = damaged
    card = formats.read_json(os.path.join(ref, "model.json"))
    card["preprocess"]["image_size"] = 16  # Claims another scoring resolution.
    formats.write_json_atomic(os.path.join(ref, "model.json"), card)
    _assert_refused(cfg, "does not match its contents")


class _Payload:
    """Unpickling this creates a file: proof that the pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture(params=["raw-pickle", "torch-save"])
def evil_checkpoint(request, tmp_path):
    proof = str(tmp_path / "code-ran")
    url = str(tmp_path / "evil.pt")
    if request.param == "raw-pickle":
        with open(url, "wb") as f:
            pickle.dump({"state_dict": _Payload(proof)}, f)
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(proof)}, url)
    # The payload is live: an unsafe load runs it (then the test starts clean).
    if request.param == "raw-pickle":
        with open(url, "rb") as f:
            pickle.load(f)
    else:
        torch.load(url, weights_only=False)
    assert os.path.exists(proof)
    os.remove(proof)
    return url, proof


def test_arbitrary_pickle_checkpoints_are_refused_everywhere(corpus_root, evil_checkpoint,
                                                             tmp_path, capsys):
    url, proof = evil_checkpoint
    with pytest.raises(formats.CheckpointError, match="refusing to load|not a readable"):
        formats.load_checkpoint(url)
    with pytest.raises(formats.CheckpointError):
        model_lib.model_from_checkpoint(url)  # eval
    # embed's CLI: one clear line, exit status 2.
    assert embed.main(["--corpus", os.path.join(corpus_root, "corpus"), "--model", MODEL,
                       "--checkpoint", url, "--output", str(tmp_path / "emb"),
                       "--runner=FnApiRunner"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jest-curate embed: error:") and ("refusing to load" in err
                                                            or "not a readable" in err)
    # The trainer resuming from it (the newest checkpoint of a run).
    run_dir = tmp_path / "learner"
    train_lib.train(train_lib.TrainConfig(model=MODEL, output=str(run_dir), data=None,
                                          batch_size=8, total_steps=4, stop_at_step=0,
                                          precision="fp32", tensorboard=False))
    shutil.copy(url, run_dir / "checkpoints" / "step_00000002.pt")
    with pytest.raises(formats.CheckpointError):
        train_lib.train(train_lib.TrainConfig(
            model=MODEL, output=str(run_dir), data=os.path.join(corpus_root, "corpus"),
            data_format="canonical", batch_size=8, total_steps=4, precision="fp32",
            resume=True, tensorboard=False))
    # A rounds run whose reference checkpoint it is fails before any stage runs.
    cfg = formats.RunConfig(
        name="evil", seed=0, method="jest", batch_size=8, super_batch_size=40, chunks=4,
        steps_per_round=1, rounds=1, learner_model=MODEL, reference_model=MODEL,
        pool=os.path.join(corpus_root, "corpus"), reference_checkpoint=url)
    with pytest.raises(formats.CheckpointError):
        rounds.run_rounds(cfg, str(tmp_path / "run"), beam_args=["--runner=FnApiRunner"])
    assert not os.path.exists(tmp_path / "run" / "reference_embeddings" / "model.json")
    assert not os.path.exists(proof), "unpickling ran the checkpoint's code"


def test_select_reads_embeddings_through_their_index(corpus_root, damaged):
    """A shard file whose marker is intact but which the index does not list is not part of
    the embeddings: select dead-letters its rows (it never lists markers)."""
    cfg, ref = damaged
    formats.write_index(ref, [s for s in formats.scan_shards(ref) if s.shard_id != SHARD],
                        writer="test")
    assert os.path.exists(_shard_url(ref) + ".commit")
    stats = _run(cfg)
    rows = formats.list_shards(os.path.join(corpus_root, "corpus"))
    missing = next(s.num_rows for s in rows if s.shard_id == SHARD)
    assert stats["dead_letters_by_reason"] == {"missing_reference_embedding": missing}


def test_select_without_embeddings_for_some_rows_dead_letters_them(corpus_root, damaged):
    """A missing embeddings shard is not an error: its rows are dead letters, counted."""
    cfg, ref = damaged
    formats.remove_shard(ref, SHARD)
    stats = _run(cfg)
    rows = formats.list_shards(os.path.join(corpus_root, "corpus"))
    missing = next(s.num_rows for s in rows if s.shard_id == SHARD)
    assert stats["dead_letters_by_reason"] == {"missing_reference_embedding": missing}
    assert (stats["selected"] + stats["rejected"] + stats["carried"] + stats["dead_lettered"]
            + stats["outside_slice"]) == stats["seen"]
