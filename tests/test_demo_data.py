"""The Fashion-MNIST demo corpus: determinism, noise, disjoint splits, honest captions."""
import gzip
import os
import random
import re

import numpy as np
import pytest

from jest_curate import captions, cli, demo_data, formats, hashing
from training.preprocess import decode_image

SMALL = dict(pool_size=2000, curated_size=200, eval_size=1000, retrieval_size=300, shard_size=512)
SPLITS = ("pool", "curated", "eval/zeroshot", "eval/retrieval")
TRAIN, TEST = "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"


def _noun_pattern(label: int) -> re.Pattern:
    # Whole nouns only: "shirt" must not match "t-shirt" or "sweatshirt", "top" not "low-top".
    nouns = "|".join(re.escape(n) for n in captions.NOUNS[label])
    return re.compile(rf"(?<![\w-])({nouns})(?![\w-])", re.IGNORECASE)


NOUN_PATTERNS = [_noun_pattern(c) for c in range(10)]


def _files(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): formats.sha256_file(os.path.join(d, f))
            for d, _, names in os.walk(root) for f in names}


def _read(root, split):
    schema = (formats.LABELED_CORPUS_SCHEMA if split.startswith("eval") else
              formats.NOISE_SCHEMA if split.startswith("ground_truth") else formats.CORPUS_SCHEMA)
    rows = []
    for shard in formats.list_shards(f"{root}/{split}"):
        rows += formats.read_shard(shard, schema=schema).to_pylist()
    return rows


def _index(row):
    file, index = row["source_location"].rsplit("/", 1)[1].split("#")
    return file, int(index)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "a")
    summary = demo_data.build_demo_corpus(root, seed=0, noise=0.5, **SMALL)
    return root, summary


def test_same_seed_gives_identical_files_and_rerun_is_a_noop(built, tmp_path):
    root, summary = built
    again = str(tmp_path / "b")
    assert demo_data.build_demo_corpus(again, seed=0, noise=0.5, **SMALL) == summary
    files = _files(root)
    assert files == _files(again)
    assert {"demo.json", "eval/classes.json", "pool/00000.parquet", "pool/00000.parquet.commit",
            "ground_truth/noise/00003.parquet"} <= set(files)
    for split, shas in summary["shards"].items():
        assert shas == {s.shard_id: s.sha256 for s in formats.list_shards(f"{root}/{split}")}
    stamp = os.stat(os.path.join(root, "demo.json")).st_mtime_ns
    assert demo_data.build_demo_corpus(root, seed=0, noise=0.5, **SMALL) == summary
    assert os.stat(os.path.join(root, "demo.json")).st_mtime_ns == stamp


def test_cli_other_seed_and_noise_rate(built, tmp_path, capsys):
    out = str(tmp_path / "c")
    assert cli.main(["demo-data", "--output", out, "--seed", "1", "--noise", "0.2",
                     "--pool-size", "1000", "--curated-size", "100", "--eval-size", "300",
                     "--retrieval-size", "50", "--shard-size", "256"]) == 0
    assert "pool 1000" in capsys.readouterr().out
    summary = formats.read_json(f"{out}/demo.json")
    noise = _read(out, "ground_truth/noise")
    assert abs(np.mean([r["noise_kind"] != "clean" for r in noise]) - 0.2) < 0.005
    assert summary["noise_kinds"]["clean"] == 800
    # Another seed draws other images and other captions.
    assert not set(summary["shards"]["pool"].values()) & set(built[1]["shards"]["pool"].values())
    # Rebuilding into the same directory with new parameters replaces the old build.
    demo_data.build_demo_corpus(out, seed=1, noise=0.2, pool_size=300, curated_size=50,
                                eval_size=100, retrieval_size=10, shard_size=512)
    assert [s.num_rows for s in formats.list_shards(f"{out}/pool")] == [300]


def test_noise_rate_kinds_and_ground_truth(built):
    root, summary = built
    pool, noise = _read(root, "pool"), _read(root, "ground_truth/noise")
    assert [r["uid"] for r in noise] == [r["uid"] for r in pool]  # Same shards, same order.
    assert abs(np.mean([r["noise_kind"] != "clean" for r in noise]) - 0.5) < 0.005
    kinds = {k: sum(r["noise_kind"] == k for r in noise) for k in captions.NOISE_KINDS}
    assert kinds == summary["noise_kinds"] and all(kinds.values())
    # `noisy` is about the caption: duplicates are noisy only when their caption is.
    assert all(r["noisy"] == (r["caption_kind"] != "clean") for r in noise)
    assert all(r["caption_kind"] == r["noise_kind"] for r in noise
               if r["noise_kind"] not in ("exact_duplicate", "near_duplicate"))
    assert all(r["caption_kind"] == "clean" for r in noise
               if r["noise_kind"] == "near_duplicate")
    exact = [r for r in noise if r["noise_kind"] == "exact_duplicate"]
    assert {r["caption_kind"] for r in exact} >= {"clean", "wrong_item"}  # Copies of both.
    assert summary["caption_noise_rate"] == np.mean([r["noisy"] for r in noise])
    assert summary["caption_noise_rate"] < summary["noise_rate"]
    kind_of = {r["uid"]: r["noise_kind"] for r in noise}
    caption_of = {r["uid"]: r["caption_kind"] for r in noise}
    by_content, by_index = {}, {}
    for r in pool:
        by_content.setdefault((r["image"], r["caption"]), []).append(kind_of[r["uid"]])
        by_index.setdefault(_index(r), []).append(kind_of[r["uid"]])
    for r in pool:  # Every duplicate has an original with its image (exactly, for exact ones).
        if kind_of[r["uid"]] == "exact_duplicate":
            assert len(by_content[(r["image"], r["caption"])]) >= 2
            mentions = {c for c in range(10) if NOUN_PATTERNS[c].search(r["caption"])}
            assert bool(mentions) == (caption_of[r["uid"]] in ("clean", "wrong_item"))
        if kind_of[r["uid"]] == "near_duplicate":
            assert any(k not in ("exact_duplicate", "near_duplicate") for k in by_index[_index(r)])
    for r in pool:
        mentions = {c for c in range(10) if NOUN_PATTERNS[c].search(r["caption"])}
        if kind_of[r["uid"]] in ("boilerplate", "off_topic"):
            assert not mentions, r["caption"]
        elif kind_of[r["uid"]] != "exact_duplicate":  # Those copy any row, noisy ones too.
            assert mentions, r["caption"]


