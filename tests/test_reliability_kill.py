"""Kill and resume: SIGKILLed trainers and rounds runs lose and duplicate nothing.

The killed processes are real subprocesses (`python -m jest_curate.cli ...`) in their
own process group, killed with SIGKILL: no cleanup code runs. Resumed runs are
compared with uninterrupted ones, bit for bit on the CPU in fp32 with one thread
(float sums depend on how work is split over threads).
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jest_curate import demo_data
from jest_curate import formats
from pipelines import faults
from pipelines import round_job
from pipelines import rounds
from tests.conftest import torch_threads
from tests.test_reliability_faults import pytestmark  # noqa: F401 (needs Fashion-MNIST)
from training import train as train_lib

MODEL = "jest-vit-micro-28"
REPO = Path(__file__).resolve().parents[1]
BEAM = ["--runner=FnApiRunner"]
TIMEOUT = 300


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _cli(*argv) -> list:
    return [sys.executable, "-m", "jest_curate.cli", *argv]


def _start(argv, **env) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL `proc`'s process group as soon as `ready()` holds (it must still be running)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before {what} (exit {proc.returncode}): "
                                 f"{proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _run(argv, **env) -> None:
    result = subprocess.run(argv, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


def _same_training_state(a_url: str, b_url: str) -> None:
    a, b = formats.load_checkpoint(a_url), formats.load_checkpoint(b_url)
    assert a.step == b.step
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    for sa, sb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor)
                   else sa[k] == sb[k] for k in sa)
    # The same examples were consumed: counts, and the position in the data source.
    for key in ("examples_seen", "flops", "dropped"):
        assert a.extra[key] == b.extra[key], key
    assert a.extra["data_position"]["batches"] == b.extra["data_position"]["batches"]


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("kill")
    data = str(root / "data")
    demo_data.build_demo_corpus(data, seed=0, noise=0.5, pool_size=200, curated_size=64,
                                eval_size=8, retrieval_size=4, shard_size=64)
    return root, data


# --------------------------------------------------------------------------- trainer

TRAIN_STEPS, ROUND_END, EVERY = 24, 18, 3


def _train_argv(data: str, output: str) -> list:
    return _cli("train", "--shards", os.path.join(data, "curated"), "--data-format",
                "canonical", "--model", MODEL, "--output", output, "--steps", str(TRAIN_STEPS),
                "--stop-at-step", str(ROUND_END), "--batch-size", "16", "--checkpoint-every",
                str(EVERY), "--precision", "fp32", "--device", "cpu", "--seed", "3",
                "--no-tensorboard", "--log-every", "100", "--resume")


def test_trainer_sigkilled_mid_round_resumes_bit_for_bit(demo):
    root, data = demo
    uninterrupted = train_lib.train(train_lib.TrainConfig(
        model=MODEL, output=str(root / "train_a"), data=os.path.join(data, "curated"),
        data_format="canonical", batch_size=16, total_steps=TRAIN_STEPS,
        stop_at_step=ROUND_END, checkpoint_every=EVERY, precision="fp32", device="cpu", seed=3,
        resume=True, tensorboard=False, log_every=100))
    killed = root / "train_b" / "checkpoints"
    second = killed / f"step_{2 * EVERY:08d}.pt"  # Two periodic checkpoints: well under way.
    _kill_when(_start(_train_argv(data, str(root / "train_b"))), second.exists,
               "the second periodic checkpoint")
    steps = sorted(int(p.name[5:13]) for p in killed.glob("step_*.pt"))
    assert 2 * EVERY <= steps[-1] < ROUND_END, steps  # Killed mid-round.
    _run(_train_argv(data, str(root / "train_b")))
    _same_training_state(uninterrupted.checkpoint, str(killed / f"step_{ROUND_END:08d}.pt"))
    latest = formats.read_json(str(killed / "latest.json"))
    assert latest["step"] == ROUND_END and latest["examples_seen"] == ROUND_END * 16


# --------------------------------------------------------------------------- rounds

def _digests(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "rounds").rglob("*"))
            if p.is_file() and p.name != round_job.METRICS}  # Measured seconds vary.


def test_rounds_killed_mid_shard_resume_to_the_uninterrupted_outputs(demo):
    root, data = demo
    reference = train_lib.train(train_lib.TrainConfig(
        model=MODEL, output=str(root / "reference"), data=os.path.join(data, "curated"),
        data_format="canonical", batch_size=16, total_steps=2, precision="fp32",
        tensorboard=False))
    cfg = formats.RunConfig(
        name="kill", seed=5, method="jest", batch_size=8, super_batch_size=40, chunks=4,
        steps_per_round=1, rounds=2, learner_model=MODEL, reference_model=MODEL,
        train_precision="fp32", pool=os.path.join(data, "pool"),
        reference_checkpoint=reference.checkpoint)
    config = root / "run.json"
    config.write_text(json.dumps(cfg.to_json()))
    ref_emb = str(root / "ref_emb")
    out_a, out_b = root / "rounds_a", root / "rounds_b"
    rounds.run_rounds(cfg, str(out_a), reference_embeddings=ref_emb, beam_args=BEAM)

    # Round 1's job hangs while writing its first tar (half of it is on disk).
    markers = root / "markers"
    plan = {"dir": str(markers), "seed": 0, "points": {
        "round.write_tar": {"after": 1, "limit": 1, "action": "hang"}}}
    argv = _cli("rounds", "--config", str(config), "--output", str(out_b),
                "--reference-embeddings", ref_emb, *BEAM)
    _kill_when(_start(argv, **{faults.ENV_VAR: json.dumps(plan)}),
               lambda: any(markers.glob("*/*.fired")), "round 1 writing a curated shard")
    selection = out_b / "rounds" / "r0001" / "selection"
    torn = (selection / "shards" / "00000.tar").read_bytes()
    assert not torn.endswith(formats.TAR_END)  # Killed mid-shard...
    assert not (selection / "_SUCCESS").exists()  # ...so the stage is not committed,
    assert (out_b / "rounds" / "r0000" / "round.json").exists()  # but round 0 is.
    assert not (out_b / "rounds" / "r0001" / "round.json").exists()

    _run(argv)  # Resume (no faults): round 0 is kept, round 1 redone from its select.
    a, b = _digests(out_a), _digests(out_b)
    assert a.keys() == b.keys()
    # round.json records absolute checkpoint paths; everything else is byte-identical.
    assert sorted(k for k in a if a[k] != b[k] and not k.endswith("round.json")) == []
    final = f"step_{cfg.rounds * cfg.steps_per_round:08d}.pt"
    _same_training_state(str(out_a / "learner" / "checkpoints" / final),
                         str(out_b / "learner" / "checkpoints" / final))
    for r in range(cfg.rounds):  # Every pool example decided exactly once per round.
        stats = formats.read_json(str(out_b / "rounds" / f"r{r:04d}" / "selection" /
                                      "stats.json"))
        assert stats["selected"] == cfg.batch_size * cfg.steps_per_round
        assert (stats["selected"] + stats["rejected"] + stats["dead_lettered"]
                == stats["seen"] == cfg.super_batch_size * cfg.steps_per_round)
    summary_a = formats.read_json(str(out_a / "summary.json"))
    summary_b = formats.read_json(str(out_b / "summary.json"))
    assert summary_a == summary_b
