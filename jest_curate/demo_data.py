"""The demo corpus: real Fashion-MNIST product photos with web-style, partly noisy captions.

    jest-curate demo-data --output URL [--seed 0] [--noise 0.5] [--pool-size N] ...

Source: Debian's `dataset-fashion-mnist` (MIT; 60k train + 10k test 28x28 grayscale
photos, 10 classes), found in $JEST_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist
or <repo>/.data/fashion-mnist/usr/share/datasets/fashion-mnist (`make data` fetches it).

Output layout under OUTPUT (sharded parquet with commit markers, see formats.py):

    pool/                  CORPUS_SCHEMA. Uncurated pool from train images; a `noise`
                           fraction of rows is noisy: wrong item, boilerplate, off-topic
                           text, exact and near duplicates of other pool rows.
    curated/               CORPUS_SCHEMA. ~5% of train, disjoint from the pool, clean.
    eval/zeroshot/         LABELED_CORPUS_SCHEMA. Test images with labels (clean captions).
    eval/retrieval/        LABELED_CORPUS_SCHEMA. Test images whose attribute tuple is
                           unique, with unique captions naming every attribute.
    eval/classes.json      {"classnames": [...], "templates": ["a photo of a {}.", ...]}.
    ground_truth/noise/    NOISE_SCHEMA, keyed by uid; same shard ids and row order as
                           pool/: how each row was made and whether its caption is
                           noise (duplicates keep their caption's kind). Reports read
                           it; selection never does.
    demo.json              Summary (parameters, counts, noise kinds, sha256 per shard),
                           written last: the completion marker. A rerun with the same
                           parameters finds it and does nothing.

Pool size counts rows: duplicates take the place of distinct images, so the default
(all train images not in the curated set) leaves the duplicated fraction of them unused.
uids are 32 lowercase hex digits of blake2b(source, split, index[, kind, n]); bytes
are deterministic for a seed (given the same Pillow/libjpeg build).
"""
import argparse
import gzip
import io
import os
import random
from pathlib import Path
from typing import Optional

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from jest_curate import captions, flags, formats, hashing

__all__ = ["SOURCE", "find_fashion_mnist", "load_fashion_mnist",
           "build_demo_corpus", "run"]

SOURCE = "fashion-mnist"
LICENSE = "MIT"
FORMAT = "jest-curate/demo-data/v2"  # v2: taught prompts, caption_kind.
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_REPO = Path(__file__).resolve().parent.parent
_SUBDIRS = ("pool", "curated", "eval", "ground_truth")


# --------------------------------------------------------------------------- #
# Fashion-MNIST IDX files
# --------------------------------------------------------------------------- #

def _search_dirs() -> list:
    env = os.environ.get("JEST_FASHION_MNIST_DIR")
    dirs = [env] if env else []
    return dirs + ["/usr/share/datasets/fashion-mnist",
                   str(_REPO / ".data/fashion-mnist/usr/share/datasets/fashion-mnist")]


def find_fashion_mnist(search_dirs: Optional[list] = None) -> Path:
    """The first directory holding the four IDX files; else an error saying how to get them."""
    dirs = _search_dirs() if search_dirs is None else list(search_dirs)
    for d in dirs:
        if all((Path(d) / name).is_file() for pair in _FILES.values() for name in pair):
            return Path(d)
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked in: " + ", ".join(dirs) + "). Run `make data` "
        "(scripts/get_fashion_mnist.sh installs Debian's dataset-fashion-mnist, or unpacks it "
        "into .data/ without root), or set JEST_FASHION_MNIST_DIR to a directory with the "
        "four *-ubyte.gz files.")


