"""gs:// end to end: ingest -> embed -> select -> train, every path on a local GCS emulator.

The emulator (from tests/test_ingest_gcs.py) listens on 127.0.0.1 only. The same chain
runs once with every output on gs:// and once with every output on local disk, both
reading the same gs:// inputs (ingest records each example's source URL, so the inputs
must be the same for the corpora to be). Every output file must have the same sha256;
the only exceptions are files that name their own location, which must be equal once
that location is replaced. A poller thread watches each run and must never see a
partial output: a commit marker whose data differs from it, a torn tar, half a JSON
file or an unloadable checkpoint.
"""
import hashlib
import io
import json
import os
import threading

import fsspec
import pyarrow as pa
import pytest
import torch

from jest_curate import demo_data
from jest_curate import formats
from pipelines import embed
from pipelines import ingest
from pipelines import select
from tests.test_ingest_gcs import BUCKET, gcs  # noqa: F401 (the emulator fixture)
from tests.test_reliability_faults import pytestmark  # noqa: F401 (needs Fashion-MNIST)
from training import train as train_lib

MODEL = "jest-vit-micro-28"
BEAM = ["--runner=FnApiRunner"]
LEARNER_STEPS = 4


def _train(output: str, data, *, steps: int, stop: int, batch_size: int, fmt: str):
    return train_lib.train(train_lib.TrainConfig(
        model=MODEL, output=output, data=data, data_format=fmt, batch_size=batch_size,
        total_steps=steps, stop_at_step=stop, precision="fp32", device="cpu", resume=True,
        tensorboard=False, seed=4))


def run_chain(root: str, inputs: str) -> None:
    """ingest -> reference training -> embed (reference, learner step 0) -> select -> train."""
    def at(*parts):
        return formats.join_url(root, *parts)

    ingest.run(["--input", formats.join_url(inputs, "pool"), "--format", "parquet",
                "--source", "pool", "--output", at("corpus"), "--rows-per-shard", "64"] + BEAM)
    reference = _train(at("reference"), formats.join_url(inputs, "curated"), steps=2, stop=2,
                       batch_size=16, fmt="canonical")
    step0 = _train(at("learner"), None, steps=LEARNER_STEPS, stop=0, batch_size=8, fmt="curated")
    for name, checkpoint in (("ref_emb", reference.checkpoint), ("lrn_emb", step0.checkpoint)):
        embed.run(["--corpus", at("corpus"), "--model", MODEL, "--checkpoint", checkpoint,
                   "--output", at(name), "--batch-size", "64", "--num-threads", "1"] + BEAM)
    select.run_select(select.SelectConfig(
        corpus=at("corpus"), output=at("selection"), batch_size=8, super_batch_size=32,
        chunks=4, seed=2, reference=at("ref_emb"), learner=at("lrn_emb")), BEAM)
    _train(at("learner"), at("selection", "shards"), steps=LEARNER_STEPS, stop=LEARNER_STEPS,
           batch_size=8, fmt="curated")


def _relative(path: str, root_path: str) -> str:
    return path[len(root_path):].lstrip("/")


