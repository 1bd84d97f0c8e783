"""Ingest readers: one input format -> batches of `RawExample`s, before validation.

A reader is three functions: a lister (at launch: the input's work items), a
splitter (in the pipeline: e.g. parquet files into row groups) and a reader (one
item -> lists of at most `batch_size` RawExamples); `pipelines.ingest.READERS`
maps each format to them. This module holds the shared types and the parquet and
folder readers; the tar formats live in `pipelines.tar_stream`.

    parquet      a file, a directory of *.parquet or a glob; image column of bytes (or a
                 struct with a `bytes` field, as Hugging Face datasets store images)
    folder       images with `.txt` sidecars, or a captions CSV (see `folder_work`)
    webdataset   tars of samples `key.{jpg,png,webp,...}` + `key.txt` (+ `key.json`)
    img2dataset  its output directory: NNNNN.tar as above, plus NNNNN.parquet (every
                 input row with its download status) and NNNNN_stats.json

uids (unless --uid-column names a column / .json field): the 32 hex digits of
`hashing.blake2b_fields("ingest", source, path relative to INPUT, locator)` (a
128-bit blake2b of type-tagged, length-prefixed fields), where the locator is the
row number (parquet), the image path and CSV line (folder CSV), nothing beyond the
image path (folder sidecars) or the WebDataset key (tars). The relative path keeps
repeated img2dataset keys apart; the source name keeps inputs apart. The same data
under the same source name gets the same uids on every rerun.
"""
import csv
import dataclasses
import re
from typing import Iterable, List, NamedTuple, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jest_curate import formats, hashing
from pipelines import validate

__all__ = ["ReadConfig", "RawExample", "derived_uid", "provenance", "optional_str", "relative",
           "list_files", "batches", "parquet_work", "parquet_row_groups", "read_parquet",
           "folder_probe", "folder_work", "read_folder", "whole", "IMAGE_EXTENSIONS",
           "CAPTION_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # Preferred first.
CAPTION_EXTENSIONS = ("txt", "caption", "text")
_URL_NAMES = ("url",)
_LICENSE_NAMES = ("license", "licence", "LICENSE")


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    """How to read one input."""
    input: str
    format: str
    source: str
    caption_column: str = "caption"
    image_column: str = "image"
    uid_column: Optional[str] = None
    url_column: Optional[str] = None  # Default: a `url` column / field when present.
    license_column: Optional[str] = None  # Default: `license`, `licence` or `LICENSE`.
    captions_csv: Optional[str] = None
    batch_size: int = 256
    max_member_bytes: int = validate.MAX_IMAGE_BYTES

    def __post_init__(self):
        if not validate.is_valid_uid(self.source):
            raise ValueError(f"source {self.source!r}: use 1-128 of [A-Za-z0-9_-]")
        if self.batch_size < 1 or self.max_member_bytes < 1:
            raise ValueError("batch size and max member bytes must be >= 1")


@dataclasses.dataclass
class RawExample:
    """One candidate example as a reader found it, before validation."""
    source_location: str
    uid: Optional[str] = None
    image: Optional[bytes] = None
    caption: object = None  # str | bytes | None
    url: Optional[str] = None
    license: Optional[str] = None
    rejection: Optional[validate.Rejection] = None  # Set by the reader (e.g. missing file).


def derived_uid(source: str, *where) -> str:
    return hashing.blake2b_fields("ingest", source, *where).hex()


def optional_str(value) -> Optional[str]:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def provenance(names, cfg: ReadConfig) -> dict:
    """{"uid"|"url"|"license": column name or None} among the input's `names`."""
    def pick(explicit, defaults):
        if explicit:
            return explicit
        return next((n for n in defaults if n in names), None)
    return {"uid": cfg.uid_column, "url": pick(cfg.url_column, _URL_NAMES),
            "license": pick(cfg.license_column, _LICENSE_NAMES)}


def relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]


