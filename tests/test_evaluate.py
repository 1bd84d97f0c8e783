"""Evaluators with toy encoders of known similarities, eval directories, and the CLI.

The last test trains jest-vit-micro-28 briefly on the demo corpus's clean curated
pairs and checks zero-shot accuracy on the demo's eval split beats chance clearly.
"""
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jest_curate import captions, demo_data, formats
from training import evaluate
from training import main as main_lib
from training import train as train_lib


def _lookup(table: dict):
    """An encode function that returns the stored vector of each (hashable) input."""
    def encode(items):
        return np.stack([np.asarray(table[x], dtype=np.float32) for x in items])
    return encode


def _unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- zero-shot

def test_zero_shot_accuracy_matches_hand_computed_answer():
    # Class prompts: cat -> x axis, dog -> y axis, owl -> z axis (any template).
    text = {t.format(c): axis for c, axis in (("cat", _unit(1, 0, 0)), ("dog", _unit(0, 1, 0)),
                                              ("owl", _unit(0, 0, 1)))
            for t in ("a {}", "the {}")}
    images = {"i0": _unit(1, .1, 0), "i1": _unit(.2, 1, 0), "i2": _unit(0, .1, 1),
              "i3": _unit(1, .9, 0), "i4": _unit(.1, 0, 1)}
    labels = [0, 1, 2, 1, 0]  # i3 leans cat (wrong, dog 2nd), i4 is an owl (wrong, cat 2nd).
    evaluator = evaluate.ZeroShotEvaluator(
        _lookup(images), _lookup(text), images=list(images), labels=labels,
        classnames=["cat", "dog", "owl"], templates=["a {}", "the {}"], ks=(1, 2, 5),
        batch_size=2)
    # Per class: cat i0 right, i4 wrong; dog i1 right, i3 wrong; owl i2 right.
    assert dict(evaluator.run()) == {
        "zeroshot_top1": 0.6, "zeroshot_top2": 1.0,  # top5 > #classes: skipped.
        "zeroshot_top1_per_class": {"cat": 0.5, "dog": 0.5, "owl": 1.0},
        "zeroshot_balanced_top1": pytest.approx(2 / 3), "zeroshot_num_examples": 5}


def test_per_class_accuracy_marks_absent_classes():
    text = {"a": _unit(1, 0), "b": _unit(0, 1), "c": _unit(-1, 0)}
    zs = evaluate.ZeroShotEvaluator(_lookup({0: _unit(1, .1), 1: _unit(.1, 1)}), _lookup(text),
                                    images=[0, 1], labels=[0, 0], classnames=list("abc"),
                                    templates=["{}"])
    got = dict(zs.run())
    assert got["zeroshot_top1_per_class"] == {"a": 0.5, "b": None, "c": None}
    assert got["zeroshot_balanced_top1"] == 0.5


def test_prompt_ensemble_averages_templates():
    # With template "a {}" alone the cat image is nearer "a dog"; the mean fixes it.
    text = {"a cat": _unit(0, 1), "the cat": _unit(1, 0), "a dog": _unit(1, -1),
            "the dog": _unit(-1, -1)}
    image = _unit(1, -0.2)
    assert image @ text["a dog"] > image @ text["a cat"]
    evaluator = evaluate.ZeroShotEvaluator(
        _lookup({"img": image}), _lookup(text), images=["img"], labels=[0],
        classnames=["cat", "dog"], templates=["a {}", "the {}"])
    np.testing.assert_allclose(evaluator.class_embeddings()[0], _unit(1, 1), atol=1e-6)
    assert dict(evaluator.run())["zeroshot_top1"] == 1.0