def tree(root: str) -> dict:
    """{relative path: bytes} of every object under `root` (local or gs://)."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    return {_relative(p, path): fs.cat_file(p) for p in fs.find(path)}


class Poller:
    """Reads every output of a running job as a reader would, and records what is wrong."""

    def __init__(self, root: str):
        self.fs, self.path = fsspec.core.url_to_fs(root)
        self.violations, self.checked = [], {"commit": 0, "tar": 0, "json": 0, "pt": 0}
        self.polls = 0
        self._seen = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()  # Once more on the finished output.

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as e:  # Anything a reader trips on is a finding.
                self.violations.append(f"poll failed: {type(e).__name__}: {e}")
            self._stop.wait(0.05)

    def poll(self):
        self.polls += 1
        self.fs.invalidate_cache()
        try:
            listing = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return
        for p, info in sorted(listing.items()):
            rel = _relative(p, self.path)
            name = rel.rsplit("/", 1)[-1]
            if "_work/" in rel or name.startswith("_tmp."):  # Internal / not yet published.
                continue
            version = _version(p, info)
            if name.endswith(".commit"):  # A marker vouches for its data file: watch both.
                version += _version(p[:-len(".commit")], listing.get(p[:-len(".commit")], {}))
            if version in self._seen:
                continue
            try:
                problem = self._check(p, rel, name)
            except FileNotFoundError:  # Replaced or removed between listing and reading.
                continue
            except Exception as e:  # Half a JSON file, an unloadable checkpoint...
                problem = f"unreadable: {type(e).__name__}: {e}"
            if problem:
                self.violations.append(f"{rel}: {problem}")
            else:
                self._seen.add(version)

    def _check(self, p: str, rel: str, name: str):
        if name.endswith(".parquet.commit"):
            marker = json.loads(self.fs.cat_file(p))
            data = self.fs.cat_file(p[:-len(".commit")])
            self.checked["commit"] += 1
            if hashlib.sha256(data).hexdigest() != marker["sha256"]:
                return "committed shard does not match its marker"
        elif name.endswith(".tar"):
            data = self.fs.cat_file(p)
            self.checked["tar"] += 1
            if not data.endswith(formats.TAR_END):
                return f"tar of {len(data)} bytes lacks its end-of-archive"
        elif name.endswith(".json") or name == "_SUCCESS":
            doc = json.loads(self.fs.cat_file(p))
            self.checked["json"] += 1
            if name == "_SUCCESS":
                folder = p.rsplit("/", 1)[0]
                for f, sha in doc["files"].items():
                    if hashlib.sha256(self.fs.cat_file(f"{folder}/{f}")).hexdigest() != sha:
                        return f"_SUCCESS lists {f} with another sha256"
        elif name.endswith(".pt"):
            protocol = "gs://" if "gs" in self.fs.protocol else ""
            formats.load_checkpoint(protocol + p)
            self.checked["pt"] += 1
        return None


def _version(path: str, info: dict) -> tuple:
    return path, info.get("size"), info.get("md5Hash") or info.get("mtime")


def _replace_root(data: bytes, root: str) -> bytes:
    return data.replace(root.encode(), b"ROOT")


def _same_checkpoint(a: bytes, b: bytes, roots) -> bool:
    """Bit-equal weights and optimizer state; the recorded data URL may name the root."""
    ca, cb = (torch.load(io.BytesIO(x), map_location="cpu", weights_only=True) for x in (a, b))
    if ca.keys() != cb.keys():
        return False
    for key in ca:
        va, vb = ca[key], cb[key]
        if key == "extra_json":
            if _replace_root(va.encode(), roots[0]) != _replace_root(vb.encode(), roots[1]):
                return False
        elif not _equal(va, vb):
            return False
    return True


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k])
                                                                    for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory):  # noqa: F811
    """The demo pool (raw parquet to ingest) and curated corpus, uploaded to the bucket."""
    local = str(tmp_path_factory.mktemp("demo"))
    demo_data.build_demo_corpus(local, seed=0, noise=0.5, pool_size=256, curated_size=64,
                                eval_size=8, retrieval_size=4, shard_size=128)
    url = f"gs://{BUCKET}/inputs"
    for split in ("pool", "curated"):
        for name in sorted(os.listdir(os.path.join(local, split))):
            if split == "pool" and not name.endswith(".parquet"):
                continue  # The pool is raw input: plain parquet files, no markers.
            with open(os.path.join(local, split, name), "rb") as f:
                gcs.pipe_file(f"{BUCKET}/inputs/{split}/{name}", f.read())
    return url


def test_gcs_run_equals_local_run_and_hides_partial_outputs(gcs, inputs,  # noqa: F811
                                                             one_thread, tmp_path):
    gs_root, local_root = f"gs://{BUCKET}/run", str(tmp_path / "run")
    with Poller(gs_root) as gs_poller:
        run_chain(gs_root, inputs)
    with Poller(local_root) as local_poller:
        run_chain(local_root, inputs)
    for poller in (gs_poller, local_poller):
        assert poller.violations == []
        # Not vacuous: the poller saw shards, tars, JSON and checkpoints while it ran.
        assert poller.polls > 20 and min(poller.checked.values()) > 0, poller.checked

    on_gcs, on_disk = tree(gs_root), tree(local_root)
    assert sorted(on_gcs) == sorted(on_disk)
    for must in ("corpus/stats.json", "ref_emb/model.json", "selection/_SUCCESS",
                 "selection/shards/sizes.json", f"learner/checkpoints/step_{LEARNER_STEPS:08d}.pt"):
        assert must in on_gcs
    differing = sorted(p for p in on_gcs if on_gcs[p] != on_disk[p])
    # Files naming their own location: ingest's output, embed's corpus, the learner's data
    # URL inside its last checkpoint (and latest.json, which holds that file's sha256).
    last = f"learner/checkpoints/step_{LEARNER_STEPS:08d}.pt"
    assert set(differing) <= {"corpus/stats.json", "ref_emb/stats.json", "lrn_emb/stats.json",
                              last, "learner/checkpoints/latest.json"}, differing
    for p in differing:
        if p == last:
            assert _same_checkpoint(on_gcs[p], on_disk[p], (gs_root, local_root))
        elif p.endswith("latest.json"):
            a, b = json.loads(on_gcs[p]), json.loads(on_disk[p])
            assert {k: v for k, v in a.items() if k != "sha256"} == {
                k: v for k, v in b.items() if k != "sha256"}
        else:
            assert _replace_root(on_gcs[p], gs_root) == _replace_root(on_disk[p], local_root)
    stats = json.loads(on_gcs["selection/stats.json"])
    assert stats["selected"] >= LEARNER_STEPS * 8
    assert not any(p.rsplit("/", 1)[-1].startswith("_tmp.") for p in on_gcs)


def test_poller_flags_partial_outputs(tmp_path):
    """The poller is not vacuous: torn tars, stale markers and half JSON are findings."""
    root = tmp_path / "out"
    info = formats.write_shard(str(root / "ds"), "00000", pa.table({
        "uid": ["u"], "reason": ["r"], "detail": [None], "source_location": ["x"]}),
        schema=formats.DEAD_LETTER_SCHEMA)
    (root / "shards").mkdir()
    (root / "shards" / "00000.tar").write_bytes(b"\0" * 700)  # No end-of-archive.
    (root / "stats.json").write_text('{"seen": 1')
    poller = Poller(str(root))
    poller.poll()
    assert sorted(v.split(":")[0] for v in poller.violations) == ["shards/00000.tar",
                                                                 "stats.json"]
    with open(info.url, "ab") as f:
        f.write(b"tail")
    poller.poll()
    assert "ds/00000.parquet.commit: committed shard does not match its marker" in \
        poller.violations
