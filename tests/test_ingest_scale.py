"""Ingest at web scale: incremental growth, byte-bounded shards, one index, small job graphs."""
import os
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.metrics.metric import MetricsFilter

from jest_curate import formats, hashing
from pipelines import embed, ingest, ingest_shards, select
from tests.test_ingest_web import (check_accounting, corpus_rows, dead_letters, image_bytes,
                                   sample, tar_bytes)

BEAM = ["--runner=FnApiRunner"]
MODEL = "jest-vit-micro-28"


def _tar(path: Path, keys, *, image_of=lambda k: int(k[1:]), caption_of=None) -> None:
    members = []
    for k in keys:
        caption = caption_of(k) if caption_of else f"picture {k}"
        members += sample(k, image_bytes(image_of(k), "PNG"), caption, ext="png")
    path.write_bytes(tar_bytes(members))


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in Path(root).rglob("*") if p.is_file()}


def _embed(corpus: str, output: str):
    result = embed.run(["--corpus", corpus, "--model", MODEL, "--output", output,
                        "--batch-size", "16", "--num-threads", "1"] + BEAM)
    found = result.metrics().query(MetricsFilter().with_namespace(embed.NAMESPACE))
    return {c.key.metric.name: c.committed for c in found["counters"]}


def test_append_adds_shards_and_embed_touches_only_them(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    _tar(src / "00000.tar", [f"a{i}" for i in range(6)])
    _tar(src / "00001.tar", [f"b{i}" for i in range(10, 15)])
    out, emb = str(tmp_path / "corpus"), str(tmp_path / "emb")
    argv = ["--input", str(src), "--format", "webdataset", "--source", "web", "--output", out,
            "--rows-per-shard", "4"] + BEAM
    first = ingest.run(argv)
    check_accounting(first, out)
    old_index = formats.read_json(f"{out}/_index.json")
    assert first["num_shards"] == 4  # 6 rows -> 4 + 2; 5 rows -> 4 + 1.
    counters = _embed(out, emb)
    assert counters["shards_embedded"] == 4
    corpus_before, emb_before = _snapshot(out), _snapshot(emb)

    # New tar: one exact copy of an existing example, one uid-free new image, two
    # copies of one new image (the first of them is kept).
    _tar(src / "00002.tar", ["a3", "c20", "c21", "c22"],
         image_of=lambda k: {"a3": 3, "c20": 20, "c21": 21, "c22": 21}[k],
         caption_of=lambda k: "picture a3" if k == "a3" else f"picture {k}")
    with pytest.raises(ValueError, match="deduplicated with --dedup image"):
        ingest.run(argv + ["--append", "--dedup", "none"])
    other = tmp_path / "other" / "tars"
    other.mkdir(parents=True)
    _tar(other / "00000.tar", ["d1"])
    with pytest.raises(ValueError, match="source 'web' already names"):
        ingest.run(["--input", str(other)] + argv[2:] + ["--append"])
    grown = ingest.run(argv + ["--append"])
    check_accounting(grown, out)
    assert (grown["seen"], grown["ingested"], grown["num_shards"]) == (15, 13, 5)
    assert grown["reasons"] == {"duplicate_image": 1, "duplicate_image_caption": 1}
    assert grown["by_source"]["web"]["seen"] == 15 and grown["appends"] == 1
    # Existing shards: same ids, same entries, same files.
    new_index = formats.read_json(f"{out}/_index.json")
    old_entries = {e["id"]: e for e in old_index["shards"]}
    assert {e["id"]: e for e in new_index["shards"] if e["id"] in old_entries} == old_entries
    changed = {n for n, v in _snapshot(out).items() if corpus_before.get(n) != v}
    [added] = [e for e in new_index["shards"] if e["id"] not in old_entries]
    assert added["unit"] == "00002.tar" and added["rows"] == 2 and added["file_rows"] == 4
    assert all(n.startswith((added["id"], "_keys/" + added["id"], "_dead_letter/"))
               or n in ("_index.json", "_dead_letter/_index.json", "stats.json")
               for n in changed), changed
    letters = {r["uid"]: r["reason"] for r in dead_letters(out)}
    uid = hashing.blake2b_fields("ingest", "web", "00002.tar", "a3").hex()
    assert letters[uid] == "duplicate_image_caption"  # The corpus's copy stays.
    assert {r["caption"] for r in corpus_rows(out).values()} >= {"picture c20", "picture c21"}

    # embed's second run touches only the new shard (and the indexes and stats).
    counters = _embed(out, emb)
    assert (counters["shards_cached"], counters["shards_embedded"], counters["seen"]) == (4, 1, 2)
    changed = {n for n, v in _snapshot(emb).items() if emb_before.get(n) != v}
    assert changed == {f"{added['id']}.parquet", f"{added['id']}.parquet.commit",
                       f"_dead_letter/{added['id']}.parquet",
                       f"_dead_letter/{added['id']}.parquet.commit", "_index.json",
                       "_dead_letter/_index.json", "stats.json"}
    assert formats.read_embeddings_shard(os.path.join(emb, f"{added['id']}.parquet")).uids == [
        r["uid"] for r in formats.read_shard(formats.list_shards(out)[
            [s.shard_id for s in formats.list_shards(out)].index(added["id"])]).to_pylist()]

    # Appending again finds nothing new: the corpus index stays byte-identical.
    again = ingest.run(argv + ["--append"])
    assert (again["seen"], again["appends"]) == (15, 2)
    assert formats.read_json(f"{out}/_index.json") == new_index


def test_append_needs_a_finished_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    _tar(tmp_path / "in" / "0.tar", ["a1"])
    with pytest.raises(FileNotFoundError, match="no dataset"):
        ingest.run(["--input", str(tmp_path / "in"), "--format", "webdataset", "--append",
                    "--output", str(tmp_path / "missing")] + BEAM)


def test_shards_are_bounded_by_bytes_and_rows():
    table = pa.table({"image": [b"x" * 100] * 10, "caption": ["c"] * 10,
                      "uid": ["u"] * 10, "source_location": ["l"] * 10, "url": [None] * 10,
                      "license": [None] * 10})
    splitter = ingest_shards.ShardSplitter(max_rows=4, max_bytes=350)  # 104 bytes a row.
    parts = [t.num_rows for t in splitter.add(table.slice(0, 7))]
    parts += [t.num_rows for t in splitter.add(table.slice(7))]
    parts += [t.num_rows for t in splitter.close()]
    assert parts == [3, 3, 3, 1]
    splitter = ingest_shards.ShardSplitter(max_rows=4, max_bytes=1 << 20)
    assert [t.num_rows for t in list(splitter.add(table)) + list(splitter.close())] == [4, 4, 2]


def test_byte_bound_applies_to_ingest_output(tmp_path):
    (tmp_path / "in").mkdir()
    _tar(tmp_path / "in" / "0.tar", [f"a{i}" for i in range(8)])
    out = str(tmp_path / "out")
    stats = ingest.run(["--input", str(tmp_path / "in"), "--format", "webdataset",
                        "--output", out, "--max-image-bytes", "1000",
                        "--max-shard-bytes", "1200"] + BEAM)
    check_accounting(stats, out)
    shards = formats.list_shards(out)
    assert len(shards) == stats["num_shards"] >= 4
    for shard in shards:
        assert sum(ingest_shards._row_bytes(formats.read_shard(shard))) <= 1200


def _graph_bytes(pipeline) -> int:
    return len(pipeline.to_runner_api().SerializeToString())


def _fake_corpus(root: str, n: int) -> None:
    """An index naming n shards (never read: only the launcher's graph is built)."""
    os.makedirs(root, exist_ok=True)
    formats.write_index(root, [formats.ShardInfo(
        shard_id=f"{k:064x}", url="", num_rows=1000, sha256="0" * 64, schema_name="corpus/v1")
        for k in range(n)], writer="test")


@pytest.mark.parametrize("stage", ["embed", "select"])
def test_job_graph_does_not_grow_with_the_number_of_shards(tmp_path, stage):
    """Shard lists are read on workers from the index, never embedded in the job graph."""
    sizes = []
    for n in (2, 2000):
        corpus = str(tmp_path / f"corpus{n:05d}")
        _fake_corpus(corpus, n)
        p = beam.Pipeline(runner="FnApiRunner")
        if stage == "embed":
            _ = p | embed.EmbedCorpus(corpus=corpus, output=str(tmp_path / "e"),
                                      spec=embed.scoring.ScoringSpec(model=MODEL))
        else:
            _ = p | select.CurateRound(select.SelectConfig(
                corpus=corpus, output=str(tmp_path / "s"), batch_size=4, super_batch_size=8,
                method="uniform"))
        sizes.append(_graph_bytes(p))
    # 2000 shard ids alone would be ~130 kB; pickles of DoFns vary by a few bytes.
    assert abs(sizes[1] - sizes[0]) < 1000, sizes


def test_rerun_replaces_drop_lists_and_stale_shards(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _tar(src / "0.tar", ["a1", "a2"], image_of=lambda k: 1)  # Same image, two captions.
    _tar(src / "1.tar", ["b7"])
    out = str(tmp_path / "out")
    argv = ["--input", str(src), "--format", "webdataset", "--output", out] + BEAM
    first = ingest.run(argv)
    assert first["reasons"] == {"duplicate_image": 1}
    assert len(list(Path(out).glob("*.drop.parquet"))) == 1
    (src / "1.tar").unlink()
    again = ingest.run(argv + ["--dedup", "none"])
    check_accounting(again, out)
    assert (again["ingested"], again["num_shards"]) == (2, 1)
    # Nothing of the first run is left: no drop list, no shard of 1.tar, no stale keys.
    assert not list(Path(out).glob("*.drop.parquet"))
    paths = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*.parquet"))
    assert len(paths) == 2 and paths[1].startswith("_keys/"), paths  # The shard, its keys.


def test_ingest_job_graph_does_not_grow_with_the_number_of_inputs(tmp_path):
    """Inputs are listed on a worker: the launcher's graph holds the config, not the files."""
    sizes = []
    for n in (2, 2000):
        src = tmp_path / f"photos{n:04d}"
        src.mkdir()
        for i in range(n):
            (src / f"{i:04d}.png").write_bytes(b"x")
            (src / f"{i:04d}.txt").write_text("c")
        args, _ = ingest._parser().parse_known_args(
            ["--input", str(src), "--format", "folder", "--output", str(tmp_path / "out")])
        p = beam.Pipeline(runner="FnApiRunner")
        _ = p | ingest.IngestCorpus(ingest.config_from_args(args))
        sizes.append(_graph_bytes(p))
    assert abs(sizes[1] - sizes[0]) < 1000, sizes  # 2000 file names would be ~100 kB.
