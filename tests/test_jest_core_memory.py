"""Joint selection never builds S x S: a subprocess at S = 50,000 stays under 2 GiB.

At S = 50,000 one S x S float32 matrix alone is 10 GB. The child measures its own
peak RSS with resource.getrusage, so other tests' memory does not count.
"""
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, torch
import jest_core as jc

# One thread: the test runs beside other pytest workers on 2 cores, and oversubscribed
# OpenMP barriers make multi-threaded GEMMs crawl. Memory does not depend on threads.
torch.set_num_threads(1)
size, batch, dim = 50_000, 10_000, 256
generator = torch.Generator().manual_seed(0)

def pair():
    unit = lambda: torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    return jc.EmbeddingPair(image=unit(), text=unit(), logit_scale=10.0, logit_bias=-10.0)

inputs = jc.ScoringInputs(learner=pair(), reference=pair())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# The full-size selection in bfloat16 (half the time of float32), then a short float32
# one: its [S, d + 2] float32 operand copies are the larger working set.
selection = jc.select(inputs, method="jest", batch_size=batch, num_chunks=16,
                      generator=torch.Generator().manual_seed(1), compute_dtype=torch.bfloat16)
jc.select(inputs, method="jest", batch_size=1000, num_chunks=2,
          generator=torch.Generator().manual_seed(2), compute_dtype=torch.float32)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux.
print(json.dumps({"peak_gib": peak / 2**20, "growth_gib": (peak - before) / 2**20,
                  "selected": len(selection.indices),
                  "distinct": len(torch.unique(selection.indices))}))
"""


def test_joint_selection_peak_memory_at_50k():
    result = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                            timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nS=50000 b=10000 d=256: {report}")
    assert report["selected"] == report["distinct"] == 10_000
    assert report["peak_gib"] < 2.0
    # Embeddings (4 x 51 MB) are already resident before selection; the sampler's own
    # working set is O(S d + S b / N), far below one S x S matrix (10 GB).
    assert report["growth_gib"] < 0.5
