"""Web-scale ingest: WebDataset and img2dataset tars, hostile input, dead letters, dedup."""
import io
import json
import os
import random
import struct
import tarfile
import uuid
import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from PIL import Image

from jest_curate import formats, hashing
from pipelines import dedup, ingest, tar_stream, validate

BEAM = ["--runner", "FnApiRunner"]


# --------------------------------------------------------------------------- #
# Builders of test inputs (all small; nothing large is ever allocated)
# --------------------------------------------------------------------------- #

def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG claiming width x height grayscale pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = len(data), kind, link, 0
    return info, data


def tar_bytes(members, end: bool = True) -> bytes:
    """A tar of `members` ((name | TarInfo, bytes) pairs); `end=False` drops the end marker."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else member(name, data)[0]
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        body_end = tar.offset
    data = buf.getvalue()
    return data if end else data[:body_end]


def sample(key: str, img: bytes, caption: str, meta=None, ext: str = "jpg") -> list:
    out = [(f"{key}.{ext}", img), (f"{key}.txt", caption.encode())]
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def write_img2dataset_run(root, n_shards: int, per_shard: int, failed: set, seed: int) -> dict:
    """img2dataset-style output; returns {key: (image, caption, url)} of successes."""
    root.mkdir(parents=True)
    ok = {}
    for shard in range(n_shards):
        members, rows = [], []
        for j in range(per_shard):
            key = f"{shard:05d}{j:04d}"
            url = f"https://img.example/{seed}/{key}.jpg"
            caption = f"photo {key} from run {seed}"
            status = "failed_to_download" if key in failed else "success"
            rows.append({"url": url, "caption": caption, "key": key, "status": status,
                         "error_message": "HTTP 404" if key in failed else None,
                         "width": 12, "height": 10, "LICENSE": "cc-by-4.0"})
            if key not in failed:
                img = image_bytes(1000 * seed + 10 * shard + j, "JPEG")
                members += sample(key, img, caption, {"url": url, "key": key,
                                                      "status": "success",
                                                      "LICENSE": "cc-by-4.0"})
                ok[key] = (img, caption, url)
        (root / f"{shard:05d}.tar").write_bytes(tar_bytes(members))
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": per_shard, "successes": per_shard - len(failed & {r["key"] for r in rows}),
            "failed_to_download": len(failed & {r["key"] for r in rows}),
            "failed_to_resize": 0, "status_dict": {}}))
    return ok


def corpus_rows(root) -> dict:
    rows = [r for s in formats.list_shards(root)
            for r in formats.read_shard(s, schema=formats.CORPUS_SCHEMA).to_pylist()]
    assert len({r["uid"] for r in rows}) == len(rows)
    return {r["uid"]: r for r in rows}


def dead_letters(root) -> list:
    return [r for s in formats.list_shards(f"{root}/_dead_letter")
            for r in formats.read_shard(s, schema=formats.DEAD_LETTER_SCHEMA).to_pylist()]


def check_accounting(stats: dict, out: str) -> None:
    """Counts add up per source and overall, and match what was written."""
    for counts in stats["by_source"].values():
        assert counts["ingested"] + counts["dead_lettered"] == counts["seen"]
        assert sum(counts["reasons"].values()) == counts["dead_lettered"]
    assert stats["ingested"] + stats["dead_lettered"] == stats["seen"]
    assert len(corpus_rows(out)) == stats["ingested"]
    letters = dead_letters(out)
    assert len(letters) == stats["dead_lettered"]
    by_reason = {}
    for r in letters:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert by_reason == stats["reasons"]
    assert set(by_reason) <= set(validate.REASONS)


def derived_uid(source: str, rel: str, key) -> str:
    """The documented uid rule, restated."""
    return hashing.blake2b_fields("ingest", source, rel, key).hex()


def tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


# --------------------------------------------------------------------------- #
# tar_stream: the defensive tar reader on its own
# --------------------------------------------------------------------------- #

def _samples(data: bytes, seekable: bool = True, **kw):
    f = io.BytesIO(data)
    if not seekable:
        f = io.BufferedReader(io.BytesIO(data))
        f.seekable = lambda: False
    return list(tar_stream.iter_tar_samples(f, max_member_bytes=kw.pop("max_member_bytes", 1000),
                                            **kw))


@pytest.mark.parametrize("seekable", [True, False])
def test_tar_stream_groups_members_like_webdataset(seekable):
    long_key = "d/" + "x" * 150  # Beyond ustar's 100 characters: a pax header carries it.
    data = tar_bytes([("a/1.jpg", b"J1"), ("a/1.txt", b"one"), ("a/1.json", b"{}"),
                      ("a/2.seg.png", b"P2"), ("a/2.TXT", b"two"), (long_key + ".txt", b"l"),
                      member("dir", kind=tarfile.DIRTYPE), ("README", b"r"),
                      ("big.jpg", b"x" * 2000), ("big.txt", b"kept?")])
    got = _samples(data, seekable, keep=lambda ext: ext != "json")
    assert [(s.key, s.members, s.problem) for s in got] == [
        ("a/1", {"jpg": b"J1", "txt": b"one", "json": None}, None),
        ("a/2", {"seg.png": b"P2", "txt": b"two"}, None),
        (long_key, {"txt": b"l"}, None),
        ("README", {"": b"r"}, None),
        ("big", {}, "member_too_large")]
    assert got[0].offset == 0 and got[1].offset > got[0].offset
    buf = io.BytesIO()  # GNU tar spells long names with an 'L' header instead of pax.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in (long_key + ".jpg", long_key + ".txt"):
            tar.addfile(member(name, b"g")[0], io.BytesIO(b"g"))
    assert [(s.key, s.members) for s in _samples(buf.getvalue(), seekable)] == [
        (long_key, {"jpg": b"g", "txt": b"g"})]
    assert tar_stream.split_key("x/y.z/k.tar.gz") == ("x/y.z/k", "tar.gz")


def test_tar_stream_refuses_hostile_members_and_keeps_the_rest():
    data = tar_bytes([("ok.jpg", b"1"), ("../up.jpg", b"2"), ("/abs.jpg", b"3"),
                      member("ln.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),
                      member("hard.jpg", kind=tarfile.LNKTYPE, link="ok.jpg"),
                      member("fifo.jpg", kind=tarfile.FIFOTYPE),
                      ("dup.txt", b"a"), ("dup.txt", b"b"), ("after.jpg", b"4")])
    got = {s.key: s.problem for s in _samples(data)}
    assert got == {"ok": None, "../up": "unsafe_tar_member", "/abs": "unsafe_tar_member",
                   "ln": "unsafe_tar_member", "hard": "unsafe_tar_member",
                   "fifo": "unsafe_tar_member", "dup": "duplicate_member", "after": None}
    buf = io.BytesIO()  # A member name that is not UTF-8 (raw bytes in a ustar header).
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT,
                      errors="surrogateescape") as tar:
        tar.addfile(member("\udcff\udcfe.jpg", b"x")[0], io.BytesIO(b"x"))
    (bad,) = _samples(buf.getvalue())
    assert (bad.key, bad.problem, bad.problem.detail) == (
        "\\xff\\xfe", "unsafe_tar_member", "'\\\\xff\\\\xfe.jpg': name is not UTF-8")


def test_tar_stream_truncation_and_corruption():
    whole = tar_bytes([("a.jpg", b"A" * 700), ("a.txt", b"a"), ("b.jpg", b"B" * 700),
                       ("b.txt", b"b")])
    # Cut inside b.jpg's data: a is whole and kept, b is refused, nothing after.
    cut = whole.index(b"B" * 700) + 100
    got = _samples(whole[:cut])
    assert [(s.key, s.problem) for s in got] == [("a", None), ("b", "truncated_member")]
    # Cut at a header boundary: the last sample might be missing members.
    no_end = tar_bytes([("a.jpg", b"A"), ("a.txt", b"a"), ("b.jpg", b"B")], end=False)
    assert [(s.key, s.problem) for s in _samples(no_end)] == [("a", None), ("b", "truncated_tar")]
    # A header cut short, then a corrupt header, then not a tar at all, then nothing.
    assert _samples(whole[:1536 + 100])[-1].problem == "truncated_tar"
    bad = bytearray(whole)
    bad[whole.index(b"b.jpg")] ^= 1  # Breaks the checksum of b.jpg's header.
    got = _samples(bytes(bad))
    assert [(s.key, s.problem) for s in got] == [("a", "corrupt_tar")]  # a may have had more.
    assert [(s.key, s.problem) for s in _samples(b"<html>" + b" " * 600)] == [
        (None, "corrupt_tar")]
    assert [(s.key, s.problem, s.problem.detail) for s in _samples(b"")] == [
        (None, "truncated_tar", "empty file")]


# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #

def test_webdataset_round_trip(tmp_path):
    src = tmp_path / "wds"
    (src / "part").mkdir(parents=True)
    expected = {}
    for t, (name, fmt, ext) in enumerate([("a.tar", "JPEG", "jpg"), ("part/b.tar", "PNG", "png"),
                                          ("part/c.tar", "WEBP", "webp")]):
        members = []
        for j in range(6):
            key = f"s{j:03d}" if t != 1 else f"sub/s{j:03d}"  # Keys may carry directories.
            img, caption = image_bytes(10 * t + j, fmt), f"  picture {t}-{j} \n"
            meta = {"url": f"https://w.example/{t}/{j}", "license": "cc0"} if j % 2 else None
            members += sample(key, img, caption, meta, ext)
            expected[derived_uid("web", name, key)] = (img, ext, f"picture {t}-{j}", meta,
                                                       (f"/wds/{name}", f"#{key}@"))
        (src / name).write_bytes(tar_bytes(members))
    (src / "_tmp.tar").write_bytes(b"ignored: names starting with '_' are not inputs")
    out = str(tmp_path / "out")
    stats = ingest.run(["--input", str(src), "--format", "webdataset", "--output", out,
                        "--source", "web", "--rows-per-shard", "7"] + BEAM)
    check_accounting(stats, out)
    # Shards follow inputs: each tar's 6 samples make one shard of <= 7 rows.
    assert (stats["seen"], stats["ingested"], stats["num_shards"]) == (18, 18, 3)
    index = formats.read_json(f"{out}/_index.json")
    assert sorted(e["unit"] for e in index["shards"]) == ["a.tar", "part/b.tar", "part/c.tar"]
    assert all(e["source"] == "web" and e["rows"] == 6 for e in index["shards"])
    rows = corpus_rows(out)
    assert set(rows) == set(expected)
    for uid, (img, ext, caption, meta, where) in expected.items():
        row = rows[uid]
        assert (row["image"], row["caption"], row["source"]) == (img, caption, "web")
        assert row["image_format"] == {"jpg": "jpeg"}.get(ext, ext)
        assert (row["url"], row["license"]) == ((meta["url"], "cc0") if meta else (None, None))
        tar_url, _, sample_at = row["source_location"].partition("#")
        assert tar_url.endswith(where[0]) and f"#{sample_at}".startswith(where[1])


def test_img2dataset_two_runs_repeating_keys(tmp_path):
    """Keys repeat across runs; uids don't. Failed downloads and upstream counts are kept."""
    run1 = write_img2dataset_run(tmp_path / "runs" / "run1", 2, 5, {"000000003"}, seed=1)
    run2 = write_img2dataset_run(tmp_path / "runs" / "run2", 1, 5, {"000000001"}, seed=2)
    assert set(run1) & set(run2)  # Same keys in both runs.
    # Run 2 re-downloaded two of run 1's images (same bytes, same caption / other caption).
    copy_same, copy_other = "000010000", "000010001"
    tar2 = tmp_path / "runs" / "run2" / "00000.tar"
    members = [m for m in tarfile.open(tar2).getmembers()]
    with tarfile.open(tar2) as t:
        blobs = {m.name: t.extractfile(m).read() for m in members}
    blobs["000000002.jpg"] = run1[copy_same][0]
    blobs["000000002.txt"] = run1[copy_same][1].encode()
    blobs["000000004.jpg"] = run1[copy_other][0]
    tar2.write_bytes(tar_bytes([(m.name, blobs[m.name]) for m in members]))
    out = str(tmp_path / "out")
    pipeline = beam.Pipeline(runner=FnApiRunner())
    stats = ingest.run(["--input", str(tmp_path / "runs" / "run1"),
                        "--input", str(tmp_path / "runs" / "run2"),
                        "--format", "img2dataset", "--output", out], test_pipeline=pipeline)
    check_accounting(stats, out)
    for source, counts in stats["by_source"].items():  # Beam counters tell the same story.
        got = {}
        for r in pipeline.result.metrics().query(MetricsFilter().with_namespace(
                f"jest_curate.ingest.source.{source}"))["counters"]:  # Summed over steps.
            got[r.key.metric.name] = got.get(r.key.metric.name, 0) + r.committed
        assert got == {**{k: counts[k] for k in ("seen", "ingested", "dead_lettered")},
                       **{f"dropped_{r}": n for r, n in counts["reasons"].items()}}
    assert stats["by_source"]["run1"]["img2dataset"] == {
        "shards": 2, "shards_with_stats": 2, "count": 10, "successes": 9,
        "failed_to_download": 1, "failed_to_resize": 0}
    assert stats["by_source"]["run1"]["seen"] == 10 and stats["by_source"]["run2"]["seen"] == 5
    assert stats["reasons"] == {"download_failed": 2, "duplicate_image_caption": 1,
                                "duplicate_image": 1}
    rows = corpus_rows(out)
    # The copies in run2 lose to run1's, whose source_location sorts first.
    want = {derived_uid("run1", f"{k[:5]}.tar", k): v for k, v in run1.items()}
    want.update({derived_uid("run2", "00000.tar", k): v for k, v in run2.items()
                 if k not in ("000000002", "000000004")})
    assert {u: (r["image"], r["caption"], r["url"]) for u, r in rows.items()} == want
    assert {r["license"] for r in rows.values()} == {"cc-by-4.0"}
    letters = {(r["reason"], r["uid"]) for r in dead_letters(out)}
    assert letters == {
        ("download_failed", derived_uid("run1", "00000.tar", "000000003")),
        ("download_failed", derived_uid("run2", "00000.tar", "000000001")),
        ("duplicate_image_caption", derived_uid("run2", "00000.tar", "000000002")),
        ("duplicate_image", derived_uid("run2", "00000.tar", "000000004"))}