def test_splits_are_disjoint_and_well_formed(built):
    root, summary = built
    rows = {split: _read(root, split) for split in SPLITS}
    assert {k: len(v) for k, v in rows.items()} == {
        "pool": 2000, "curated": 200, "eval/zeroshot": 1000, "eval/retrieval": 300}
    uids = [r["uid"] for split in SPLITS for r in rows[split]]
    assert len(set(uids)) == len(uids) and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    pool_images = {_index(r) for r in rows["pool"]}
    curated_images = {_index(r) for r in rows["curated"]}
    assert len(curated_images) == 200 and not pool_images & curated_images
    assert {f for f, _ in pool_images | curated_images} == {TRAIN}
    zeroshot = {_index(r) for r in rows["eval/zeroshot"]}
    assert {f for f, _ in zeroshot} == {TEST}
    assert {_index(r) for r in rows["eval/retrieval"]} <= zeroshot
    assert all(r["source"] == "fashion-mnist" and r["license"] == "MIT" for s in SPLITS
               for r in rows[s])
    formats_seen = set()
    for split in SPLITS:
        for r in rows[split][:100]:
            img = decode_image(r["image"])
            assert img.size == (28, 28) and img.getpixel((0, 0))[0] > 200  # White background.
            assert r["image"][:2] == (b"\xff\xd8" if r["image_format"] == "jpeg" else b"\x89P")
            formats_seen.add(r["image_format"])
    assert formats_seen == {"jpeg", "png"}


def test_eval_captions_and_zero_shot_prompts(built):
    root, _ = built
    classes = formats.read_json(f"{root}/eval/classes.json")
    assert classes["classnames"] == list(captions.CLASSNAMES) and len(classes["templates"]) >= 5
    zeroshot, retrieval = _read(root, "eval/zeroshot"), _read(root, "eval/retrieval")
    labels = np.array([r["label"] for r in zeroshot])
    assert set(labels) == set(range(10))
    for r in zeroshot + retrieval:  # Clean captions name their true class.
        assert NOUN_PATTERNS[r["label"]].search(r["caption"]), r
    texts = [r["caption"] for r in retrieval]
    assert len(set(texts)) == len(texts)
    # Prompts are worded as the clean captions are (tests/test_evaluate.py checks tokens).
    clean = " ".join(r["caption"].lower() for s in ("curated", "eval/zeroshot")
                     for r in _read(root, s))
    for template in classes["templates"]:
        assert "{}" in template
        for word in re.findall(r"[a-z]+", template):
            assert re.search(rf"\b{word}\b", clean), (template, word)


def test_captions_follow_the_pixels_and_the_class():
    # Tone is absolute darkness; a caption's tone words follow it.
    dark, light = np.full((1, 28, 28), 250, np.uint8), np.full((1, 28, 28), 60, np.uint8)
    images = np.concatenate([dark, light])
    feats = captions.image_features(images)
    thresholds = np.zeros((10, 3, 2), np.float32)
    attrs = captions.image_attributes(feats, np.array([0, 0]), thresholds)
    assert attrs[0, 0] == 4 and attrs[1, 0] == 0
    rng = random.Random(0)
    for _ in range(300):
        label, a = rng.randrange(10), [rng.randrange(5), rng.randrange(3), rng.randrange(3),
                                       rng.randrange(3)]
        text = captions.clean_caption(rng, label, a, complete=True)
        assert NOUN_PATTERNS[label].search(text)
        assert any(w in text.lower() for w in captions._TONE[a[0]])
        wrong = captions.wrong_item_caption(rng, label, a)
        assert not NOUN_PATTERNS[label].search(wrong)
        assert any(NOUN_PATTERNS[c].search(wrong) for c in range(10) if c != label)


def test_missing_or_corrupt_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        demo_data.find_fashion_mnist([str(tmp_path)])
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + b"\x00" * 16)
    assert demo_data.find_fashion_mnist([str(tmp_path)]) == tmp_path
    with pytest.raises(formats.FormatError, match="not an IDX file"):
        demo_data.load_fashion_mnist("train", tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo-data directory"):
        demo_data.build_demo_corpus(str(tmp_path / "out"), pool_size=10, curated_size=10,
                                    eval_size=10)
    assert (tmp_path / "out" / "precious.txt").exists()
    with pytest.raises(ValueError, match="noise"):
        demo_data.build_demo_corpus(str(tmp_path / "o2"), noise=1.5)
    assert hashing.blake2b_fields("fashion-mnist", "pool", 1).hex() != \
        hashing.blake2b_fields("fashion-mnist", "curated", 1).hex()
