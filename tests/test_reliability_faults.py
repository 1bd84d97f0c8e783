"""Injected faults with real retries: ingest -> embed -> select lose and change nothing.

`pipelines.faults` makes chosen DoFns raise on the first attempt of a fraction of their
elements, and once mid-write of an output. BundleBasedDirectRunner retries failed
bundles (FnApiRunner does not), so under it every stage must finish with outputs
byte-identical to a clean FnApiRunner run; under FnApiRunner the same plan must fail
the job, which shows the exception left the DoFn instead of being retried inside it.
"""
import dataclasses
import hashlib
import os

import pytest

from jest_curate import demo_data
from jest_curate import formats
from pipelines import embed
from pipelines import faults
from pipelines import ingest
from pipelines import select

MODEL = "jest-vit-micro-28"
CLEAN, RETRYING = "--runner=FnApiRunner", "--runner=BundleBasedDirectRunner"



def _have_fashion_mnist() -> bool:
    try:
        demo_data.find_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_fashion_mnist(),
                                reason="needs Fashion-MNIST: scripts/get_fashion_mnist.sh")


def tree_digests(root: str, *, skip=("_tmp.",)) -> dict:
    """{relative path: sha256} of every file under `root` (stray temporaries included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _ingest_argv(data: str, output: str, runner: str) -> list:
    return ["--input", os.path.join(data, "pool"), "--format", "parquet", "--source", "pool",
            "--output", output, "--rows-per-shard", "64", "--batch-size", "48", runner]


def _embed_argv(corpus: str, output: str, seed: int, runner: str) -> list:
    return ["--corpus", corpus, "--model", MODEL, "--init-seed", str(seed), "--output", output,
            "--batch-size", "48", "--num-threads", "1", runner]


def _select_cfg(root: str, output: str) -> select.SelectConfig:
    return select.SelectConfig(
        corpus=os.path.join(root, "clean", "corpus"), output=output, batch_size=8,
        super_batch_size=32, chunks=4, seed=3, reference=os.path.join(root, "clean", "ref"),
        learner=os.path.join(root, "clean", "lrn"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The whole chain once, without faults, on FnApiRunner."""
    root = str(tmp_path_factory.mktemp("faults"))
    data = os.path.join(root, "data")
    demo_data.build_demo_corpus(data, seed=0, noise=0.5, pool_size=300, curated_size=8,
                                eval_size=8, retrieval_size=4, shard_size=100)
    out = os.path.join(root, "clean")
    ingest.run(_ingest_argv(data, os.path.join(out, "corpus"), CLEAN))
    for name, seed in (("ref", 0), ("lrn", 1)):
        embed.run(_embed_argv(os.path.join(out, "corpus"), os.path.join(out, name), seed, CLEAN))
    select.run_select(_select_cfg(root, os.path.join(out, "selection")), [CLEAN])
    return root, data


def _plan(root: str, name: str, points: dict) -> dict:
    # Every attempt of a bundle may fail on another chosen element, and the direct runner
    # gives up after 4 attempts: hence at most 3 firings per point.
    return {"dir": os.path.join(root, "markers", name), "seed": 11, "points": points}


def _check_retried(plan: dict) -> dict:
    """Every point fired at least once, and every fired element was retried by the runner."""
    seen = faults.report(plan["dir"])
    for point in plan["points"]:
        entry = seen.get(point, {"fired": [], "retried": []})
        assert entry["fired"], f"{point} never fired: the test would prove nothing"
        assert sorted(entry["retried"]) == sorted(entry["fired"]), point
    return seen


def _without_output_field(path: str) -> dict:
    doc = formats.read_json(path)
    doc.pop("output", None)
    return doc


def test_ingest_under_faults_equals_a_clean_run(clean):
    root, data = clean
    # Ingest's keys hold input URLs (they vary with the temp dir), so no fraction here.
    plan = _plan(root, "ingest", {"ingest.read": {"limit": 2},
                                  "corpus_io.write_shard": {"limit": 1}})
    out = os.path.join(root, "faulty", "corpus")
    with faults.injected(plan):
        stats = ingest.run(_ingest_argv(data, out, RETRYING))
    seen = _check_retried(plan)
    assert len(seen["ingest.read"]["fired"]) == 2
    want = tree_digests(os.path.join(root, "clean", "corpus"))
    got = tree_digests(out)
    assert want.keys() == got.keys()
    # stats.json names its own output directory; everything else is byte-identical.
    assert {k for k in want if want[k] != got[k]} <= {"stats.json"}
    assert _without_output_field(os.path.join(out, "stats.json")) == _without_output_field(
        os.path.join(root, "clean", "corpus", "stats.json"))
    assert stats["ingested"] + stats["dead_lettered"] == stats["seen"] == 300


def test_embed_under_faults_equals_a_clean_run(clean):
    root, _ = clean
    plan = _plan(root, "embed", {"embed.embed_batch": {"fraction": 0.5, "limit": 3},
                                 "embed.write_shard": {"limit": 1}})
    out = os.path.join(root, "faulty", "ref")
    with faults.injected(plan):
        embed.run(_embed_argv(os.path.join(root, "clean", "corpus"), out, 0, RETRYING))
    _check_retried(plan)
    assert tree_digests(out) == tree_digests(os.path.join(root, "clean", "ref"))


