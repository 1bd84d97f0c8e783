"""`jest-curate ingest` for parquet and image folders: round trips, dead letters, stats."""
import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jest_curate import cli, formats
from pipelines import ingest, validate

BEAM = ["--runner", "FnApiRunner"]


def _image(i: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _corpus(root) -> dict:
    rows = [r for s in formats.list_shards(root)
            for r in formats.read_shard(s, schema=formats.CORPUS_SCHEMA).to_pylist()]
    assert len({r["uid"] for r in rows}) == len(rows)
    return {r["uid"]: r for r in rows}


def _dead_letters(root) -> list:
    return sorted((r["reason"], r["uid"]) for s in formats.list_shards(f"{root}/_dead_letter")
                  for r in formats.read_shard(s, schema=formats.DEAD_LETTER_SCHEMA).to_pylist())


def _check_stats(stats, seen, reasons):
    assert stats["seen"] == seen
    assert stats["ingested"] + stats["dead_lettered"] == stats["seen"]
    assert stats["reasons"] == reasons and stats["dead_lettered"] == sum(reasons.values())
    assert formats.read_json(f"{stats['output']}/stats.json") == stats


def test_parquet_round_trip_with_custom_columns_and_dead_letters(tmp_path):
    n = 40
    rows = {"img": [_image(i, "PNG" if i % 2 else "JPEG") for i in range(n)],
            "text": [f"  a small test picture number {i} \n" for i in range(n)],
            "key": [f"id-{i:03d}" for i in range(n)],
            "link": [f"https://e.x/{i}" for i in range(n)],
            "lic": ["cc-by"] * n}
    rows["img"][3] = b"definitely not an image"
    rows["text"][5] = "   "
    rows["key"][7] = "has.a.dot"
    rows["text"][9] = b"\xff\xfe not utf-8"
    first, second = pa.table(rows).slice(0, 25), pa.table(rows).slice(25)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(first, tmp_path / "in" / "part-0.parquet", row_group_size=10)
    # Hugging Face datasets store images as {"bytes", "path"} structs and text as binary.
    hf = second.set_column(0, "img", pa.StructArray.from_arrays(
        [second.column("img").combine_chunks(), pa.array([None] * second.num_rows, pa.string())],
        ["bytes", "path"]))
    hf = hf.set_column(1, "text", second.column("text").cast(pa.binary()))
    pq.write_table(hf, tmp_path / "in" / "sub" / "part-1.parquet")
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / "sub" / "truncated.parquet").write_bytes(b"PAR1 cut short")
    out = str(tmp_path / "out")
    argv = ["--input", str(tmp_path / "in"), "--format", "parquet", "--output", out,
            "--image-column", "img", "--caption-column", "text", "--uid-column", "key",
            "--url-column", "link", "--license-column", "lic", "--source", "web-a",
            "--rows-per-shard", "16", "--batch-size", "8"] + BEAM
    stats = ingest.run(argv)
    _check_stats(stats, n + 1, {"caption_not_utf8": 1, "empty_caption": 1, "invalid_uid": 1,
                                "undecodable_image": 1, "unreadable_input": 1})
    # Each input file (parquet: row group) is its own shards: 3 row groups of 10 rows plus
    # one file, 16 rows at most per shard (9 of the first file's 25 rows are dead letters).
    assert stats["by_source"]["web-a"]["ingested"] == n - 4 and stats["num_shards"] == 4
    corpus = _corpus(out)
    bad = {3, 5, 7, 9}
    assert sorted(corpus) == sorted(rows["key"][i] for i in range(n) if i not in bad)
    for i in set(range(n)) - bad:
        row = corpus[rows["key"][i]]
        assert row["image"] == rows["img"][i]
        assert row["image_format"] == ("png" if i % 2 else "jpeg")
        assert row["caption"] == f"a small test picture number {i}"
        assert (row["url"], row["license"], row["source"]) == (f"https://e.x/{i}", "cc-by", "web-a")
        assert row["source_location"].endswith(f"part-{int(i >= 25)}.parquet#row={i % 25}")
    assert _dead_letters(out) == [("caption_not_utf8", "id-009"), ("empty_caption", "id-005"),
                                  ("invalid_uid", None), ("undecodable_image", "id-003"),
                                  ("unreadable_input", None)]
    index = formats.read_json(f"{out}/_index.json")
    assert {e["unit"] for e in index["shards"]} == {
        "part-0.parquet#rg=0", "part-0.parquet#rg=1", "part-0.parquet#rg=2",
        "sub/part-1.parquet#rg=0"}
    assert ingest.run(argv)["num_shards"] == 4  # A rerun rewrites identical shards.
    assert formats.read_json(f"{out}/_index.json") == index