def _read_idx(path: Path, magic: int, item_shape: tuple) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 * (1 + 1 + len(item_shape))
    dims = np.frombuffer(data, ">u4", count=header // 4)
    if len(data) < header or dims[0] != magic or tuple(dims[2:]) != item_shape:
        raise formats.FormatError(f"{path}: not an IDX file of {item_shape} items "
                                  f"(header {dims.tolist()})")
    n = int(dims[1])
    if len(data) != header + n * int(np.prod(item_shape, dtype=np.int64)):
        raise formats.FormatError(f"{path}: truncated ({len(data)} bytes for {n} items)")
    return np.frombuffer(data, np.uint8, offset=header).reshape((n,) + item_shape)


def load_fashion_mnist(split: str, directory: Optional[Path] = None):
    """(images [n, 28, 28] uint8 with ink bright as stored, labels [n] int64) of train|test."""
    directory = find_fashion_mnist() if directory is None else Path(directory)
    image_file, label_file = _FILES[split]
    images = _read_idx(directory / image_file, 2051, (28, 28))
    labels = _read_idx(directory / label_file, 2049, ()).astype(np.int64)
    if len(images) != len(labels) or labels.max(initial=0) > 9:
        raise formats.FormatError(f"{directory}: {split} images and labels disagree")
    return images, labels


# --------------------------------------------------------------------------- #
# Examples
# --------------------------------------------------------------------------- #

def _uid(split: str, index: int, *variant) -> str:
    return hashing.blake2b_fields(SOURCE, split, index, *variant).hex()


def _encode(raw: np.ndarray, rng: random.Random) -> tuple:
    """Web-like bytes of one photo: dark item on white, mostly JPEG, some PNG."""
    img = Image.fromarray(255 - raw)  # uint8 [28, 28] -> mode "L".
    buf = io.BytesIO()
    if rng.random() < 0.8:
        if rng.random() < 0.25:
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=rng.choice((70, 80, 85, 90, 95)))
        return buf.getvalue(), "jpeg"
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _perturb(raw: np.ndarray, rng: random.Random) -> np.ndarray:
    """A near-duplicate view: shifted one pixel or slightly re-exposed."""
    if rng.random() < 0.5:
        axis, step = rng.choice((0, 1)), rng.choice((-1, 1))
        out = np.roll(raw, step, axis=axis)
        edge = 0 if step == 1 else -1
        if axis == 0:
            out[edge, :] = 0
        else:
            out[:, edge] = 0
        return out
    return np.clip(raw.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)


class _Rows:
    """Column lists for one split."""

    def __init__(self, labelled: bool = False):
        self.cols = {name: [] for name in (formats.LABELED_CORPUS_SCHEMA if labelled
                                           else formats.CORPUS_SCHEMA).names}

    def add(self, uid, image, image_format, caption, file, index, label=None):
        row = {"uid": uid, "image": image, "image_format": image_format, "caption": caption,
               "source": SOURCE, "source_location": f"{SOURCE}/{file}#{index}", "url": None,
               "license": LICENSE, "label": label}
        for name, values in self.cols.items():
            values.append(row[name])

    def table(self, schema: pa.Schema, order=None) -> pa.Table:
        table = pa.table({k: pa.array(v, schema.field(k).type) for k, v in self.cols.items()},
                         schema=schema)
        return table if order is None else table.take(pa.array(order, pa.int64()))


def _pool(images, labels, attrs, indices, n: int, noise: float, seed: int):
    """(pool table, noise table, kind counts); rows shuffled so duplicates spread over shards."""
    file = _FILES["train"][0]
    counts = captions.noise_counts(n, noise)
    n_dup = counts["exact_duplicate"] + counts["near_duplicate"]
    n_base = n - n_dup
    rng = np.random.default_rng(hashing.derive_seed(seed, "demo", "pool"))
    kinds = np.full(n_base, "clean", dtype=object)
    order, at = rng.permutation(n_base), 0
    for kind in ("wrong_item", "boilerplate", "off_topic"):
        kinds[order[at:at + counts[kind]]] = kind
        at += counts[kind]
    rows, row_kinds, caption_kinds = _Rows(), [], []
    for i in range(n_base):
        t = int(indices[i])
        label, a = int(labels[t]), attrs[t]
        r = random.Random(hashing.derive_seed(seed, "demo", "pool", t))
        image, fmt = _encode(images[t], r)
        caption = captions.pool_caption(r, kinds[i], label, a)
        rows.add(_uid("pool", t), image, fmt, caption, file, t)
        row_kinds.append(kinds[i])
        caption_kinds.append(kinds[i])
    sources = rng.integers(0, n_base, size=n_dup) if n_dup else np.zeros(0, np.int64)
    for j, s in enumerate(sources):
        t = int(indices[s])
        kind = "exact_duplicate" if j < counts["exact_duplicate"] else "near_duplicate"
        if kind == "exact_duplicate":
            image, fmt, caption = (rows.cols[c][s] for c in ("image", "image_format", "caption"))
        else:
            r = random.Random(hashing.derive_seed(seed, "demo", "pool", t, kind, j))
            image, fmt = _encode(_perturb(images[t], r), r)
            caption = captions.pool_caption(r, "clean", int(labels[t]), attrs[t])
        rows.add(_uid("pool", t, kind, j), image, fmt, caption, file, t)
        row_kinds.append(kind)
        caption_kinds.append(caption_kinds[s] if kind == "exact_duplicate" else "clean")
    order = rng.permutation(n)
    pool = rows.table(formats.CORPUS_SCHEMA, order)
    noise_table = pa.table({"uid": pool.column("uid"),
                            "noisy": pa.array([caption_kinds[i] != "clean" for i in order]),
                            "noise_kind": pa.array([row_kinds[i] for i in order], pa.string()),
                            "caption_kind": pa.array([caption_kinds[i] for i in order],
                                                     pa.string())},
                           schema=formats.NOISE_SCHEMA)
    counts["clean"] = n - sum(counts.values())
    return pool, noise_table, counts


