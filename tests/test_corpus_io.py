"""ReadCorpus / AssignShards / WriteCorpus: determinism, commit markers, reruns."""
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that

from jest_curate import formats
from pipelines.corpus_io import AssignShards, ReadCorpus, WriteCorpus, shard_of


def _table(n: int) -> pa.Table:
    uids = [f"{i * 7919 % 1000:04d}x{i}" for i in range(n)]
    return pa.table({
        "uid": uids, "image": [f"img{i}".encode() * (i % 5 + 1) for i in range(n)],
        "image_format": ["png"] * n, "caption": [f"caption {i}" for i in range(n)],
        "source": ["unit"] * n, "source_location": [f"mem#{i}" for i in range(n)],
        "url": [None if i % 3 else f"http://x/{i}" for i in range(n)], "license": [None] * n,
    }, schema=formats.CORPUS_SCHEMA)


def _batches(table: pa.Table, size: int, reverse: bool = False) -> list:
    if reverse:
        table = table.take(pa.array(range(table.num_rows - 1, -1, -1)))
    return table.to_batches(max_chunksize=size)


def _write(root, batches, **assign):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        _ = (p | beam.Create(batches, reshuffle=False) | AssignShards(**assign)
             | WriteCorpus(root))


def _shas(root):
    return {s.shard_id: s.sha256 for s in formats.list_shards(root)}


def _check_read(expected_uids, batch_size, by_shard=None):
    """A matcher for ReadCorpus(with_offsets=True) output summarised as plain tuples."""
    def check(actual):
        uids = [u for _, _, _, batch_uids in actual for u in batch_uids]
        assert sorted(uids) == sorted(expected_uids)
        assert all(0 < n <= batch_size for _, _, n, _ in actual)
        offsets = {}
        for shard_id, offset, n, _ in actual:
            offsets.setdefault(shard_id, []).append((offset, n))
        for spans in offsets.values():  # Batches of a shard tile it in row order.
            spans.sort()
            assert spans[0][0] == 0 and all(a + m == b for (a, m), (b, _) in zip(spans, spans[1:]))
        if by_shard:
            for shard_id, _, _, batch_uids in actual:
                assert all(by_shard(u) == shard_id for u in batch_uids)
    return check


def _summary(element):
    shard_id, offset, batch = element
    return shard_id, offset, batch.num_rows, batch.column("uid").to_pylist()


def test_write_is_independent_of_batching_and_order_and_reads_back(tmp_path):
    table = _table(300)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, _batches(table, 50), num_shards=3)
    _write(b, _batches(table, 37, reverse=True), num_shards=3)
    assert _shas(a) == _shas(b)
    assert sorted(_shas(a)) == ["00000-of-00003", "00001-of-00003", "00002-of-00003"]
    for shard in formats.list_shards(a):
        uids = formats.read_shard(shard, schema=formats.CORPUS_SCHEMA).column("uid").to_pylist()
        assert uids == sorted(uids)
    uids = table.column("uid").to_pylist()
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        read = (p | ReadCorpus(a, batch_size=40, schema=formats.CORPUS_SCHEMA, with_offsets=True)
                | beam.Map(_summary))
        assert_that(read, _check_read(uids, 40, lambda u: f"{shard_of(u, 3):05d}-of-00003"))
    back = pa.concat_tables([formats.read_shard(s) for s in formats.list_shards(a)])
    assert back.sort_by("uid").to_pylist() == table.sort_by("uid").to_pylist()


def test_rows_per_shard_and_rerun_prunes_stale_shards(tmp_path):
    root = str(tmp_path / "c")
    table = _table(300)
    _write(root, _batches(table, 64), num_shards=5)
    assert len(_shas(root)) == 5
    _write(root, _batches(table, 64), rows_per_shard=128)  # ceil(300 / 128) = 3 shards.
    shards = formats.list_shards(root)
    assert [s.shard_id for s in shards] == [f"{k:05d}-of-00003" for k in range(3)]
    assert sum(s.num_rows for s in shards) == 300
    assert not list(tmp_path.glob("c/*-of-00005*"))  # Data files removed, not just markers.


def test_empty_input_writes_an_empty_dataset(tmp_path):
    root = str(tmp_path / "empty")
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        _ = (p | beam.Create([], reshuffle=False).with_output_types(pa.RecordBatch)
             | AssignShards(rows_per_shard=10) | WriteCorpus(root))
    assert formats.list_shards(root) == []


def test_reader_never_sees_a_shard_without_its_commit_marker(tmp_path):
    root = str(tmp_path)
    table = _table(20)
    formats.write_shard(root, "00000", table.slice(0, 10), schema=formats.CORPUS_SCHEMA)
    # A complete data file whose writer died before the marker, and in-flight temp files.
    pq.write_table(table.slice(10, 5), str(tmp_path / "00001.parquet"))
    pq.write_table(table.slice(15, 5), str(tmp_path / "_tmp.0a1b.00002.parquet"))
    (tmp_path / "_tmp.9f8e.00003.parquet.commit").write_text('{"shard_id": "000')
    (tmp_path / "00004.parquet.commit.tmp").write_text("{}")
    assert [s.shard_id for s in formats.list_shards(root)] == ["00000"]
    committed = table.slice(0, 10).column("uid").to_pylist()
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        read = p | ReadCorpus(root, batch_size=4, with_offsets=True) | beam.Map(_summary)
        assert_that(read, _check_read(committed, 4))


def test_reader_refuses_tampered_shards_and_wrong_schemas(tmp_path):
    root = str(tmp_path)
    formats.write_shard(root, "00000", _table(10), schema=formats.CORPUS_SCHEMA)
    with pytest.raises(Exception, match="lacks or mistypes columns"):
        with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
            _ = p | ReadCorpus(root, schema=formats.LABELED_CORPUS_SCHEMA)
    marker = tmp_path / "00000.parquet.commit"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "num_rows": 11}))
    with pytest.raises(Exception, match="commit marker says 11"):
        with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
            _ = p | ReadCorpus(root)


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        AssignShards()
    with pytest.raises(ValueError, match="exactly one"):
        AssignShards(num_shards=2, rows_per_shard=3)
    with pytest.raises(ValueError, match="not in the schema"):
        WriteCorpus("/tmp/x", sort_by=("label",))
    with pytest.raises(ValueError, match="batch_size"):
        ReadCorpus("/tmp/x", batch_size=0)
    assert shard_of("abc", 7) == shard_of("abc", 7) and 0 <= shard_of(None, 3) < 3
