"""`jest-curate train` under torchrun (issue 18): 2 gloo processes equal 1 process.

- The gradients of a step, all-reduced over 2 processes (each with half of the global
  batch, the SigLIP loss through open_clip's neighbour exchange), equal one process's.
- The CLI (`--nproc 2`) trains the same run: same loss, examples and FLOPs (global), one
  set of checkpoints written by rank 0; killed mid-run, it resumes bit-for-bit; resuming
  with another process count is a clear error.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jest_curate import formats
from tests.test_train import _config, _rows, _write_curated
from training import data as data_lib
from training import train as train_lib
from training.distributed import World

REPO = Path(__file__).resolve().parents[1]
BATCH, STEPS = 8, 6  # Several steps after the first checkpoint: room to kill mid-run.


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("curated")
    return _write_curated(root / "shards", [_rows(BATCH, BATCH * i) for i in range(STEPS)])


def _step_gradients(config, world: World, examples) -> dict:
    """Gradients of one train_step (captured just before the optimizer uses them)."""
    trainer = train_lib.Trainer(config, world)
    captured = {}
    real_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                         if p.grad is not None})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = capture
    captured["loss"] = torch.tensor(trainer.train_step(examples))
    return captured


def _worker(rank: int, rendezvous: str, configs, examples, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for i, config in enumerate(configs):
            torch.save(_step_gradients(config, World(rank=rank, size=2), examples),
                       f"{out}.{i}.{rank}")
    finally:
        dist.destroy_process_group()


def _step0_worker(rank: int, rendezvous: str, config) -> None:
    """Starts a run as one of 2 processes; rank 1 looks for checkpoints late."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    if rank == 1:
        real = train_lib.latest_checkpoint

        def late(output):
            time.sleep(2.0)  # Rank 0 writes step 0 meanwhile unless it waits for us.
            return real(output)
        train_lib.latest_checkpoint = late
    try:
        train_lib.train(config, World(rank=rank, size=2))
    finally:
        dist.destroy_process_group()


def test_every_process_sees_the_checkpoints_before_step_0_is_written(tmp_path, one_thread):
    """A process slower to look than rank 0 is to write step 0 must not find that
    checkpoint (it would refuse or resume it and skip the barrier the others wait at)."""
    config = _config(tmp_path, "run", None, batch_size=BATCH, total_steps=2, stop_at_step=0)
    mp.spawn(_step0_worker, args=(str(tmp_path / "rendezvous"), config), nprocs=2)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt")] == [
        "step_00000000.pt"]


