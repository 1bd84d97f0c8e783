"""`jest-curate ingest` from and to gs://, against a local GCS emulator on 127.0.0.1.

The emulator (PyPI `gcp-storage-emulator`) runs in this process for the module's
tests; gcsfs finds it through STORAGE_EMULATOR_HOST and uses anonymous credentials.
"""
import io
import json
import os
import socket

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jest_curate import formats
from pipelines import ingest
from tests.test_ingest_web import (check_accounting, corpus_rows, dead_letters, derived_uid,
                                   image_bytes, sample, tar_bytes)

BEAM = ["--runner", "FnApiRunner"]
BUCKET = "jest-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A running emulator with one bucket; gcsfs pointed at it, restored afterwards."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    saved_env = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",
                                                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    saved_conf = fsspec.config.conf.get("gcs")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    fsspec.config.conf["gcs"] = {"token": "anon", "endpoint_url": f"http://127.0.0.1:{port}"}
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    fs = fsspec.filesystem("gs")
    try:
        yield fs
    finally:
        server.stop()
        type(fs).clear_instance_cache()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = saved_conf


def _put(fs, path: str, data: bytes) -> None:
    with fs.open(f"{BUCKET}/{path}", "wb") as f:
        f.write(data)


def _objects(fs) -> dict:
    fs.invalidate_cache()
    return {p: fs.info(p)["size"] for p in fs.find(BUCKET)}


def test_atomic_writes_on_gcs_leave_no_temporaries(gcs):
    formats.write_json_atomic(f"gs://{BUCKET}/probe/a.json", {"x": 1})
    formats.write_json_atomic(f"gs://{BUCKET}/probe/a.json", {"x": 2})
    assert formats.read_json(f"gs://{BUCKET}/probe/a.json") == {"x": 2}
    info = formats.write_shard(f"gs://{BUCKET}/probe/ds", "00000-of-00001",
                               pa.table({"uid": ["u"], "reason": ["r"], "detail": [None],
                                         "source_location": ["here"]}),
                               schema=formats.DEAD_LETTER_SCHEMA)
    assert formats.list_shards(f"gs://{BUCKET}/probe/ds") == [info]
    assert sorted(p.rsplit("/", 1)[1] for p in _objects(gcs) if "/probe/" in p) == [
        "00000-of-00001.parquet", "00000-of-00001.parquet.commit", "a.json"]


def test_ingest_from_and_to_gcs(gcs):
    # webdataset: a good tar, and one with an oversized member (skipped by seeking, not
    # downloaded) that lacks its end-of-archive marker.
    wds = [m for j in range(5) for m in sample(f"w{j}", image_bytes(j, "JPEG"), f"wds {j}",
                                               {"url": f"https://w/{j}", "license": "cc0"})]
    _put(gcs, "in/wds/00000.tar", tar_bytes(wds))
    _put(gcs, "in/wds/00001.tar", tar_bytes(
        sample("c0", image_bytes(10), "kept") + sample("c1", b"x" * 5000, "too big")
        + sample("c2", image_bytes(11), "maybe incomplete"), end=False))
    # img2dataset: one shard with a failed download.
    rows = [{"key": f"{k:09d}", "url": f"https://i/{k}", "status": "success", "LICENSE": "cc-by"}
            for k in range(3)]
    rows[1].update(status="failed_to_download", error_message="timeout")
    members = [m for r in rows if r["status"] == "success"
               for m in sample(r["key"], image_bytes(20 + int(r["key"]), "WEBP"),
                               f"i2d {r['key']}", {"url": r["url"]}, ext="webp")]
    _put(gcs, "in/i2d/00000.tar", tar_bytes(members))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    _put(gcs, "in/i2d/00000.parquet", buf.getvalue())
    _put(gcs, "in/i2d/00000_stats.json", json.dumps({"count": 3, "successes": 2}).encode())
    # parquet, one row repeating a webdataset image and caption: gs://…/in/pq/… sorts
    # before gs://…/in/wds/…, so the parquet copy is kept.
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [image_bytes(30), image_bytes(0, "JPEG")],
                             "caption": ["pq 0", "wds 0"]}), buf)
    _put(gcs, "in/pq/part-0.parquet", buf.getvalue())
    inputs = _objects(gcs)

    out = f"gs://{BUCKET}/out/corpus"
    argv = ["--input", f"gs://{BUCKET}/in/wds", "--input", f"gs://{BUCKET}/in/i2d",
            "--input", f"gs://{BUCKET}/in/pq", "--format", "webdataset", "--format",
            "img2dataset", "--format", "parquet", "--output", out, "--max-image-bytes", "4000",
            "--rows-per-shard", "4"] + BEAM
    stats = ingest.run(argv)
    check_accounting(stats, out)
    assert {s: (c["seen"], c["ingested"]) for s, c in stats["by_source"].items()} == {
        "wds": (5 + 3, 4 + 1), "i2d": (3, 2), "pq": (2, 2)}
    assert stats["reasons"] == {"download_failed": 1, "duplicate_image_caption": 1,
                                "member_too_large": 1, "truncated_tar": 1}
    assert stats["by_source"]["i2d"]["img2dataset"]["successes"] == 2
    corpus = corpus_rows(out)
    assert corpus[derived_uid("wds", "00000.tar", "w3")]["url"] == "https://w/3"
    assert corpus[derived_uid("i2d", "00000.tar", "000000002")]["license"] == "cc-by"
    assert {r["source_location"].split("://")[0] for r in corpus.values()} == {"gs"}
    assert {r["reason"] for r in dead_letters(out)} == set(stats["reasons"])

    # Inputs untouched, every new object under the output, none left half-written.
    after = _objects(gcs)
    assert {p: s for p, s in after.items() if p in inputs} == inputs
    new = set(after) - set(inputs) - {p for p in after if "/probe/" in p}
    assert new and all(p.startswith(f"{BUCKET}/out/corpus/") for p in new)
    assert not any(p.rsplit("/", 1)[1].startswith("_tmp.") for p in new)

    index = formats.read_json(f"{out}/_index.json")
    assert ingest.run(argv)["num_shards"] == stats["num_shards"]
    assert formats.read_json(f"{out}/_index.json") == index  # A rerun: identical shards.
