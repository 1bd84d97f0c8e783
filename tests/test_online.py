"""Online selection in the trainer (issue 15 item 4, issue 18 item 3).

- A super-batch selected online gets the round job's manifest rows when the round job
  scores it with a checkpoint of the trainer's weights at that step.
- Every step accounts for its S candidates: b selected, the rest rejected or dead-lettered.
- A run interrupted mid-round (or between its last checkpoint and the round's commit)
  resumes to the same checkpoints and the same manifest, byte for byte.
- Two gloo processes each select b/2 of their half of every super-batch, with the same
  function of the weights; the merged manifest holds every candidate once.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from jest_curate import formats
from pipelines import layout as layout_stage
from pipelines import round_job
from tests.test_select import make_corpus
from training import main as trainer_cli
from training import model as model_lib
from training import online as online_lib
from training import scoring
from training import train as train_lib
from training.distributed import World

REPO = Path(__file__).resolve().parents[1]
MODEL, S, B, CHUNKS, SEED = "jest-vit-micro-28", 16, 4, 2, 1
FIRST, STOP = 1, 5  # Four steps, starting mid-shard (two super-batches per shard).
UNDECODABLE = {f"{i:06x}" for i in range(0, 157, 7)}  # Learner dead letters.
BEAM = ["--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def pass_layout(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("online"))
    corpus, reference, _, _ = make_corpus(root, missing={"000003"}, undecodable=UNDECODABLE)
    spec = layout_stage.layout_spec(pool=corpus, reference=reference, seed=3, pass_index=0,
                                    super_batch_size=S, shard_rows=2 * S)
    out = os.path.join(root, "pass_000")
    layout_stage.run_layout(spec, out, BEAM)
    return out


def _config(pass_layout: str, root: Path, *, first=FIRST, stop=STOP, **kw):
    online = online_lib.OnlineConfig(
        layout=pass_layout, first_super_batch=first, stop_super_batch=stop,
        output=str(root / "selection"), round=2, method="jest", chunks=CHUNKS, seed=SEED)
    return train_lib.TrainConfig(
        model=MODEL, output=str(root / "learner"), data=None, online=online, batch_size=B,
        total_steps=stop - first, learning_rate=1e-2, precision="fp32", device="cpu",
        tensorboard=False, **{"checkpoint_every": 1, **kw})


def _manifest(selection: str) -> pa.Table:
    infos = formats.read_index(formats.join_url(selection, "manifest"))
    return pa.concat_tables([formats.read_shard(i, schema=formats.ROUND_MANIFEST_SCHEMA)
                             .replace_schema_metadata(None) for i in infos])


def _rows_of(table: pa.Table, super_batch: int) -> pa.Table:
    return table.filter(pa.compute.equal(table.column("super_batch"), super_batch))


@pytest.fixture(scope="module")
def online_run(pass_layout, tmp_path_factory):
    """One uninterrupted online run of four steps (a checkpoint after every step)."""
    root = tmp_path_factory.mktemp("run")
    config = _config(pass_layout, root)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_lib.train(config)
    finally:
        torch.set_num_threads(saved)
    return config, result


def test_online_selection_equals_the_round_jobs_with_the_same_weights(pass_layout, online_run,
                                                                      tmp_path):
    config, result = online_run
    online = _manifest(config.online.output)
    stats = formats.read_json(formats.join_url(config.online.output, "stats.json"))
    for t in (0, 3):  # The initial weights, and weights three steps on.
        job = round_job.RoundJobConfig(
            slices=(round_job.RoundSlice(2, pass_layout, FIRST + t, FIRST + t + 1,
                                         str(tmp_path / f"round_{t}")),),
            method="jest", batch_size=B, super_batch_size=S, chunks=CHUNKS, seed=SEED,
            learner=scoring.ScoringSpec(model=MODEL,
                                        checkpoint=train_lib.checkpoint_url(config.output, t)))
        offline_stats = round_job.run_round_job(job, BEAM)[2]
        offline = _manifest(str(tmp_path / f"round_{t}"))
        assert offline.equals(_rows_of(online, FIRST + t)), t
        # The same ledger: the learner's FLOPs per candidate, measured alike.
        per_example = offline_stats["scoring_flops"] / offline_stats["scored"]
        assert stats["scoring_flops"] == pytest.approx(stats["scored"] * per_example)
    assert set(offline_stats) <= set(stats) and stats["mode"] == "online"
    assert result.scoring_flops == round(stats["scoring_flops"]) > 0
    assert result.selection_flops == stats["selection_flops"] > 0
    assert result.flops > 0 and result.examples_seen == (STOP - FIRST) * B


def test_cheap_scoring_settings_and_flexi_training_match_the_round_job_too(pass_layout,
                                                                         tmp_path, one_thread):
    """Scoring at a lower resolution, with patch dropout, in bf16; training at two."""
    config = _config(pass_layout, tmp_path, stop=FIRST + 2, low_res_size=14,
                     low_res_fraction=0.5)
    scoring_settings = dict(image_size=14, patch_dropout=0.5, precision="bf16")
    config = dataclasses.replace(config, online=dataclasses.replace(
        config.online, method="hard-learner", **scoring_settings))
    train_lib.train(config)
    job = round_job.RoundJobConfig(
        slices=(round_job.RoundSlice(2, pass_layout, FIRST + 1, FIRST + 2,
                                     str(tmp_path / "round")),),
        method="hard-learner", batch_size=B, super_batch_size=S, chunks=CHUNKS, seed=SEED,
        learner=scoring.ScoringSpec(model=MODEL, **scoring_settings,
                                    checkpoint=train_lib.checkpoint_url(config.output, 1)))
    round_job.run_round_job(job, BEAM)
    assert _manifest(str(tmp_path / "round")).equals(
        _rows_of(_manifest(config.online.output), FIRST + 1))


def test_every_step_accounts_for_its_super_batch(online_run):
    config, _ = online_run
    manifest = _manifest(config.online.output)
    stats = formats.read_json(formats.join_url(config.online.output, "stats.json"))
    dead = 0
    for sb in range(FIRST, STOP):
        rows = _rows_of(manifest, sb).to_pylist()
        reasons = [r["reason"] for r in rows]
        assert len(rows) == S and len({r["uid"] for r in rows}) == S
        assert reasons.count("selected") == B
        assert reasons.count("selected") + reasons.count("rejected") + sum(
            r.startswith("dead_letter:") for r in reasons) == S
        assert sorted(r["position"] for r in rows if r["selected"]) == list(range(B))
        for r in rows:  # Undecodable images are dead letters, never trained on.
            assert (r["uid"] in UNDECODABLE) == r["reason"].startswith("dead_letter:")
        dead += sum(r.startswith("dead_letter:") for r in reasons)
    assert dead > 0  # The test covers learner dead letters.
    assert stats["seen"] == (STOP - FIRST) * S and stats["dead_lettered"] == dead
    assert stats["selected"] + stats["rejected"] + stats["dead_lettered"] == stats["seen"]
    assert stats["scored"] == stats["seen"] - dead
    assert not os.path.exists(os.path.join(config.online.output, "online_steps"))


class _Killed(Exception):
    pass


def test_an_interrupted_online_run_resumes_to_the_same_checkpoints_and_manifest(
        pass_layout, online_run, tmp_path, monkeypatch, one_thread):
    reference, reference_result = online_run
    config = _config(pass_layout, tmp_path, checkpoint_every=2)
    steps = Path(config.online.output) / "online_steps"
    real_step, real_commit = train_lib.Trainer.train_step, online_lib.commit_round

    def dies_at_step_3(trainer, examples, local=False):
        if trainer.step == 3:  # Step 3's rows are on disk; the last checkpoint is step 2.
            raise _Killed()
        return real_step(trainer, examples, local)

    monkeypatch.setattr(train_lib.Trainer, "train_step", dies_at_step_3)
    with pytest.raises(_Killed):
        train_lib.train(config)
    assert sorted(p.name for p in steps.glob("*.parquet")) == [
        f"{sb:08d}-r000.parquet" for sb in range(FIRST, FIRST + 4)]
    assert train_lib.latest_checkpoint(config.output).endswith("step_00000002.pt")

    def commit_dies(*args, **kwargs):  # Killed after the last checkpoint, before the commit.
        raise _Killed()

    monkeypatch.setattr(train_lib.Trainer, "train_step", real_step)
    monkeypatch.setattr(online_lib, "commit_round", commit_dies)
    resumed = dataclasses.replace(config, resume=True)
    with pytest.raises(_Killed):
        train_lib.train(resumed)
    monkeypatch.setattr(online_lib, "commit_round", real_commit)
    result = train_lib.train(resumed)  # Nothing left to train: only the commit.

    for field in ("step", "examples_seen", "flops", "scoring_flops", "selection_flops"):
        assert getattr(result, field) == getattr(reference_result, field), field
    final = f"checkpoints/step_{STOP - FIRST:08d}.pt"
    a, b = (formats.load_checkpoint(os.path.join(c.output, final)).state_dict
            for c in (reference, config))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("manifest/_index.json", "manifest/00000.parquet", "manifest/00001.parquet",
                 "manifest/00002.parquet"):
        assert formats.sha256_file(os.path.join(config.online.output, name)) == \
            formats.sha256_file(os.path.join(reference.online.output, name)), name
    for name in ("stats.json", "_SUCCESS"):  # Measured costs live in metrics.json.
        assert formats.sha256_file(os.path.join(config.online.output, name)) == \
            formats.sha256_file(os.path.join(reference.online.output, name)), name


def test_the_online_flags_rebuild_the_config():
    config = _config("L", Path("o"), checkpoint_every=0)
    config = dataclasses.replace(config, online=dataclasses.replace(
        config.online, method="hard-learner", temperature=0.5, image_size=14,
        patch_dropout=0.25, precision="bf16", compute_dtype="bf16", scoring_batch_size=8))
    argv = trainer_cli.train_argv(config)
    assert trainer_cli._train_config(trainer_cli.parse_train_args(argv)) == config
    with pytest.raises(ValueError, match="--online-seed needs --online-layout"):
        trainer_cli._train_config(trainer_cli.parse_train_args(
            ["--model", MODEL, "--output", "o", "--shards", "d", "--steps", "3",
             "--online-seed", "3"]))


def test_a_super_batch_that_does_not_split_over_the_processes_is_refused(pass_layout,
                                                                         tmp_path):
    config = _config(pass_layout, tmp_path)
    with pytest.raises(ValueError, match="both must be divisible by 3"):
        online_lib.OnlineSource(config.online, batch_size=B, model=torch.nn.Linear(1, 1),
                                model_name=MODEL, model_cfg={}, world=World(rank=0, size=3))


# --------------------------------------------------------------------------- 2 processes

class _PartOf(World):
    """Rank k of 2 without a process group: the selection of one part, in this process."""

    def sum(self, values):
        return list(values)

    def barrier(self):
        pass


def test_two_processes_select_their_halves_and_account_every_candidate_once(pass_layout,
                                                                            tmp_path,
                                                                            one_thread):
    first, stop = 0, 3
    config = _config(pass_layout, tmp_path, first=first, stop=stop, num_threads=1)
    argv = [sys.executable, "-m", "jest_curate.cli", "train",
            *trainer_cli.train_argv(config), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    latest = formats.read_json(os.path.join(config.output, "checkpoints", "latest.json"))
    stats = formats.read_json(os.path.join(config.online.output, "stats.json"))
    assert latest["examples_seen"] == (stop - first) * B and stats["world_size"] == 2
    assert latest["scoring_flops"] == round(stats["scoring_flops"]) > 0
    manifest = _manifest(config.online.output)
    layout = formats.read_layout(pass_layout)
    assert manifest.num_rows == stats["seen"] == (stop - first) * S
    assert len(set(manifest.column("uid").to_pylist())) == manifest.num_rows
    ckpt = formats.load_checkpoint(train_lib.checkpoint_url(config.output, 0))
    for t, sb in enumerate(range(first, stop)):
        (shard,) = layout.shards_between(sb, sb + 1)
        candidates = formats.read_row_groups(formats.read_shard_bytes(shard.info),
                                             [sb - shard.first_super_batch])
        rows = _rows_of(manifest, sb)
        assert rows.column("uid").to_pylist() == candidates.column("uid").to_pylist()
        for k in range(2):  # Rank k chose b/2 of its half, positions after rank k-1's.
            half = rows.slice(k * S // 2, S // 2).to_pylist()
            assert sorted(r["position"] for r in half if r["selected"]) == [2 * k, 2 * k + 1]
        ckpt = formats.load_checkpoint(train_lib.checkpoint_url(config.output, t))
        model = model_lib.build_model(ckpt.model_cfg)
        model_lib.load_weights(model, ckpt.state_dict)
        for k in range(2):  # The same function of the step's weights, run here.
            part = dataclasses.replace(config.online, output=str(tmp_path / f"part_{t}_{k}"))
            source = online_lib.OnlineSource(part, batch_size=B, model=model,
                                             model_name=MODEL, model_cfg=ckpt.model_cfg,
                                             world=_PartOf(rank=k, size=2))
            source.select(sb)
            step = tmp_path / f"part_{t}_{k}" / "online_steps" / f"{sb:08d}-r{k:03d}.parquet"
            mine = formats.read_shard(str(step)).replace_schema_metadata(None)
            assert mine.equals(rows.slice(k * S // 2, S // 2)), (sb, k)
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == stop - first


def test_the_trainer_imports_neither_beam_nor_pipelines():
    """Online selection shares the round job's code through training/, not pipelines/."""
    code = ("import sys, training.main; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'pipelines')]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
