"""Training data: curated WebDataset shards in written order, or seeded random batches.

Two sources, one interface: `batches(start)` yields lists of `Example`s, batch
`start` first, so a resumed run continues exactly where the interrupted one
stopped. `prepare_batch` turns a list into model inputs with the shared
preprocessing contract (`training/preprocess.py`).

* `CuratedShards`: the selection pipeline's output, `00000.tar`, `00001.tar`, ...
  plus `sizes.json`. Shards hold whole selected sub-batches in selection order, so
  reading them in name order and cutting every `batch_size` samples reproduces
  the training batches exactly. One pass; never shuffled.
* `CanonicalBatches`: a canonical parquet corpus (e.g. the curated set the
  reference model trains on), reshuffled every epoch from a seed.

Structural damage (unsafe tar members, split or incomplete samples, counts that
disagree with sizes.json) raises `DataError`. An example whose image cannot be
decoded is dropped by `prepare_batch` and reported under its reason, so every
example is accounted for.
"""
import collections
import dataclasses
import json
import posixpath
import tarfile
from typing import Callable, Iterator, List, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import torch

from jest_curate import formats, hashing
from training import preprocess

__all__ = ["DataError", "Example", "Batch", "CuratedShards", "CanonicalBatches",
           "open_source", "detect_format", "prepare_batch"]

_CORPUS_COLUMNS = ("uid", "image", "caption")


class DataError(ValueError):
    """Training data that does not follow its format."""


@dataclasses.dataclass(frozen=True)
class Example:
    uid: str
    image: bytes  # Original encoded bytes.
    caption: str


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # [n, 3, H, W] float32
    tokens: torch.Tensor  # [n, context_length] int64
    uids: list  # [n] str
    dropped: dict  # reason -> [uid, ...] of examples left out of this batch


