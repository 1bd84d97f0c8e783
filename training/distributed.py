"""Data-parallel training under torchrun: which process this is, and the few collectives.

    torchrun --standalone --nproc_per_node=N -m jest_curate.cli train ...
    jest-curate train --nproc N ...          # the same, launched for you

Every process reads the same global batch of b examples (a curated sub-batch JEST chose,
in written order) and trains on its contiguous part of it; open_clip's `SigLipLoss(rank=,
world_size=)` exchanges text features between neighbours so the loss is the one over the
global batch, and DistributedDataParallel averages the gradients. nccl on GPUs, gloo on
CPUs. A run started with N processes resumes with N (the checkpoint records it).
"""
import dataclasses
import glob
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["World", "world_from_env", "shutdown", "launch", "rank_logs"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes (1 process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of `n` examples."""
        if n % self.size:
            raise ValueError(f"a global batch of {n} does not split over {self.size} "
                             "processes; pick a batch size divisible by the process count")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over processes (float64, so FLOP counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda(self.local_rank)
        dist.all_reduce(t)
        return t.cpu().tolist()


def world_from_env(device_type: str) -> World:
    """World from torchrun's environment; joins the process group on the first call."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group, if this process joined one (call once every rank is done).

    A gloo process that exits without this can abort in the interpreter's teardown
    ("terminate called without an active exception", SIGABRT) while its worker threads
    still hold work, failing a run that finished.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str], log_dir: Optional[str] = None) -> int:
    """Run `jest-curate <argv>` as `nproc` processes on this machine under torchrun.

    With `log_dir` (local), each process's stdout and stderr go to files under it
    (torchrun's --redirects; read them with `rank_logs`) instead of the terminal.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}"]
    if log_dir is not None:
        cmd += ["--log-dir", log_dir, "--redirects", "3"]
    return subprocess.run([*cmd, "-m", "jest_curate.cli", *argv], check=False).returncode


def rank_logs(log_dir: str, stream: str = "stderr") -> Dict[int, str]:
    """{local rank: what it wrote to `stream`} for the launches under `log_dir`, the last
    attempt's (torchrun writes LOG_DIR/<run id>/attempt_<n>/<local rank>/<stream>.log)."""
    logs = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", f"{stream}.log"))):
        rank = os.path.basename(os.path.dirname(path))
        if rank.isdigit():
            with open(path, encoding="utf-8", errors="replace") as f:
                logs[int(rank)] = f.read()
    return logs
