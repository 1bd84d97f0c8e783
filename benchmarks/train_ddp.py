"""Data-parallel training throughput: 1 process vs N gloo processes on this CPU.

    python -m benchmarks.train_ddp [--batch-size 64] [--steps 12] [--nproc 2]

Every configuration trains the same global batches of b examples (synthetic demo-like
images and captions) with the real trainer step; the first 2 steps warm up and are not
timed. Prints examples/s for one process (1 thread, and N threads) and for N processes of
one thread each, and their ratios; the last line is one JSON object. On CPUs gloo's
all-reduce and SigLIP's feature exchange cost about what the second core gains, so the
ratio is not expected to be large; on N GPUs the same command (`--nproc N`, nccl) is the
recipe in docs/training.md.
"""
import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from jest_curate import flags
from training import data as data_lib
from training import train as train_lib
from training.distributed import World

WARMUP = 2


def _examples(n: int, step: int, size: int = 28) -> list:
    rng = np.random.default_rng(step)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(data_lib.Example(f"{step:04d}{i:04d}", buf.getvalue(),
                                    f"a photo of item {i} at step {step}"))
    return out


def _timed_steps(model: str, batch_size: int, steps: int, world: World, threads: int) -> float:
    """Seconds for steps WARMUP..steps of the real trainer step."""
    torch.set_num_threads(threads)
    batches = [_examples(batch_size, s) for s in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_lib.Trainer(train_lib.TrainConfig(
            model=model, output=tmp, data=None, batch_size=batch_size, total_steps=steps,
            stop_at_step=0, precision="fp32", device="cpu", tensorboard=False), world)
        for s in range(WARMUP):
            trainer.train_step(batches[s])
        world.barrier()
        start = time.perf_counter()
        for s in range(WARMUP, steps):
            trainer.train_step(batches[s])
        world.barrier()
        return time.perf_counter() - start


def _worker(rank, nproc, rendezvous, model, batch_size, steps, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=nproc)
    try:
        seconds = _timed_steps(model, batch_size, steps, World(rank=rank, size=nproc), 1)
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(seconds))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="jest-vit-micro-28")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2)
    args = flags.parse_strict(p, argv)[0]
    timed = (args.steps - WARMUP) * args.batch_size
    rate = {}
    for threads in sorted({1, args.nproc}):
        seconds = _timed_steps(args.model, args.batch_size, args.steps, World(), threads)
        rate[f"1proc_{threads}thread"] = timed / seconds
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/seconds"
        mp.spawn(_worker, args=(args.nproc, f"{tmp}/rendezvous", args.model, args.batch_size,
                                args.steps, out), nprocs=args.nproc)
        rate[f"{args.nproc}proc_1thread"] = timed / float(open(out).read())
    for name, r in rate.items():
        print(f"{name:>14}: {r:8.1f} examples/s")
    result = {"examples_per_s": rate, "model": args.model, "batch_size": args.batch_size,
              f"{args.nproc}proc_over_1proc_1thread":
                  rate[f"{args.nproc}proc_1thread"] / rate["1proc_1thread"],
              f"{args.nproc}proc_over_1proc_{args.nproc}thread":
                  rate[f"{args.nproc}proc_1thread"] / rate[f"1proc_{args.nproc}thread"],
              "gpu_command": "jest-curate train --nproc N --device cuda ... (docs/training.md)"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