def test_parquet_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"image": [_image(0)], "text": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\].*--caption-column"):
        ingest.run(["--input", str(tmp_path / "a.parquet"), "--format", "parquet",
                    "--output", str(tmp_path / "out")] + BEAM)


def test_folder_with_sidecars_via_the_cli(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    files = {"a/1.jpg": _image(1, "JPEG"), "a/2.png": _image(2), "3.webp": _image(3, "WEBP"),
             "4.jpg": _image(4, "JPEG"), "6.png": _image(6), "7.jpg": b"\xff\xd8 truncated",
             "8.gif": _image(8, "GIF")}
    for name, data in files.items():
        (src / name).write_bytes(data)
    captions = {"a/1": "red kite over a hill", "a/2": "a dog", "3": "cat on a mat",
                "5": "orphan caption", "6": " \t", "7": "broken", "8": "animated"}
    for stem, text in captions.items():
        (src / f"{stem}.txt").write_text(text)
    out = str(tmp_path / "out")
    argv = ["ingest", "--input", str(src), "--format", "folder", "--output", out] + BEAM
    assert cli.main(argv) == 0
    assert "ingested 3 of 8" in capsys.readouterr().out
    stats = formats.read_json(f"{out}/stats.json")
    _check_stats(stats, 8, {"empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                            "undecodable_image": 1, "unsupported_image_format": 1})
    assert list(stats["by_source"]) == ["photos"]
    corpus = _corpus(out)
    got = {r["source_location"].rsplit("/photos/", 1)[1]:
           (r["caption"], r["image"], r["image_format"]) for r in corpus.values()}
    assert got == {"a/1.jpg": ("red kite over a hill", files["a/1.jpg"], "jpeg"),
                   "a/2.png": ("a dog", files["a/2.png"], "png"),
                   "3.webp": ("cat on a mat", files["3.webp"], "webp")}
    assert all(len(uid) == 32 and int(uid, 16) >= 0 for uid in corpus)


def test_folder_with_captions_csv(tmp_path):
    src = tmp_path / "shop"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(_image(10 + i))
    (src / "0.txt").write_text("ignored: the CSV is the caption source")
    with open(src / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption", "license"])
        writer.writerows([["0.png", "zero", "cc0"], ["1.png", "one, with a comma", "cc0"],
                          ["2.png", "two", ""], ["2.png", "two again", "cc0"],
                          ["missing.png", "nothing here", "cc0"], ["3.png", "", "cc0"]])
    out = str(tmp_path / "out")
    # 2.png has two captions: keep both (the default, --dedup image, keeps one per image).
    stats = ingest.run(["--input", str(src), "--format", "folder", "--output", out,
                        "--image-column", "file", "--license-column", "license",
                        "--dedup", "image-caption"] + BEAM)
    # 6 CSV rows + 4.png, which the CSV never mentions.
    _check_stats(stats, 7, {"empty_caption": 1, "missing_caption": 1, "missing_image": 1})
    rows = sorted((r["caption"], r["license"], r["source_location"].rsplit(":", 1)[1])
                  for r in _corpus(out).values())
    assert rows == [("one, with a comma", "cc0", "3"), ("two", None, "4"),
                    ("two again", "cc0", "5"), ("zero", "cc0", "2")]


def test_validation_functions():
    assert validate.image_problem(_image(0)) is None
    assert validate.image_problem(b"") == "missing_image"
    bad = validate.image_problem(b"GIF89a garbage")
    assert bad == "undecodable_image" and bad.detail
    assert validate.image_problem(_image(0, "BMP")) == "unsupported_image_format"
    assert validate.caption_problem("ok") is None and validate.caption_problem(b"ok") is None
    assert validate.caption_problem(None) == "missing_caption"
    assert validate.caption_problem(b"\xc3") == "caption_not_utf8"
    assert validate.caption_problem("\n ") == "empty_caption"
    assert validate.caption_problem("x" * 11, max_chars=10) == "caption_too_long"
    assert validate.uid_problem("ab_C-9") is None
    assert validate.uid_problem("a.b") == "invalid_uid" and validate.uid_problem(None)
    merged = ingest.merge_stats([
        {"s": {"seen": 2, "ingested": 1, "dead_lettered": 1, "reasons": {"x": 1}}},
        {"s": {"seen": 1, "ingested": 1, "dead_lettered": 0, "reasons": {"x": 2, "y": 1}}}])
    assert merged == {"s": {"seen": 3, "ingested": 2, "dead_lettered": 1,
                            "reasons": {"x": 3, "y": 1}}}