# --------------------------------------------------------------------------- #
# A corpus of bad examples: each refused with its reason, nothing written elsewhere
# --------------------------------------------------------------------------- #

def test_bad_input_corpus_is_dead_lettered_with_reasons(tmp_path):
    src = tmp_path / "inbox" / "bad"
    src.mkdir(parents=True)
    escape = f"/tmp/jest-curate-escape-{uuid.uuid4().hex}.jpg"
    good = [sample(f"good{i}", image_bytes(i, "JPEG"), f"a good caption {i}",
                   {"url": f"https://ok.example/{i}"}) for i in range(4)]
    bad = {  # key -> (members, reason)
        "up": ([("../../up.jpg", image_bytes(50)), ("../../up.txt", b"climbs out")],
               "unsafe_tar_member"),
        "abs": ([(escape, image_bytes(51))], "unsafe_tar_member"),
        "link": ([member("link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),
                  ("link.txt", b"a symlink")], "unsafe_tar_member"),
        "huge": ([("huge.png", os.urandom(300_000)), ("huge.txt", b"too big")],
                 "member_too_large"),
        "twice": ([("twice.jpg", image_bytes(52)), ("twice.jpg", image_bytes(53)),
                   ("twice.txt", b"x")], "duplicate_member"),
        "meta": (sample("meta", image_bytes(54), "ok", None) + [("meta.json", b"{not json")],
                 "bad_metadata"),
        "bomb": (sample("bomb", png_header_only(40_000, 25_000), "10^9 pixels", ext="png"),
                 "image_too_large"),
        "big": (sample("big", png_header_only(9_000, 9_000), "81 MP", ext="png"),
                "image_too_large"),
        "html": (sample("html", b"<!DOCTYPE html><html><body>404</body></html>", "page"),
                 "not_an_image"),
        "cut": (sample("cut", image_bytes(55, "JPEG")[:60], "truncated jpeg"),
                "undecodable_image"),
        "gif": (sample("gif", image_bytes(56, "GIF"), "a gif", ext="gif"),
                "unsupported_image_format"),
        "noimg": ([("noimg.txt", b"caption only")], "missing_image"),
        "nocap": ([("nocap.jpg", image_bytes(57, "JPEG"))], "missing_caption"),
        "latin1": ([("latin1.jpg", image_bytes(58, "JPEG")), ("latin1.txt", b"caf\xe9")],
                   "caption_not_utf8"),
        "blank": (sample("blank", image_bytes(59, "JPEG"), " \n\t"), "empty_caption"),
        "long": (sample("long", image_bytes(60, "JPEG"), "y" * 301), "caption_too_long"),
        "takedown": (sample("takedown", image_bytes(61, "JPEG"), "removed on request"),
                     "blocklisted"),
        "takedown_url": (sample("takedown_url", image_bytes(62, "JPEG"), "url removed",
                                {"url": "https://gone.example/x.jpg"}), "blocklisted"),
        "zcopy": (sample("zcopy", image_bytes(0, "JPEG"), "a good caption 0"),
                 "duplicate_image_caption"),
        "zrecaptioned": (sample("zrecaptioned", image_bytes(1, "JPEG"), "another caption"),
                        "duplicate_image"),
    }
    members = [m for s in good for m in s]
    for key, (ms, _) in bad.items():
        members += ms
    members += sample("good0", image_bytes(70, "JPEG"), "same key again, later")  # Same uid.
    (src / "00000.tar").write_bytes(tar_bytes(members))
    # Truncated tars: whole samples before the cut are kept.
    tail = tar_bytes(sample("t1", image_bytes(80, "JPEG"), "before the cut")
                     + sample("t2", image_bytes(81, "JPEG"), "cut in its image"))
    (src / "00001.tar").write_bytes(tail[:tail.index(image_bytes(81, "JPEG")) + 50])
    (src / "00002.tar").write_bytes(tar_bytes(
        sample("e1", image_bytes(82, "JPEG"), "complete")
        + sample("e2", image_bytes(83, "JPEG"), "maybe not"), end=False))
    (src / "00003.tar").write_bytes(b"<html><body>Forbidden</body></html>" + b"\n" * 600)
    blocklist = tmp_path / "inbox" / "takedowns.txt"
    blocklist.write_text(f"# takedown requests\n{derived_uid('bad', '00000.tar', 'takedown')}\n"
                         "https://gone.example/x.jpg\n\n")
    out = tmp_path / "out"
    before = tree(tmp_path)
    stats = ingest.run(["--input", str(src), "--format", "webdataset", "--output", str(out),
                        "--blocklist", str(blocklist), "--max-image-bytes", "200000",
                        "--max-caption-chars", "300"] + BEAM)
    check_accounting(stats, str(out))
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == before
    assert not os.path.exists(escape) and not (tmp_path / "up.jpg").exists()
    assert not (tmp_path / "inbox" / "up.jpg").exists()

    letters = dead_letters(str(out))
    by_key = {}
    for r in letters:
        key = r["source_location"].split("#", 1)[1].rsplit("@", 1)[0] if "#" in r[
            "source_location"] else r["source_location"].rsplit("/", 1)[1]
        by_key.setdefault(key, []).append(r["reason"])
        assert r["detail"]
    expected = {("../../up" if k == "up" else escape[:-4] if k == "abs" else k): [reason]
                for k, (_, reason) in bad.items()}
    expected.update({"good0": ["duplicate_uid"], "t2": ["truncated_member"],
                     "e2": ["truncated_tar"], "00003.tar@0": ["corrupt_tar"]})
    assert by_key == expected
    assert len({reason for reasons in expected.values() for reason in reasons}) >= 10
    rows = corpus_rows(str(out))
    assert sorted(r["caption"] for r in rows.values()) == [
        "a good caption 0", "a good caption 1", "a good caption 2", "a good caption 3",
        "before the cut", "complete"]
    assert stats["by_source"]["bad"]["seen"] == len(good) + len(bad) + 1 + 2 + 2 + 1


def test_parquet_files_with_another_schema_are_dead_lettered(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"image": [image_bytes(0), image_bytes(1)], "caption": ["a", "b"],
                             "url": ["https://u/0", "https://u/1"], "licence": ["cc0", None]}),
                   src / "a.parquet")
    pq.write_table(pa.table({"image": ["not", "bytes"], "caption": ["c", "d"]}), src / "b.parquet")
    pq.write_table(pa.table({"image": [image_bytes(2)] * 3}), src / "c.parquet")
    out = str(tmp_path / "out")
    stats = ingest.run(["--input", str(src), "--format", "parquet", "--output", out] + BEAM)
    check_accounting(stats, out)
    assert stats["reasons"] == {"schema_mismatch": 5}
    rows = sorted((r["caption"], r["url"], r["license"]) for r in corpus_rows(out).values())
    assert rows == [("a", "https://u/0", "cc0"), ("b", "https://u/1", None)]  # Found by name.
    details = {r["detail"] for r in dead_letters(out)}
    assert any("binary" in d for d in details) and any("'caption'" in d for d in details)