def list_files(cfg: ReadConfig, suffixes: tuple) -> tuple:
    """(fs, root, sorted paths) of a file, a directory (recursively) or a glob."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if any(ch in cfg.input for ch in "*?["):
        paths, root = fs.glob(root), re.split(r"[*?\[]", root)[0].rsplit("/", 1)[0]
    elif fs.isdir(root):
        paths = [p for p in fs.find(root) if p.endswith(suffixes)
                 and not p.rsplit("/", 1)[-1].startswith(("_", "."))]
    else:
        paths, root = ([root] if fs.exists(root) else []), root.rsplit("/", 1)[0]
    return fs, root, sorted(paths)


def batches(examples: Iterable[RawExample], size: int) -> Iterable[List[RawExample]]:
    batch = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- #
# parquet
# --------------------------------------------------------------------------- #

def parquet_work(cfg: ReadConfig) -> list:
    """[(file url, path relative to INPUT)], checking the first file's columns."""
    fs, root, paths = list_files(cfg, (".parquet",))
    if not paths:
        raise FileNotFoundError(f"no parquet files at {cfg.input}")
    with fs.open(paths[0], "rb") as f:
        names = pq.read_schema(f).names
    missing = [c for c in (cfg.image_column, cfg.caption_column, cfg.uid_column,
                           cfg.url_column, cfg.license_column) if c and c not in names]
    if missing:
        raise ValueError(f"{paths[0]}: no column(s) {missing}; it has {names}. "
                         "Set --image-column/--caption-column/... to match.")
    return [(fs.unstrip_protocol(p), relative(p, root)) for p in paths]


