"""Held-out early stopping for the reference: the split, the stopping rule, its cost."""
import os

import pytest

from jest_curate import demo_data, formats
from training import early_stopping
from training import train as train_lib


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("es")
    demo_data.build_demo_corpus(str(root / "demo"), seed=0, noise=0.5, pool_size=40,
                                curated_size=120, eval_size=20, retrieval_size=10,
                                shard_size=50)
    return root, str(root / "demo" / "curated")


def _uids(url):
    return [u for s in formats.list_shards(url)
            for u in formats.read_shard(s, columns=["uid"]).column("uid").to_pylist()]


def test_holdout_split_is_disjoint_complete_and_reused(curated):
    root, url = curated
    split = early_stopping.split_holdout(url, str(root / "split"), fraction=0.25, seed=3)
    train, held = _uids(split["train"]), _uids(split["holdout"])
    assert sorted(train + held) == sorted(_uids(url)) and not set(train) & set(held)
    assert split["counts"] == {"train": len(train), "holdout": len(held)}
    assert 15 <= len(held) <= 45  # ~30 of 120.
    mtime = os.path.getmtime(os.path.join(root, "split", "split.json"))
    assert early_stopping.split_holdout(url, str(root / "split"), fraction=0.25, seed=3) == split
    assert os.path.getmtime(os.path.join(root, "split", "split.json")) == mtime
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        early_stopping.split_holdout(url, str(root / "x"), fraction=1.0, seed=3)


def _config(root, data, name):
    return train_lib.TrainConfig(model="jest-vit-micro-28", output=str(root / name), data=data,
                                 data_format="canonical", batch_size=16, total_steps=10,
                                 precision="fp32", tensorboard=False)


def test_stops_after_patience_evaluations_without_improvement(curated, monkeypatch):
    root, url = curated
    split = early_stopping.split_holdout(url, str(root / "split"), fraction=0.25, seed=3)
    losses = iter([3.0, 2.0, 2.5, 2.1, 9.9])  # Best at step 4; steps 6 and 8 do not improve.
    monkeypatch.setattr(early_stopping, "holdout_loss",
                        lambda ckpt, holdout, batch_size: {"loss": next(losses), "flops": 100})
    cfg = _config(root, split["train"], "stopped")
    record = early_stopping.train_with_early_stopping(cfg, holdout=split["holdout"],
                                                      eval_every=2, patience=2)
    assert [h["step"] for h in record["history"]] == [2, 4, 6, 8]
    assert record["best_step"] == 4 and record["best_holdout_loss"] == 2.0
    assert record["best_checkpoint"] == train_lib.checkpoint_url(cfg.output, 4)
    assert record["stopped_at_step"] == 8 and record["stopped_early"] is True
    # Everything spent: the 8 steps trained (not just 4) and four held-out passes.
    ckpt = formats.load_checkpoint(train_lib.checkpoint_url(cfg.output, 8))
    assert record["training_flops"] == ckpt.extra["flops"] > 0
    assert record["holdout_flops"] == 400
    assert record["flops"] == ckpt.extra["flops"] + 400
    assert not os.path.exists(train_lib.checkpoint_url(cfg.output, 10))
    # Finished: a rerun returns the record without training again.
    monkeypatch.setattr(train_lib, "train", lambda config: pytest.fail("retrained"))
    assert early_stopping.train_with_early_stopping(
        cfg, holdout=split["holdout"], eval_every=2, patience=2) == record


def test_holdout_loss_of_a_real_checkpoint(curated):
    root, url = curated
    split = early_stopping.split_holdout(url, str(root / "split"), fraction=0.25, seed=3)
    cfg = _config(root, split["train"], "real")
    record = early_stopping.train_with_early_stopping(cfg, holdout=split["holdout"],
                                                      eval_every=5, patience=3)
    assert [h["step"] for h in record["history"]] == [5, 10]
    assert record["stopped_early"] is False and record["stopped_at_step"] == 10
    assert all(h["holdout_loss"] > 0 for h in record["history"]) and record["holdout_flops"] > 0