def _clean_split(split, images, labels, attrs, indices, seed, *, file, complete=False):
    rows = _Rows(labelled=split.startswith("eval"))
    for t in indices:
        t = int(t)
        r = random.Random(hashing.derive_seed(seed, "demo", split, t))
        image, fmt = _encode(images[t], r)
        caption = captions.clean_caption(r, int(labels[t]), attrs[t], complete=complete)
        rows.add(_uid(split, t), image, fmt, caption, file, t, int(labels[t]))
    return rows


def _retrieval_indices(eval_indices, labels, attrs, size: int, seed: int) -> np.ndarray:
    """One image per (class, attributes) tuple, so every caption describes one image only."""
    rng = np.random.default_rng(hashing.derive_seed(seed, "demo", "retrieval"))
    first = {}
    for t in rng.permutation(np.asarray(eval_indices)):
        first.setdefault((int(labels[t]),) + tuple(int(x) for x in attrs[t]), int(t))
    chosen = np.array(sorted(first.values()), np.int64)
    return np.sort(rng.permutation(chosen)[:size])


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #

def _write_split(root: str, table: pa.Table, schema: pa.Schema, shard_size: int) -> dict:
    """Shards `00000`, `00001`, ... of `shard_size` rows; returns {shard_id: sha256}."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)  # An empty split is still a (committed-empty) dataset.
    infos = [formats.write_shard(root, f"{k:05d}", table.slice(start, shard_size), schema=schema)
             for k, start in enumerate(range(0, table.num_rows, shard_size))]
    formats.write_index(root, infos, writer="jest-curate demo-data")
    return {info.shard_id: info.sha256 for info in infos}


def _is_complete(output: str, params: dict) -> Optional[dict]:
    """The existing summary if OUTPUT already holds this exact build, else None."""
    url = formats.join_url(output, "demo.json")
    if not formats.exists(url):
        return None
    summary = formats.read_json(url)
    if summary.get("format") != FORMAT or summary.get("params") != params:
        return None
    for split, shas in summary["shards"].items():
        committed = {i.shard_id: i.sha256
                     for i in formats.list_shards(formats.join_url(output, split))}
        if committed != shas:
            return None
    return summary


def _clear(output: str) -> None:
    """Remove a previous build; refuse to touch a directory that is not one."""
    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        return
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    foreign = sorted(names - set(_SUBDIRS) - {"demo.json"})
    if foreign:
        raise FileExistsError(f"{output} is not empty and not a demo-data directory "
                              f"(found {foreign[:5]}); choose another --output")
    if "demo.json" in names:  # First, so an interrupted rebuild never looks complete.
        fs.rm(f"{path}/demo.json")
    for name in sorted(names & set(_SUBDIRS)):
        fs.rm(f"{path}/{name}", recursive=True)


def build_demo_corpus(output: str, *, seed: int = 0, noise: float = 0.5,
                      pool_size: Optional[int] = None, curated_size: Optional[int] = None,
                      eval_size: Optional[int] = None, retrieval_size: int = 1000,
                      shard_size: int = 4096, data_dir: Optional[str] = None) -> dict:
    """Build the demo corpus under `output` (layout in the module docstring); returns demo.json."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if shard_size < 1 or retrieval_size < 0:
        raise ValueError("shard_size must be >= 1 and retrieval_size >= 0")
    directory = find_fashion_mnist([data_dir] if data_dir else None)
    train_x, train_y = load_fashion_mnist("train", directory)
    test_x, test_y = load_fashion_mnist("test", directory)
    curated_size = round(0.05 * len(train_x)) if curated_size is None else curated_size
    if not 0 <= curated_size < len(train_x):
        raise ValueError(f"curated_size must be in [0, {len(train_x)}), got {curated_size}")
    remaining = len(train_x) - curated_size
    pool_size = remaining if pool_size is None else pool_size
    eval_size = len(test_x) if eval_size is None else eval_size
    if not 0 <= pool_size <= remaining:
        raise ValueError(f"pool_size must be in [0, {remaining}] (train images not curated), "
                         f"got {pool_size}")
    if not 0 <= eval_size <= len(test_x):
        raise ValueError(f"eval_size must be in [0, {len(test_x)}], got {eval_size}")
    params = {"seed": seed, "noise": noise, "pool_size": pool_size, "curated_size": curated_size,
              "eval_size": eval_size, "retrieval_size": retrieval_size, "shard_size": shard_size}
    done = _is_complete(output, params)
    if done is not None:
        return done
    _clear(output)

    # Attribute buckets are relative to the whole train set, whatever subset is built.
    train_features = captions.image_features(train_x)
    thresholds = captions.attribute_thresholds(train_features, train_y)
    train_attrs = captions.image_attributes(train_features, train_y, thresholds)
    test_attrs = captions.image_attributes(captions.image_features(test_x), test_y, thresholds)

    perm = np.random.default_rng(hashing.derive_seed(seed, "demo", "split")).permutation(
        len(train_x))
    curated_idx, pool_idx = np.sort(perm[:curated_size]), perm[curated_size:]
    eval_perm = np.random.default_rng(hashing.derive_seed(seed, "demo", "eval")).permutation(
        len(test_x))
    eval_idx = np.sort(eval_perm[:eval_size])
    retrieval_idx = _retrieval_indices(eval_idx, test_y, test_attrs, retrieval_size, seed)

    pool, noise_table, kinds = _pool(train_x, train_y, train_attrs, pool_idx, pool_size, noise,
                                     seed)
    curated = _clean_split("curated", train_x, train_y, train_attrs, curated_idx, seed,
                           file=_FILES["train"][0]).table(formats.CORPUS_SCHEMA)
    zeroshot = _clean_split("eval_zeroshot", test_x, test_y, test_attrs, eval_idx, seed,
                            file=_FILES["test"][0]).table(formats.LABELED_CORPUS_SCHEMA)
    retrieval = _clean_split("eval_retrieval", test_x, test_y, test_attrs, retrieval_idx, seed,
                             file=_FILES["test"][0], complete=True).table(
                                 formats.LABELED_CORPUS_SCHEMA)
    if len(set(retrieval.column("caption").to_pylist())) != retrieval.num_rows:
        # Distinct attribute tuples render to distinct words; this guards the vocabulary.
        raise RuntimeError("retrieval captions are not unique: synonyms overlap across buckets")

    def j(*parts):
        return formats.join_url(output, *parts)

    shards = {
        "pool": _write_split(j("pool"), pool, formats.CORPUS_SCHEMA, shard_size),
        "ground_truth/noise": _write_split(j("ground_truth/noise"), noise_table,
                                           formats.NOISE_SCHEMA, shard_size),
        "curated": _write_split(j("curated"), curated, formats.CORPUS_SCHEMA, shard_size),
        "eval/zeroshot": _write_split(j("eval/zeroshot"), zeroshot, formats.LABELED_CORPUS_SCHEMA,
                                      shard_size),
        "eval/retrieval": _write_split(j("eval/retrieval"), retrieval,
                                       formats.LABELED_CORPUS_SCHEMA, shard_size),
    }
    formats.write_json_atomic(j("eval/classes.json"), {
        "classnames": list(captions.CLASSNAMES), "templates": list(captions.ZEROSHOT_TEMPLATES)})
    summary = {
        "format": FORMAT, "params": params, "source": SOURCE, "license": LICENSE,
        "input_sha256": {name: formats.sha256_file(str(directory / name))
                         for pair in _FILES.values() for name in pair},
        "counts": {"pool": pool.num_rows, "curated": curated.num_rows,
                   "eval_zeroshot": zeroshot.num_rows, "eval_retrieval": retrieval.num_rows},
        "noise_kinds": {k: kinds[k] for k in captions.NOISE_KINDS},
        "noise_rate": (pool_size - kinds["clean"]) / pool_size if pool_size else 0.0,
        "caption_noise_rate": float(np.mean(noise_table.column("noisy").to_pylist()))
        if pool_size else 0.0,
        "image_formats": {fmt: pool.column("image_format").to_pylist().count(fmt)
                          for fmt in ("jpeg", "png")},
        "shards": shards,
    }
    formats.write_json_atomic(j("demo.json"), summary)
    return summary


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jest-curate demo-data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="directory URL for the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.5, help="fraction of noisy pool rows")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="rows; default: all train images not curated")
    parser.add_argument("--curated-size", type=int, default=None, help="default: 5%% of train")
    parser.add_argument("--eval-size", type=int, default=None, help="default: all 10k test images")
    parser.add_argument("--retrieval-size", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--data-dir", default=None, help="directory with the four *-ubyte.gz files")
    args = flags.parse_strict(parser, argv)[0]
    try:
        summary = build_demo_corpus(
            args.output, seed=args.seed, noise=args.noise, pool_size=args.pool_size,
            curated_size=args.curated_size, eval_size=args.eval_size,
            retrieval_size=args.retrieval_size, shard_size=args.shard_size, data_dir=args.data_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.exit(2, f"jest-curate demo-data: error: {e}\n")
    counts = ", ".join(f"{k} {summary['counts'][k]}"
                       for k in ("pool", "curated", "eval_zeroshot", "eval_retrieval"))
    kinds = ", ".join(f"{k} {summary['noise_kinds'][k]}" for k in captions.NOISE_KINDS)
    print(f"demo corpus at {args.output}: {counts}; pool noise rate "
          f"{summary['noise_rate']:.3f} ({kinds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