def test_collapsed_model_gets_no_credit_from_ties():
    same = _unit(1, 1)
    zs = evaluate.ZeroShotEvaluator(
        _lookup({i: same for i in range(4)}), _lookup({f"{c}": same for c in "abcd"}),
        images=list(range(4)), labels=[0, 1, 2, 3], classnames=list("abcd"), templates=["{}"])
    assert dict(zs.run())["zeroshot_top1"] == 0.0
    ret = evaluate.RetrievalEvaluator(
        _lookup({i: same for i in range(4)}), _lookup({c: same for c in "wxyz"}),
        images=list(range(4)), captions=list("wxyz"), ks=(1, 3))
    assert {k: v for k, v in ret.run() if k != "retrieval_num_examples"} == {
        "retrieval_image_to_text_r1": 0.0, "retrieval_image_to_text_r3": 0.0,
        "retrieval_text_to_image_r1": 0.0, "retrieval_text_to_image_r3": 0.0}


def test_zero_shot_rejects_bad_inputs():
    enc = _lookup({})
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate.ZeroShotEvaluator(enc, enc, images=[1], labels=[3], classnames=["a", "b"],
                                   templates=["{}"])
    with pytest.raises(ValueError, match="templates"):
        evaluate.ZeroShotEvaluator(enc, enc, images=[1], labels=[0], classnames=["a"],
                                   templates=["no slot"])


# --------------------------------------------------------------------------- retrieval

def test_retrieval_recall_matches_hand_computed_ranks():
    rng = np.random.default_rng(0)
    n, d = 8, 16
    text = np.linalg.qr(rng.normal(size=(d, n)))[0].T  # Orthonormal captions.
    # Image i is its own caption plus a pull towards caption (i+1) % n of known strength:
    # images 0-1 stay nearest their caption, 2-3 are pulled past it (rank 1 of 8).
    pulls = [0.0, 0.5, 1.2, 1.5, 0.0, 0.3, 0.9, 2.0]
    image = np.stack([text[i] + p * text[(i + 1) % n] for i, p in enumerate(pulls)])
    captions = [f"caption {i}" for i in range(n)]
    ret = evaluate.RetrievalEvaluator(
        _lookup(dict(enumerate(image))), _lookup(dict(zip(captions, text))),
        images=list(range(n)), captions=captions, ks=(1, 2), batch_size=3)
    got = dict(ret.run())
    # Image->text: image i misses at R@1 exactly when pull > 1 (images 2, 3, 7).
    assert got["retrieval_image_to_text_r1"] == 5 / 8
    assert got["retrieval_image_to_text_r2"] == 1.0
    sims = evaluate._normalize(image) @ text.T
    expected_t2i_r1 = np.mean(sims.argmax(axis=0) == np.arange(n))
    assert got["retrieval_text_to_image_r1"] == expected_t2i_r1
    assert got["retrieval_num_examples"] == n


def test_retrieval_needs_unique_captions():
    enc = _lookup({})
    with pytest.raises(ValueError, match="unique captions; 1 are repeated"):
        evaluate.RetrievalEvaluator(enc, enc, images=[0, 1, 2], captions=["a", "b", "a"])


# --------------------------------------------------------------------------- eval dirs

def _write_labeled(root, rows) -> None:
    table = pa.table({
        "uid": [r[0] for r in rows], "image": [r[1] for r in rows],
        "image_format": ["png"] * len(rows), "caption": [r[2] for r in rows],
        "source": ["t"] * len(rows), "source_location": ["t"] * len(rows),
        "url": [None] * len(rows), "license": [None] * len(rows),
        "label": pa.array([r[3] for r in rows], pa.int32())}, schema=formats.LABELED_CORPUS_SCHEMA)
    formats.write_shard(str(root), "00000", table, schema=formats.LABELED_CORPUS_SCHEMA)


def test_eval_data_accepts_the_eval_dir_or_the_demo_root_and_counts_bad_images(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 0, 0)).save(buf, format="PNG")
    eval_dir = tmp_path / "demo" / "eval"
    _write_labeled(eval_dir / "zeroshot", [("a", buf.getvalue(), "red bar", 0),
                                           ("b", b"broken", "blue bar", 1)])
    formats.write_json_atomic(str(eval_dir / "classes.json"),
                              {"classnames": ["red", "blue"], "templates": ["a {} thing"]})
    for url in (str(eval_dir), str(tmp_path / "demo")):
        data = evaluate.load_eval_data(url)
        assert data.url == str(eval_dir) and data.retrieval is None
        assert len(data.zeroshot.images) == 1 and data.zeroshot.dropped == {
            "undecodable_image": 1}
    with pytest.raises(FileNotFoundError, match="no classes.json"):
        evaluate.load_eval_data(str(tmp_path))


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo_data.build_demo_corpus(str(root), seed=0, noise=0.5, pool_size=64,
                                curated_size=4000, eval_size=1000, retrieval_size=300)
    return root