def test_two_processes_compute_one_processs_gradients(tmp_path, one_thread):
    """At one resolution, and with half of the global batch at a lower one (Flexi)."""
    examples = [data_lib.Example(r["uid"], r["image"], r["caption"]) for r in _rows(BATCH)]
    configs = [_config(tmp_path, "run", None, batch_size=BATCH, total_steps=1, stop_at_step=0,
                       warmup_steps=0, **extra)
               for extra in ({}, {"low_res_size": 14, "low_res_fraction": 0.5})]
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), configs, examples, out), nprocs=2)
    for i, config in enumerate(configs):
        single = _step_gradients(config, World(), examples)
        for rank in range(2):
            both = torch.load(f"{out}.{i}.{rank}")
            assert both.keys() == single.keys()
            for name, grad in single.items():
                torch.testing.assert_close(both[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the CLI

def _train_argv(shards: str, output: Path, *extra) -> list:
    return [sys.executable, "-m", "jest_curate.cli", "train", "--shards", shards,
            "--model", "jest-vit-micro-28", "--output", str(output), "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--precision", "fp32", "--device", "cpu",
            "--num-threads", "1", "--no-tensorboard", "--checkpoint-every", "1", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(argv) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _weights(url: str) -> dict:
    return formats.load_checkpoint(url).state_dict


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for name, extra in (("one", ()), ("two", ("--nproc", "2"))):
        result = _run(_train_argv(shards, root / name, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        done[name] = root / name
    return done


def test_the_cli_with_two_processes_trains_the_same_run(runs):
    final = f"checkpoints/step_{STEPS:08d}.pt"
    one, two = (formats.load_checkpoint(str(runs[n] / final)) for n in ("one", "two"))
    assert two.extra["world_size"] == 2 and one.extra["world_size"] == 1
    # Global accounting: every process's examples and FLOPs, not one rank's.
    for key in ("examples_seen", "flops", "flops_per_example_train"):
        assert two.extra[key] == one.extra[key], key
    for name, w in one.state_dict.items():  # Adam amplifies rounding; the run is the same.
        torch.testing.assert_close(two.state_dict[name], w, rtol=0, atol=5e-3, msg=name)
    latest = formats.read_json(str(runs["two"] / "checkpoints/latest.json"))
    assert latest["step"] == STEPS and latest["examples_seen"] == STEPS * BATCH
    written = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert written == sorted([f"step_{s:08d}.pt" for s in range(STEPS + 1)] + ["latest.json"])


def test_a_killed_two_process_run_resumes_bit_for_bit(runs, shards, tmp_path):
    output = tmp_path / "killed"
    proc = subprocess.Popen(_train_argv(shards, output, "--nproc", "2"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    first = output / "checkpoints" / "step_00000001.pt"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no step-1 checkpoint"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name[5:13]) for p in (output / "checkpoints").glob("step_*.pt"))
    assert steps[-1] < STEPS, steps  # Killed before the end.

    wrong = _run(_train_argv(shards, output, "--resume"))  # One process: refused.
    assert wrong.returncode == 2
    assert "trained with 2 process(es); resume it with the same number (--nproc 2)" \
        in wrong.stderr

    resumed = _run(_train_argv(shards, output, "--nproc", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = f"checkpoints/step_{STEPS:08d}.pt"
    a, b = _weights(str(runs["two"] / final)), _weights(str(output / final))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_multi_process_run_names_each_processs_error(tmp_path, monkeypatch):
    """The processes' stderr goes to the log, and a failure quotes every process's last
    lines, so the cause is in the error (not lost with the terminal)."""
    from training import main as trainer_cli
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = _config(tmp_path, "run", str(tmp_path / "no_such_shards"), batch_size=BATCH,
                     data_format="curated")
    with pytest.raises(RuntimeError) as failed:
        trainer_cli.train_with_processes(config, 2)
    message = str(failed.value)
    assert "jest-curate train --nproc 2 exited with" in message
    for rank in (0, 1):
        section = message.split(f"--- rank {rank}, last lines of its stderr:")[1]
        assert "jest-curate train: error:" in section.split("--- rank")[0]
        assert "no_such_shards" in section.split("--- rank")[0]


def test_a_process_reads_the_bytes_of_its_own_examples_only(shards, monkeypatch):
    """CuratedShards with `keep`: the examples not kept are None and their members' data
    is never extracted from the tar (headers only); the kept ones are unchanged."""
    import tarfile
    source = data_lib.CuratedShards(shards, batch_size=BATCH)
    whole = list(source.batches(1))
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: extracted.append(member.name) or real(self, member))
    mine = list(source.batches(1, keep=lambda batch, position: position % 3 == batch % 2))
    assert len(mine) == len(whole) == STEPS - 1
    for batch, (a, b) in enumerate(zip(whole, mine), start=1):
        for position, (x, y) in enumerate(zip(a, b)):
            assert y == (x if position % 3 == batch % 2 else None)
    kept = {e.uid for batch in mine for e in batch if e is not None}
    assert kept and {name.split(".")[0] for name in extracted} == kept


def test_two_flexi_processes_read_their_parts_and_train_the_one_process_run(shards, tmp_path):
    """With half of every batch at low resolution each process reads and trains its part
    of the split (scattered over the global batch): the run is one process's."""
    extra = ("--low-res-size", "14", "--low-res-fraction", "0.5")
    for name, nproc in (("one", ()), ("two", ("--nproc", "2"))):
        result = _run(_train_argv(shards, tmp_path / name, *nproc, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    final = f"checkpoints/step_{STEPS:08d}.pt"
    one, two = (formats.load_checkpoint(str(tmp_path / n / final)) for n in ("one", "two"))
    for key in ("examples_seen", "flops"):
        assert two.extra[key] == one.extra[key], key
    for name, w in one.state_dict.items():
        torch.testing.assert_close(two.state_dict[name], w, rtol=0, atol=5e-3, msg=name)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        World(rank=0, size=3).part(8)


def test_rounds_hand_the_trainer_its_exact_config_through_the_cli():
    """rounds with train_processes > 1 launches `jest-curate train`: flags rebuild the config."""
    from training import main as trainer_cli
    config = train_lib.TrainConfig(
        model="jest-vit-micro-28", output="o", data="d", data_format="curated", batch_size=8,
        total_steps=10, stop_at_step=3, learning_rate=2e-3, min_learning_rate=1e-5,
        warmup_steps=2, weight_decay=0.05, beta1=0.8, beta2=0.9, grad_clip_norm=1.0, seed=7,
        precision="fp32", device="cpu", num_threads=1, checkpoint_every=2, resume=True,
        low_res_size=14, low_res_fraction=0.25, window_shards=4, log_every=5,
        tensorboard=False)
    for c in (config, train_lib.TrainConfig(model="m", output="o", data=None, batch_size=8,
                                            total_steps=10, stop_at_step=0)):
        argv = trainer_cli.train_argv(c)
        assert trainer_cli._train_config(trainer_cli.parse_train_args(argv)) == c