def test_select_under_faults_equals_a_clean_run(clean):
    root, _ = clean
    plan = _plan(root, "select", {
        "select.join_shard": {"fraction": 0.5, "limit": 3},
        "select.select_super_batch": {"fraction": 0.5, "limit": 3},
        "select.write_fragment": {"limit": 1},  # Leaves a torn fragment, then fails.
        "select.assemble_tar": {"limit": 1},  # Leaves a torn tar at its final name.
        "select.write_manifest": {"limit": 2}})  # Keyed by output path: no fraction.
    out = os.path.join(root, "faulty", "selection")
    with faults.injected(plan):
        stats = select.run_select(_select_cfg(root, out), [RETRYING])
    _check_retried(plan)
    clean_out = os.path.join(root, "clean", "selection")
    assert tree_digests(out) == tree_digests(clean_out)
    assert stats == formats.read_json(os.path.join(clean_out, "stats.json"))
    success = formats.read_json(os.path.join(out, "_SUCCESS"))
    assert all(formats.sha256_file(os.path.join(out, f)) == sha
               for f, sha in success["files"].items())


@pytest.mark.parametrize("point", ["ingest.read", "embed.write_shard", "select.assemble_tar"])
def test_without_retries_the_fault_fails_the_job_and_commits_nothing(clean, point):
    """FnApiRunner does not retry: the job fails, so the DoFn did not swallow the fault."""
    root, data = clean
    plan = _plan(root, f"no-retry-{point}", {point: {"limit": 1}})
    out = os.path.join(root, "no-retry", point)
    with faults.injected(plan), pytest.raises(Exception, match="injected fault") as info:
        if point == "ingest.read":
            ingest.run(_ingest_argv(data, out, CLEAN))
        elif point == "embed.write_shard":
            embed.run(_embed_argv(os.path.join(root, "clean", "corpus"), out, 0, CLEAN))
        else:
            select.run_select(_select_cfg(root, out), [CLEAN])
    assert "InjectedFault" in "".join(str(x) for x in (info.value, info.value.__cause__,
                                                        info.type.__name__))
    assert len(faults.report(plan["dir"])[point]["fired"]) == 1
    # No completion marker: readers cannot mistake the partial output for a finished one.
    for marker in ("stats.json", "_SUCCESS"):
        assert not os.path.exists(os.path.join(out, marker))


def test_an_unfinished_ingest_is_refused_downstream_until_rerun(clean):
    """A failed (or killed) ingest leaves committed shards that are only part of the corpus."""
    root, data = clean
    plan = _plan(root, "unfinished-ingest", {"corpus_io.write_shard": {"limit": 1}})
    out = os.path.join(root, "unfinished", "corpus")
    with faults.injected(plan), pytest.raises(Exception, match="injected fault"):
        ingest.run(_ingest_argv(data, out, CLEAN))
    committed = [n for dirpath, _, names in os.walk(out) for n in names
                 if n.endswith(".parquet.commit")]
    assert committed, "the fault fires after a shard's commit marker"
    with pytest.raises(formats.FormatError, match="ingest did not finish"):
        formats.list_shards(out)
    with pytest.raises(formats.FormatError, match="ingest did not finish"):
        embed.run(_embed_argv(out, os.path.join(root, "unfinished", "ref"), 0, CLEAN))
    with pytest.raises(formats.FormatError, match="ingest did not finish"):
        select.run_select(dataclasses.replace(
            _select_cfg(root, os.path.join(root, "unfinished", "selection")), corpus=out),
            [CLEAN])

    ingest.run(_ingest_argv(data, out, CLEAN))  # The rerun completes the same corpus.
    want, got = tree_digests(os.path.join(root, "clean", "corpus")), tree_digests(out)
    assert want.keys() == got.keys() and formats.INCOMPLETE not in got
    assert {k for k in want if want[k] != got[k]} <= {"stats.json"}


def test_hooks_cost_nothing_when_off(monkeypatch):
    """Off: the environment is read once per process, then each hook is a global lookup."""
    faults.reset()
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    reads = []
    real_get = os.environ.get

    def counting_get(key, default=None):
        if key == faults.ENV_VAR:
            reads.append(key)
        return real_get(key, default)

    monkeypatch.setattr(os.environ, "get", counting_get)
    for i in range(1000):
        faults.maybe_fail("select.assemble_tar", (0, i))
    assert reads == [faults.ENV_VAR]
    faults.reset()


def _failing_keys(point: str, keys: list) -> list:
    """The keys whose hook raised, in order."""
    failed = []
    for key in keys:
        try:
            faults.maybe_fail(point, key)
        except faults.InjectedFault:
            failed.append(key)
    return failed


def test_plan_choice_is_deterministic_and_first_attempt_only(tmp_path):
    point = "select.select_super_batch"
    plan = {"dir": str(tmp_path / "m"), "seed": 5, "points": {point: {"fraction": 0.5}}}
    keys = [("r", i) for i in range(40)]
    with faults.injected(plan):
        failed = _failing_keys(point, keys)
        for key in keys:  # Second attempts never fail.
            faults.maybe_fail(point, key)
    assert 10 < len(failed) < 30
    report = faults.report(plan["dir"])[point]
    assert sorted(report["fired"]) == sorted(report["retried"]) == sorted(map(repr, failed))
    # The same seed chooses the same keys in a fresh marker directory.
    again = {**plan, "dir": str(tmp_path / "m2")}
    with faults.injected(again):
        assert _failing_keys(point, keys) == failed
    with pytest.raises(ValueError, match="unknown keys"):
        with faults.injected({"dir": "x", "points": {point: {"fractoin": 0.5}}}):
            pass
    with pytest.raises(ValueError, match="unknown point"):
        with faults.injected({"dir": "x", "points": {"select.asemble_tar": {}}}):
            pass


def test_after_and_limit_pick_the_nth_chosen_element(tmp_path):
    point = "select.assemble_tar"
    plan = {"dir": str(tmp_path / "m"), "points": {point: {"after": 2, "limit": 1}}}
    with faults.injected(plan):
        assert _failing_keys(point, list(range(6))) == [2]