def parquet_row_groups(item, cfg: ReadConfig) -> Iterable:
    """(url, rel) -> (url, rel, row group, first row, rows) so large files read in parallel."""
    url, rel = item
    try:
        with fsspec.open(url, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as e:
        yield url, rel, -1, f"{type(e).__name__}: {e}", 0
        return
    first = 0
    for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        yield url, rel, rg, first, rows
        first += rows


def _image_values(column: pa.Array) -> list:
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise formats.FormatError(f"image column has type {column.type}; expected binary or "
                                  "a struct with a 'bytes' field")
    return column.to_pylist()


def _parquet_examples(batch: pa.RecordBatch, first: int, url: str, rel: str, cfg: ReadConfig,
                      columns: dict) -> List[RawExample]:
    images = _image_values(batch.column(cfg.image_column))
    captions = batch.column(cfg.caption_column).to_pylist()
    values = {k: batch.column(c).to_pylist() if c else [None] * batch.num_rows
              for k, c in columns.items()}
    return [RawExample(f"{url}#row={first + i}", image=images[i], caption=captions[i],
                       uid=(optional_str(values["uid"][i]) if cfg.uid_column
                            else derived_uid(cfg.source, rel, first + i)),
                       url=optional_str(values["url"][i]),
                       license=optional_str(values["license"][i]))
            for i in range(batch.num_rows)]


def read_parquet(item, cfg: ReadConfig) -> Iterable[List[RawExample]]:
    url, rel, rg, first, num_rows = item
    if rg < 0:  # The file's footer could not be read (`first` holds the error): one letter.
        yield [RawExample(url, rejection=validate.Rejection("unreadable_input", first))]
        return
    row, end = first, first + num_rows
    try:
        with fsspec.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            columns = provenance(names, cfg)
            wanted = [cfg.image_column, cfg.caption_column] + [c for c in columns.values() if c]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise formats.FormatError(f"no column(s) {missing}; it has {names}")
            for batch in pf.iter_batches(batch_size=cfg.batch_size, row_groups=[rg],
                                         columns=list(dict.fromkeys(wanted))):
                examples = _parquet_examples(batch, row, url, rel, cfg, columns)
                row += batch.num_rows
                yield examples
    except formats.FormatError as e:  # This file does not match the others.
        rejection = validate.Rejection("schema_mismatch", str(e))
        yield [RawExample(f"{url}#row={r}", rejection=rejection) for r in range(row, end)]
    except (pa.ArrowInvalid, OSError) as e:  # Corrupt pages: the rest of the group is lost.
        rejection = validate.Rejection("unreadable_input",
                                       f"row group {rg}: {type(e).__name__}: {e}")
        yield [RawExample(f"{url}#row={r}", rejection=rejection) for r in range(row, end)]


# --------------------------------------------------------------------------- #
# folder
# --------------------------------------------------------------------------- #

def _read_csv(url: str) -> list:
    with fsspec.open(url, "r", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


class _FolderItem(NamedTuple):
    image_url: Optional[str]  # None: the caption names a file that does not exist.
    rel: str  # Image path relative to INPUT.
    where: str  # source_location: the image, the orphan sidecar, or the CSV line.
    caption: Optional[str] = None  # From the CSV.
    sidecar_url: Optional[str] = None
    csv_row: Optional[dict] = None  # Raw CSV row for uid / url / license columns.
    csv_line: Optional[int] = None


def folder_probe(cfg: ReadConfig) -> None:
    """At launch: the folder exists and its captions CSV has the columns asked for
    (the images themselves are listed on a worker)."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no folder at {cfg.input}")
    csv_url = cfg.captions_csv
    if csv_url is None and fs.exists(f"{root}/captions.csv"):
        csv_url = fs.unstrip_protocol(f"{root}/captions.csv")
    if csv_url is not None:
        with fsspec.open(csv_url, "r", encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        for c in (cfg.image_column, cfg.caption_column, cfg.uid_column, cfg.url_column,
                  cfg.license_column):
            if header and c and c not in header:
                raise ValueError(f"{csv_url}: no column {c!r}; it has {header}")


def folder_work(cfg: ReadConfig) -> list:
    """Chunks of `_FolderItem`s: images with their caption, orphan sidecars and CSV rows.

    Captions come from a CSV (--captions-csv, default INPUT/captions.csv if present)
    whose --image-column holds paths relative to INPUT, else from `.txt` sidecars.
    """
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no folder at {cfg.input}")
    files = sorted(fs.find(root))
    images = {p for p in files if p.lower().endswith(tuple("." + e for e in IMAGE_EXTENSIONS))}
    url = fs.unstrip_protocol
    csv_url = cfg.captions_csv
    if csv_url is None and fs.exists(f"{root}/captions.csv"):
        csv_url = url(f"{root}/captions.csv")
    items, referenced = [], set()
    if csv_url is not None:
        rows = _read_csv(csv_url)
        header = list(rows[0]) if rows else []
        for c in (cfg.image_column, cfg.caption_column, cfg.uid_column, cfg.url_column,
                  cfg.license_column):
            if rows and c and c not in header:
                raise ValueError(f"{csv_url}: no column {c!r}; it has {header}")
        for line, row in enumerate(rows, start=2):  # Line 1 is the header.
            path = f"{root}/{(row.get(cfg.image_column) or '').strip().lstrip('/')}"
            referenced.add(path)
            found = path in images or fs.isfile(path)  # Any file: validation says what is wrong.
            items.append(_FolderItem(url(path) if found else None, relative(path, root),
                                     f"{csv_url}:{line}", caption=row.get(cfg.caption_column),
                                     csv_row=row, csv_line=line))
    else:
        sidecars = {p[:-len(".txt")] for p in files if p.endswith(".txt")}
        for path in sorted(images):
            stem = path.rsplit(".", 1)[0]
            referenced.add(path)
            items.append(_FolderItem(url(path), relative(path, root), url(path),
                                     sidecar_url=url(stem + ".txt") if stem in sidecars else None))
        for stem in sorted(sidecars - {p.rsplit(".", 1)[0] for p in images}):
            items.append(_FolderItem(None, relative(stem, root), url(stem + ".txt"),
                                     sidecar_url=url(stem + ".txt")))
    for path in sorted(images - referenced):  # Images the CSV never mentions have no caption.
        items.append(_FolderItem(url(path), relative(path, root), url(path)))
    return [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]


def read_folder(chunk: List[_FolderItem], cfg: ReadConfig) -> Iterable[List[RawExample]]:
    examples = []
    for item in chunk:
        row = item.csv_row or {}
        columns = provenance(row, cfg)
        where = (item.rel,) if item.csv_line is None else (item.rel, item.csv_line)
        ex = RawExample(item.where, caption=item.caption,
                        uid=row.get(cfg.uid_column) if cfg.uid_column else derived_uid(
                            cfg.source, *where),
                        url=row.get(columns["url"]) or None if columns["url"] else None,
                        license=row.get(columns["license"]) or None if columns["license"]
                        else None)
        if item.image_url is None:
            ex.rejection = validate.Rejection("missing_image", f"no image file for {item.rel}")
        elif item.sidecar_url is None and item.csv_line is None:
            ex.rejection = validate.Rejection("missing_caption",
                                              f"no .txt sidecar or CSV row for {item.rel}")
        else:
            try:
                with fsspec.open(item.image_url, "rb") as f:
                    ex.image = f.read(cfg.max_member_bytes + 1)  # Validation refuses more.
                if item.sidecar_url is not None:
                    with fsspec.open(item.sidecar_url, "rb") as f:
                        ex.caption = f.read()
            except FileNotFoundError as e:  # Deleted between listing and reading.
                ex.rejection = validate.Rejection("missing_image", f"disappeared: {e}")
        examples.append(ex)
    yield examples


def whole(item, cfg: ReadConfig) -> Iterable:
    yield item
