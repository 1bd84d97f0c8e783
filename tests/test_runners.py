"""The layout and round jobs on distributed runners, byte for byte equal to FnApiRunner.

Each runner runs one pass's layout (7 candidate shards) and two round jobs of two rounds
each (jest with a micro learner scoring on the workers; easy-reference), reading one
shared corpus. Runners: FnApiRunner in process (the baseline); DirectRunner
`--direct_running_mode=multi_processing` with two SDK worker processes; PortableRunner
with Beam's local job service (`--job_endpoint=embed`) and SDK workers started by a
separate worker pool (`--environment_type=EXTERNAL`). A probe in every job records the
process that ran it, so a runner that quietly ran in process fails the test.

Every output file must be identical but each round's metrics.json (what was measured:
seconds, bytes read), which _SUCCESS does not list.
"""
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from jest_curate import formats
from pipelines import layout, round_job
from tests.test_layout import _digests
from tests.test_select import make_corpus
from training import scoring

S, B = 20, 8  # Super-batch and batch size.
ROUNDS = ((0, 0, 5), (1, 5, 10))  # (round, first, stop super-batch): both cut a shard.
METHODS = (("jest", scoring.ScoringSpec(model="jest-vit-micro-28", num_threads=1)),
           ("easy-reference", None))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus, reference embeddings): 270 rows in 3 shards, 2 the reference missed. One
    copy for every runner: the layout records its input URLs."""
    root = str(tmp_path_factory.mktemp("corpus"))
    pool, ref, _, _ = make_corpus(root, shards=(100, 90, 80), missing={"000003", "000040"})
    return pool, ref


def _pipeline(args, probe):
    """A pipeline for `args` whose first transform writes to `probe` the pid of the worker
    that ran it, then its ancestors' (Linux /proc). A nested function: pickled by value,
    so workers need not import tests/."""
    def where(path):
        import os as os_
        chain = [os_.getpid()]
        while chain[-1] > 1:
            with open(f"/proc/{chain[-1]}/stat") as f:  # "pid (comm) state ppid ...".
                chain.append(int(f.read().rsplit(")", 1)[1].split()[1]))
        with open(path, "w") as f:
            f.write(" ".join(map(str, chain)))

    p = beam.Pipeline(options=PipelineOptions(args))
    _ = p | "Probe" >> beam.Create([str(probe)]) | "WhereAmI" >> beam.Map(where)
    return p


def _run_jobs(corpus, out, args) -> list:
    """Lay out pass 0 and run both round jobs under `args`; per job, the pid that ran its
    probe and that process's ancestors."""
    pool, ref = corpus
    probes = [os.path.join(out, f"probe-{job}") for job in ("layout", *dict(METHODS))]
    os.makedirs(out)
    spec = layout.layout_spec(pool=pool, reference=ref, seed=3, pass_index=0,
                              super_batch_size=S, shard_rows=2 * S)
    laid = layout.run_layout(spec, os.path.join(out, "p0"),
                             test_pipeline=_pipeline(args, probes[0]))
    assert (len(laid.shards), laid.counts["super_batches"], laid.counts["carried"]) == (7, 13, 8)
    for (method, learner), probe in zip(METHODS, probes[1:]):
        cfg = round_job.RoundJobConfig(
            slices=tuple(round_job.RoundSlice(r, os.path.join(out, "p0"), first, stop,
                                              os.path.join(out, method, f"r{r}"))
                         for r, first, stop in ROUNDS),
            method=method, batch_size=B, super_batch_size=S, chunks=4, seed=1,
            learner=learner)
        stats = round_job.run_round_job(cfg, test_pipeline=_pipeline(args, probe))
        for r, first, stop in ROUNDS:
            assert stats[r]["selected"] == (stop - first) * B
            assert stats[r]["scored"] == ((stop - first) * S if learner else 0)
    where = []
    for probe in probes:
        with open(probe) as f:
            pid, *ancestors = (int(x) for x in f.read().split())
            where.append((pid, ancestors))
        os.remove(probe)
    return where


def _outputs(out) -> dict:
    """{relative path: sha256} of every file under `out` but the rounds' metrics.json:
    what was measured (seconds, bytes read), meant to vary, outside the round's index."""
    digests = _digests(out)
    for rdir in {os.path.dirname(r) for r in digests if os.path.basename(r) == "_SUCCESS"}:
        assert os.path.exists(os.path.join(out, rdir, round_job.METRICS))
        listed = formats.read_json(os.path.join(out, rdir, "_SUCCESS"))["files"]
        assert round_job.METRICS not in listed
        assert all(digests[os.path.join(rdir, f)] == sha for f, sha in listed.items())
    return digests


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fnapi") / "out")
    where = _run_jobs(corpus, out, ["--runner=FnApiRunner"])
    assert all(pid == os.getpid() for pid, _ in where), where  # In process.
    digests = _outputs(out)
    # p0: layout.json, carried.parquet, 7 candidate and 7 sidecar shards (+ markers), 2
    # indexes, the reference card; each round: 3 tars and manifests, indexes, stats.
    assert sum(r.startswith("p0/candidates/") and r.endswith(".parquet") for r in digests) == 7
    assert sum(r.endswith(".tar") for r in digests) == 2 * 2 * 3
    return digests


def test_multi_processing_direct_runner_matches_fnapi(corpus, baseline, tmp_path):
    out = str(tmp_path / "out")
    where = _run_jobs(corpus, out, ["--runner=DirectRunner",
                                    "--direct_running_mode=multi_processing",
                                    "--direct_num_workers=2"])
    # Every job ran in an SDK worker process that this process started.
    assert all(pid != os.getpid() and os.getpid() in up for pid, up in where), where
    assert _outputs(out) == baseline


def test_portable_runner_with_external_worker_pool_matches_fnapi(corpus, baseline, tmp_path,
                                                                  worker_pool):
    out = str(tmp_path / "out")
    where = _run_jobs(corpus, out, ["--runner=PortableRunner", "--job_endpoint=embed",
                                    "--environment_type=EXTERNAL",
                                    f"--environment_config={worker_pool.address}"])
    # Every job ran in SDK workers the pool started (the embedded job service runs one
    # per job: it ignores --direct_num_workers).
    assert all(worker_pool.pid in up for _, up in where), where
    assert _outputs(out) == baseline
