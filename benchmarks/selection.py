"""Joint selection throughput relative to plain matmul, on this machine.

Times `jest_core.joint_select` (learnability: learner + reference) at S=20480, b=4096,
N=16, d=512 in float32 and bfloat16 compute, and counts its FLOPs by formula:
each non-final chunk J costs 2 matmuls [S, d] x [d, |J|] per model, i.e.

    FLOPs = 4 S (d_learner + d_reference) (b - |last chunk|) = 8 S b d (N - 1) / N.

That rate is divided by torch's matmul FLOP/s on the same shapes ([S, d] x [d, b/N]),
dtype and thread count, measured in the same run by timing exactly the selection's
4 (N - 1) matmuls back to back (preallocated outputs); the goal is >= 0.5 for both
dtypes (the rest is softplus, sums and sampling). Both are warmed up once, then timed
alternately for a few repetitions and the best of each is kept, since the machine is
shared. The last line printed is one JSON object.

    python -m benchmarks.selection [--small] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

import jest_core
from jest_curate import flags

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def joint_selection_flops(*, super_batch: int, batch_size: int, num_chunks: int,
                          learner_dim: int, reference_dim: int) -> int:
    """Matmul FLOPs of joint selection with both models (the last chunk needs none)."""
    last_chunk = jest_core.chunk_sizes(batch_size, num_chunks)[-1]
    return 4 * super_batch * (learner_dim + reference_dim) * (batch_size - last_chunk)


def _random_pair(size: int, dim: int, generator: torch.Generator) -> jest_core.EmbeddingPair:
    def unit():
        return torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    return jest_core.EmbeddingPair(image=unit(), text=unit(), logit_scale=10.0, logit_bias=-10.0)


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _best_seconds_interleaved(matmuls, select, reps: int) -> tuple[float, float]:
    """Best times of `matmuls` and `select`, alternated so both see the same machine load."""
    matmuls(), select()  # Warm-up: first-call allocations and kernel selection.
    best_matmuls = best_select = float("inf")
    for _ in range(reps):
        best_matmuls = min(best_matmuls, _seconds(matmuls))
        best_select = min(best_select, _seconds(select))
    return best_matmuls, best_select


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.


def run_benchmark(*, super_batch: int, batch_size: int, num_chunks: int, dim: int,
                  reps: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = jest_core.ScoringInputs(learner=_random_pair(super_batch, dim, generator),
                                     reference=_random_pair(super_batch, dim, generator))
    sizes = jest_core.chunk_sizes(batch_size, num_chunks)
    flops = joint_selection_flops(super_batch=super_batch, batch_size=batch_size,
                                  num_chunks=num_chunks, learner_dim=dim, reference_dim=dim)
    report = {"super_batch": super_batch, "batch_size": batch_size, "num_chunks": num_chunks,
              "dim": dim, "threads": torch.get_num_threads(), "selection_gflop": flops / 1e9}
    for name, dtype in _DTYPES.items():
        embeddings = [getattr(pair, side).to(dtype) for pair in (inputs.learner, inputs.reference)
                      for side in ("image", "text")]
        # Right-hand sides [d, b/N] and preallocated outputs, so only GEMMs are timed.
        right = [(embeddings[1][:size].T.contiguous(),
                  torch.empty(super_batch, size, dtype=dtype)) for size in sizes[:-1]]

        def matmuls():
            # Exactly the selection's matmuls: [S, d] x [d, |J|] for 4 tensors, N - 1 chunks.
            for rhs, product in right:
                for candidates in embeddings:
                    torch.mm(candidates, rhs, out=product)

        rounds = iter(range(10**6))

        def select():
            # A fresh generator per repetition, as a caller would derive per super-batch.
            jest_core.select(inputs, method="jest", batch_size=batch_size,
                             num_chunks=num_chunks, compute_dtype=dtype,
                             generator=torch.Generator().manual_seed(next(rounds)))

        matmul_seconds, select_seconds = _best_seconds_interleaved(matmuls, select, reps)
        report[f"{name}_matmul_gflops"] = round(flops / matmul_seconds / 1e9, 1)
        report[f"{name}_select_seconds"] = round(select_seconds, 4)
        report[f"{name}_select_gflops"] = round(flops / select_seconds / 1e9, 1)
        report[f"{name}_ratio_to_matmul"] = round(matmul_seconds / select_seconds, 3)
        print(f"{name}: matmul {flops / matmul_seconds / 1e9:.1f} GFLOP/s on "
              f"[{super_batch},{dim}]x[{dim},{sizes[0]}]; joint selection "
              f"{select_seconds * 1e3:.1f} ms = {flops / select_seconds / 1e9:.1f} GFLOP/s; "
              f"ratio {matmul_seconds / select_seconds:.3f}", flush=True)
    report["peak_rss_gib"] = round(_peak_rss_gib(), 3)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jest-curate bench-select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="quick run at S=4096, b=1024, N=8, d=256")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own default, all cores)")
    args = flags.parse_strict(parser, argv)[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (dict(super_batch=4096, batch_size=1024, num_chunks=8, dim=256) if args.small
             else dict(super_batch=20480, batch_size=4096, num_chunks=16, dim=512))
    report = run_benchmark(**shape, reps=args.reps, seed=args.seed)
    print(f"peak RSS {report['peak_rss_gib']:.2f} GiB")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