# --------------------------------------------------------------------------- #
# Curated WebDataset shards
# --------------------------------------------------------------------------- #

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _iter_tar_samples(shard_url: str, keep: Optional[Callable[[int], bool]] = None
                      ) -> Iterator[Optional[Example]]:
    """One tar's samples in written order, each checked to be whole and contiguous; None
    for a sample `keep` (its index in the tar -> bool) leaves unread."""
    seen = set()
    try:
        for sample in formats.iter_wds_samples(shard_url, keep):
            uid = sample["uid"]
            if uid in seen:
                raise DataError(f"{shard_url}: members of sample {uid!r} are not contiguous "
                                "(or the uid repeats)")
            seen.add(uid)
            if sample.get("skipped"):
                yield None
                continue
            if "caption" not in sample or sample.get("ext") not in _IMAGE_EXTENSIONS:
                raise DataError(f"{shard_url}: sample {uid!r} is incomplete: needs an image "
                                f"({'|'.join(_IMAGE_EXTENSIONS)}) and a .txt caption")
            yield Example(uid=uid, image=sample["image"], caption=sample["caption"])
    except formats.FormatError as e:  # Unsafe members: absolute, '..', links.
        raise DataError(str(e)) from e
    except (tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{shard_url}: corrupt curated shard ({type(e).__name__}: {e})") from e


class CuratedShards:
    """Selected sub-batches as written: batch i is samples [i*b, (i+1)*b) over all shards."""

    def __init__(self, url: str, *, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url, self.batch_size = url, batch_size
        try:
            sizes = formats.read_json(formats.join_url(url, "sizes.json"))
        except FileNotFoundError:
            raise DataError(f"{url}: no sizes.json; not a curated shard directory") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{url}/sizes.json: not valid JSON ({e})") from e
        if not isinstance(sizes, dict) or not all(
                isinstance(v, int) and v >= 0 for v in sizes.values()):
            raise DataError(f"{url}/sizes.json: expected {{\"00000.tar\": count, ...}}")
        fs, path = fsspec.core.url_to_fs(url)
        names = (posixpath.basename(p) for p in fs.ls(path, detail=False))
        # "_tmp.*" files are atomic writes in flight (formats.write_bytes_atomic).
        on_disk = sorted(n for n in names if n.endswith(".tar") and not n.startswith("_"))
        if sorted(sizes) != on_disk:
            raise DataError(f"{url}: sizes.json lists {sorted(sizes)} but the directory "
                            f"holds {on_disk}")
        self.shards = [(name, sizes[name]) for name in on_disk]  # Name order = written order.
        self.num_examples = sum(n for _, n in self.shards)
        if self.num_examples % batch_size:
            raise DataError(f"{url}: {self.num_examples} samples is not a multiple of "
                            f"batch size {batch_size}; pass --batch-size with the b they "
                            "were selected with")
        self.num_batches = self.num_examples // batch_size

    def examples(self, start: int = 0, keep: Optional[Callable[[int], bool]] = None
                 ) -> Iterator[Optional[Example]]:
        """Samples from index `start` on; whole shards before it are skipped unread. With
        `keep` (a sample's index over all shards -> bool), a sample not kept is None, its
        bytes unread."""
        offset = 0
        for name, count in self.shards:
            if offset + count <= start:
                offset += count
                continue
            shard_url = formats.join_url(self.url, name)
            seen = 0
            in_tar = None if keep is None else (
                lambda i, first=offset: first + i >= start and keep(first + i))
            for example in _iter_tar_samples(shard_url, in_tar):
                if offset + seen >= start:
                    yield example
                seen += 1
            if seen != count:
                raise DataError(f"{shard_url}: holds {seen} samples, sizes.json says {count}")
            offset += count

    def batches(self, start: int = 0, keep: Optional[Callable[[int, int], bool]] = None
                ) -> Iterator[List[Optional[Example]]]:
        """Global batches from batch `start` on. With `keep` (batch index, position in
        it -> bool), the examples not kept are None and their bytes are not read."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start batch {start} outside [0, {self.num_batches}]")
        b = self.batch_size
        chunk = []
        for example in self.examples(start * b, None if keep is None else (
                lambda i: keep(i // b, i % b))):
            chunk.append(example)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []


# --------------------------------------------------------------------------- #
# Canonical parquet corpus, random batches
# --------------------------------------------------------------------------- #

class CanonicalBatches:
    """Seeded random batches over a canonical corpus, reshuffled every epoch.

    Each epoch permutes the shard order, groups `window_shards` consecutive shards,
    loads a group and permutes its rows; memory stays bounded by one group. With
    `window_shards` >= the number of shards this is a uniform global shuffle. The
    last `num_examples % batch_size` examples of an epoch are left out (a different
    few each epoch), so no batch repeats an example.
    """

    def __init__(self, url: str, *, batch_size: int, seed: int, window_shards: int = 8):
        if batch_size < 1 or window_shards < 1:
            raise ValueError(f"batch_size and window_shards must be >= 1, got "
                             f"{batch_size}, {window_shards}")
        self.url, self.batch_size = url, batch_size
        self.seed, self.window_shards = seed, window_shards
        self.shards = formats.list_shards(url)
        self.num_examples = sum(s.num_rows for s in self.shards)
        if self.num_examples < batch_size:
            raise DataError(f"{url}: {self.num_examples} committed examples, fewer than one "
                            f"batch of {batch_size}")
        self.batches_per_epoch = self.num_examples // batch_size
        self.num_batches = None  # Unbounded: epochs repeat.

    def _epoch_windows(self, epoch: int):
        rng = np.random.default_rng(hashing.derive_seed(self.seed, "shard_order", epoch))
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        return [order[i:i + self.window_shards] for i in range(0, len(order),
                                                               self.window_shards)]

    def _load_window(self, shards) -> pa.Table:
        schema = pa.schema([formats.CORPUS_SCHEMA.field(c) for c in _CORPUS_COLUMNS])
        tables = [formats.read_shard(s, schema=schema, columns=_CORPUS_COLUMNS)
                  .replace_schema_metadata(None) for s in shards]
        return pa.concat_tables(tables)

    def _epoch_examples(self, epoch: int, start: int) -> Iterator[Example]:
        offset = 0
        for w, window in enumerate(self._epoch_windows(epoch)):
            rows = sum(s.num_rows for s in window)
            if offset + rows <= start:
                offset += rows
                continue
            table = self._load_window(window)
            rng = np.random.default_rng(hashing.derive_seed(self.seed, "row_order", epoch, w))
            order = rng.permutation(table.num_rows)
            # Combined arrays index in O(1); image bytes stay in Arrow until used.
            uids, images, captions = (table.column(c).combine_chunks() for c in _CORPUS_COLUMNS)
            for i in order[max(0, start - offset):]:
                yield Example(uid=uids[i].as_py(), image=images[i].as_py(),
                              caption=captions[i].as_py())
            offset += rows

    def batches(self, start: int = 0) -> Iterator[List[Example]]:
        if start < 0:
            raise ValueError(f"start batch must be >= 0, got {start}")
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            examples = self._epoch_examples(epoch, index * self.batch_size)
            for _ in range(index, self.batches_per_epoch):
                yield [next(examples) for _ in range(self.batch_size)]
            epoch, index = epoch + 1, 0


def detect_format(url: str) -> str:
    """"curated" (tar shards + sizes.json) or "canonical" (committed parquet shards)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        raise DataError(f"no training data directory at {url} (`jest-curate select` writes "
                        "curated shards to OUTPUT/shards; `ingest` or `demo-data` a corpus)")
    names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    if "sizes.json" in names or any(n.endswith(".tar") for n in names):
        return "curated"
    if formats.INDEX in names or any(n.endswith(".parquet.commit") for n in names):
        return "canonical"
    raise DataError(f"{url}: neither curated shards (*.tar + sizes.json) nor a canonical "
                    "corpus (*.parquet with commit markers)")


def open_source(url: str, *, data_format: str, batch_size: int, seed: int,
                window_shards: int = 8):
    """A CuratedShards or CanonicalBatches for `url` (`data_format` may be "auto")."""
    if data_format == "auto":
        data_format = detect_format(url)
    if data_format == "curated":
        return CuratedShards(url, batch_size=batch_size)
    if data_format == "canonical":
        return CanonicalBatches(url, batch_size=batch_size, seed=seed,
                                window_shards=window_shards)
    raise ValueError(f"data_format must be auto, curated or canonical, got {data_format!r}")


# --------------------------------------------------------------------------- #
# Model inputs
# --------------------------------------------------------------------------- #

def prepare_batch(examples: Sequence[Example], contract: formats.Preprocess) -> Batch:
    """Decode, resize and tokenize; unusable examples are dropped and reported by reason."""
    dropped = collections.defaultdict(list)
    images, captions, uids = [], [], []
    for example in examples:
        try:
            image = preprocess.decode_image(example.image)
        except preprocess.ImageDecodeError as e:
            dropped[e.reason].append(example.uid)
            continue
        images.append(image)
        captions.append(example.caption)
        uids.append(example.uid)
    size = contract.image_size
    pixels = (preprocess.preprocess_images(images, contract) if images
              else torch.zeros(0, 3, size, size))
    tokens = (preprocess.tokenize(captions, contract) if captions
              else torch.zeros(0, contract.context_length, dtype=torch.long))
    return Batch(images=pixels, tokens=tokens, uids=uids, dropped=dict(dropped))