def test_dedup_winner_does_not_depend_on_order_or_grouping(tmp_path):
    rng = random.Random(0)
    keys = pa.table({
        "uid": ["u1", "u2", "u1", "u3", "u4", "u5", "u6"],
        "source": ["a", "a", "b", "a", "b", "a", "a"],
        "source_location": ["a#1", "a#2", "b#1", "a#3", "b#2", "a#4", "a#0"],
        "image_key": ["i1", "i2", "i9", "i1", "i1", "i3", "i3"],
        "caption_key": ["c1", "c2", "c9", "c1", "c7", "c3", "c4"]})
    for _ in range(5):
        shuffled = keys.take(pa.array(rng.sample(range(keys.num_rows), keys.num_rows)))
        lost = dedup.losers(shuffled, "image")
        got = sorted(zip(lost.column("uid").to_pylist(), lost.column("reason").to_pylist(),
                         lost.column("source_location").to_pylist()))
        assert got == [("u1", "duplicate_uid", "b#1"),  # a#1 sorts first.
                       ("u3", "duplicate_image_caption", "a#3"),
                       ("u4", "duplicate_image", "b#2"), ("u5", "duplicate_image", "a#4")]
    assert dedup.losers(keys, "image-caption").column("uid").to_pylist() == ["u1", "u3"]
    assert dedup.losers(keys, "none").column("uid").to_pylist() == ["u1"]
    # A hot key: one image a thousand times is one accumulator entry, whoever adds it.
    hot = pa.table({"uid": [f"h{i}" for i in range(1000)], "source": ["a"] * 1000,
                    "source_location": [f"a#{i:04d}" for i in range(1000)],
                    "image_key": ["same"] * 1000, "caption_key": ["c"] * 1000})
    assert dedup.losers(hot, "image").num_rows == 999
    assert dedup.winners(dedup._in_flight(dedup.dedup_keys(pa.table({
        "uid": ["x"], "source": ["a"], "source_location": ["a#0"], "image": [b"1"],
        "caption": ["c"]}), shard="s"), 1), "image_key").num_rows == 1

    # The pipeline agrees when key records are spread over many groups and shards.
    src = tmp_path / "dups"
    src.mkdir()
    for t in range(3):
        members = []
        for j in range(10 * t, 10 * t + 10):
            members += sample(f"k{j:02d}", image_bytes(j % 7, "PNG"), f"caption {j % 3}",
                              ext="png")
        (src / f"{t}.tar").write_bytes(tar_bytes(members))
    outs = []
    for group in ("1", "1000000"):
        out = str(tmp_path / f"out{group}")
        stats = ingest.run(["--input", str(src), "--format", "webdataset", "--output", out,
                            "--dedup-rows-per-group", group, "--rows-per-shard", "3"] + BEAM)
        check_accounting(stats, out)
        outs.append((formats.read_json(f"{out}/_index.json"),
                     sorted((r["uid"], r["reason"]) for r in dead_letters(out))))
    assert outs[0] == outs[1]
    assert outs[0][1] and {r for _, r in outs[0][1]} == {"duplicate_image",
                                                         "duplicate_image_caption"}
    # Kept: the first sample (k00..k06) of each of the 7 images.
    kept = corpus_rows(str(tmp_path / "out1"))
    assert sorted(r["source_location"].split("#")[1][:3] for r in kept.values()) == [
        f"k{j:02d}" for j in range(7)]
    # Decisions are drop lists: the shards of 0.tar and 1.tar keep their files.
    index = outs[0][0]
    assert any("drop_sha256" in e for e in index["shards"])
    assert sum(e["rows"] for e in index["shards"]) == 7
    assert sum(e.get("file_rows", e["rows"]) for e in index["shards"]) == 30


def test_configuration_errors_are_clear(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.tar").write_bytes(tar_bytes(sample("a", image_bytes(0), "x")))
    base = ["--format", "webdataset"] + BEAM
    with pytest.raises(ValueError, match="overlap"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "out")]
                   + base)
    with pytest.raises(ValueError, match="source names must differ"):
        ingest.run(["--input", str(tmp_path / "in"), "--input", str(tmp_path / "in" / "0.tar"),
                    "--source", "same", "--output", str(tmp_path / "o")] + base)
    with pytest.raises(ValueError, match="one --format for all inputs or one per"):
        ingest.run(["--input", str(tmp_path / "in"), "--format", "parquet",
                    "--output", str(tmp_path / "o")] + base)
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        ingest.run(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")] + base)
    with pytest.raises(FileNotFoundError):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                    "--blocklist", str(tmp_path / "missing.txt")] + base)
    assert not (tmp_path / "o").exists()