def test_untaught_tokens_finds_words_the_captions_never_use():
    gaps = evaluate.untaught_tokens(["a sandal", "sandals", "{} online"],
                                    ["Strappy sandals, black", "buy them online"])
    assert gaps == {"a sandal": ["a</w>", "sandal</w>"]}


def test_every_class_name_and_prompt_token_occurs_in_clean_curated_captions(demo):
    """The demo's zero-shot prompts only use tokens its clean curated captions teach."""
    curated = [c for shard in formats.list_shards(str(demo / "curated"))
               for c in formats.read_shard(shard, columns=["caption"]).column(
                   "caption").to_pylist()]
    classes = formats.read_json(str(demo / "eval" / "classes.json"))
    assert classes["classnames"] == list(captions.CLASSNAMES)
    assert evaluate.untaught_tokens(classes["classnames"], curated) == {}
    assert evaluate.untaught_tokens(classes["templates"], curated) == {}
    prompts = [t.format(c) for c in classes["classnames"] for t in classes["templates"]]
    assert evaluate.untaught_tokens(prompts, curated) == {}
    # The first studies' prompts did use untaught tokens: the check can fail.
    legacy = evaluate.untaught_tokens(
        list(captions.LEGACY_CLASSNAMES) + list(captions.LEGACY_ZEROSHOT_TEMPLATES), curated)
    assert legacy["sandal"] == ["sandal</w>"] and legacy["sneaker"] == ["sneaker</w>"]
    assert legacy["ankle boot"] == ["boot</w>"]
    assert "photo</w>" in legacy["a photo of a {}."]


def test_zero_shot_after_brief_training_on_clean_pairs_beats_chance(demo, tmp_path, capsys):
    run = tmp_path / "reference"
    code = main_lib.train_main([
        "--shards", str(demo / "curated"), "--model", "jest-vit-micro-28",
        "--output", str(run), "--steps", "400", "--batch-size", "64", "--lr", "1e-3",
        "--warmup-steps", "40", "--precision", "fp32", "--num-threads", "1",
        "--no-tensorboard", "--log-every", "100"])
    assert code == 0
    capsys.readouterr()
    report_path = tmp_path / "metrics.json"
    assert main_lib.eval_main(["--checkpoint", str(run), "--eval-data", str(demo),
                               "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["step"] == 400 and report["model_name"] == "jest-vit-micro-28"
    assert report["zeroshot_num_examples"] == 1000 and report["retrieval_num_examples"] == 300
    # 10 classes: chance is 0.1 (+-0.01 over 1000 images); measured: see the report.
    assert report["zeroshot_top1"] >= 0.22
    print(json.dumps({k: v for k, v in report.items() if isinstance(v, float)}))
    assert report["retrieval_image_to_text_r5"] >= 0.1
    untrained = tmp_path / "untrained.json"
    assert main_lib.eval_main(["--checkpoint", train_lib.checkpoint_url(str(run), 0),
                               "--eval-data", str(demo / "eval"), "--output",
                               str(untrained)]) == 0
    assert json.loads(untrained.read_text())["zeroshot_top1"] < report["zeroshot_top1"] - 0.1


def test_eval_cli_reports_a_corrupt_checkpoint_in_one_line(demo, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    assert main_lib.eval_main(["--checkpoint", str(bad), "--eval-data", str(demo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jest-curate eval: error:") and "bad.pt" in err
    assert main_lib.eval_main(["--checkpoint", str(tmp_path), "--eval-data", str(demo)]) == 2
    assert "no checkpoints" in capsys.readouterr().err
