"""Every on-disk schema of jest-curate, with small typed readers and writers.

One module owns the formats so that ingest, scoring, selection, training and
reports cannot drift apart. Paths are fsspec URLs (local paths, file://, gs://).

Sharded parquet datasets (corpus, embeddings, manifests) share one layout:

    ROOT/<shard_id>.parquet          the data, written to a temp name then moved
    ROOT/<shard_id>.parquet.commit   JSON commit marker written after the data

    ROOT/<shard_id>.drop.parquet     optional: rows of the file that readers skip
    ROOT/_index.json                 the dataset's one index, written once at commit

Readers only see shards whose marker exists and whose row count matches, so a
crashed or in-flight writer never exposes a half-written shard. A dataset with an
index is read through it alone (one object, however many shards): it lists every
shard's rows and sha256, and its drop list if any (see `write_index`).
"""
import dataclasses
import io
import json
import re
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jest_curate import hashing

__all__ = [
    "CORPUS_SCHEMA", "LABELED_CORPUS_SCHEMA", "NOISE_SCHEMA", "MANIFEST_SCHEMA",
    "DEAD_LETTER_SCHEMA", "INGEST_KEYS_SCHEMA", "embeddings_schema",
    "ShardInfo", "write_shard", "list_shards", "committed_shard", "remove_shard",
    "read_shard", "iter_shard_batches", "scan_shards", "INDEX", "INCOMPLETE", "write_index",
    "read_index", "remove_index", "write_drop_list", "dropped_rows", "DROP_SCHEMA",
    "mark_incomplete", "clear_incomplete",
    "Embeddings", "write_embeddings_shard", "read_embeddings_shard",
    "Preprocess", "ModelCard", "write_model_card", "read_model_card",
    "Checkpoint", "save_checkpoint", "load_checkpoint", "CheckpointError",
    "write_json_atomic", "read_json", "write_bytes_atomic", "sha256_file",
    "join_url", "FormatError", "CANDIDATE_SCHEMA", "CARRIED_SCHEMA", "ROUND_MANIFEST_SCHEMA",
    "LayoutSpec", "CandidateShard", "Layout", "write_layout", "read_layout",
    "read_shard_bytes", "read_row_groups", "ShardsById", "remove_tree",
]


class FormatError(ValueError):
    """A file exists but does not follow the schema it claims."""


# --------------------------------------------------------------------------- #
# Schemas
# --------------------------------------------------------------------------- #

CORPUS_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # Original encoded bytes.
    pa.field("image_format", pa.string(), nullable=False),  # jpeg | png | webp
    pa.field("caption", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # Input name given at ingest.
    pa.field("source_location", pa.string(), nullable=False),  # e.g. tar URL + member
    pa.field("url", pa.string()),  # Provenance, when the input has it.
    pa.field("license", pa.string()),
], metadata={"jest.schema": "corpus/v1"})

# Evaluation splits: a corpus plus the integer class of every image.
LABELED_CORPUS_SCHEMA = pa.schema(
    list(CORPUS_SCHEMA) + [pa.field("label", pa.int32(), nullable=False)],
    metadata={"jest.schema": "labeled_corpus/v1"})

# Ground truth about the demo pool's captions. Reports read it; selection never does.
# `noise_kind` says how the row was made (clean, wrong_item, boilerplate, off_topic,
# exact_duplicate, near_duplicate); `caption_kind` what its caption is (clean, wrong_item,
# boilerplate, off_topic), so a duplicate with a clean caption is not caption noise.
NOISE_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("noisy", pa.bool_(), nullable=False),  # The caption does not describe the image.
    pa.field("noise_kind", pa.string(), nullable=False),
    pa.field("caption_kind", pa.string(), nullable=False),
], metadata={"jest.schema": "noise/v2"})

# One row per example per round: what selection decided and why.
MANIFEST_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("super_batch", pa.int64()),  # Null for dead letters.
    pa.field("selected", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # selected|rejected|carried|dead_letter:*
    pa.field("chunk", pa.int32()),  # Null unless selected.
    pa.field("position", pa.int32()),  # Order within the sub-batch; null unless selected.
    pa.field("score", pa.float32()),  # Conditional logit when drawn; null unless selected.
    pa.field("learner_loss", pa.float32()),  # Diagonal SigLIP losses (null if unused).
    pa.field("reference_loss", pa.float32()),
], metadata={"jest.schema": "manifest/v1"})

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("uid", pa.string()),  # Null when no uid could be formed.
    pa.field("reason", pa.string(), nullable=False),  # Short machine-readable code.
    pa.field("detail", pa.string()),  # Human-readable explanation.
    pa.field("source_location", pa.string()),
], metadata={"jest.schema": "dead_letter/v1"})


# Ingest's dedup keys of each corpus shard (ROOT/_keys/<shard>.parquet, rows aligned with
# the shard's file): what appends dedup against, without reading images again.
INGEST_KEYS_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_location", pa.string(), nullable=False),
    pa.field("image_key", pa.string(), nullable=False),  # blake2b of the image bytes
    pa.field("caption_key", pa.string(), nullable=False),  # blake2b of the clean caption
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),  # Row in the shard's file.
], metadata={"jest.schema": "ingest_keys/v1"})


def embeddings_schema(dim: int) -> pa.Schema:
    """uid plus fp16, L2-normalised image and text embeddings of width `dim`."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    vec = pa.list_(pa.float16(), dim)
    return pa.schema([
        pa.field("uid", pa.string(), nullable=False),
        pa.field("image_embedding", vec, nullable=False),
        pa.field("text_embedding", vec, nullable=False),
    ], metadata={"jest.schema": "embeddings/v1"})


def _validate_schema(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Names and types must match exactly; nullability is checked on the data."""
    got = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in schema]
    if got != want:
        raise FormatError(f"{what}: schema mismatch.\n  expected {want}\n  got      {got}")
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise FormatError(f"{what}: column {field.name!r} has nulls but is required")


# --------------------------------------------------------------------------- #
# URLs and atomic writes
# --------------------------------------------------------------------------- #

def join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def _fs(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


_ATOMIC_UPLOAD_PROTOCOLS = {"gs", "gcs", "s3", "s3a"}


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a unique temp name beside `url`, then move it into place.

    A reader sees either the old object or the whole new one. Object stores
    publish an object only when its upload completes, so there the data is
    written in place: a move would be a second full copy (and GCS emulators
    lack the moveTo call gcsfs tries first).
    """
    fs, path = _fs(url)
    if _ATOMIC_UPLOAD_PROTOCOLS.intersection(
            [fs.protocol] if isinstance(fs.protocol, str) else fs.protocol):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/_tmp.{uuid.uuid4().hex}.{path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def sha256_file(url: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Sharded parquet datasets
# --------------------------------------------------------------------------- #

_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MARKER = ".commit"
_DROP = ".drop.parquet"
INDEX = "_index.json"
INDEX_FORMAT = "jest-curate/index/v1"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    url: str  # The .parquet file.
    num_rows: int  # Rows readers get (the file's rows less its drop list).
    sha256: str  # Of the parquet file's bytes.
    schema_name: str
    file_rows: Optional[int] = None  # Rows in the file, when a drop list removes some.
    drop_sha256: Optional[str] = None  # Of `drop_url`, when the shard has a drop list.

    @property
    def drop_url(self) -> Optional[str]:
        return self.url[:-len(".parquet")] + _DROP if self.drop_sha256 else None

    @property
    def rows_in_file(self) -> int:
        return self.num_rows if self.file_rows is None else self.file_rows

    @property
    def version(self) -> str:
        """Identifies the rows readers get: the file's sha256, with its drop list's if any."""
        if not self.drop_sha256:
            return self.sha256
        return hashing.blake2b_fields("shard", self.sha256, self.drop_sha256, digest_size=32).hex()


def _table_to_parquet_bytes(table: pa.Table, metadata: Optional[dict],
                            row_group_size: int = 4096) -> bytes:
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    sink = io.BytesIO()
    # Fixed writer settings so equal tables give byte-identical files.
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size,
                   write_statistics=False, store_schema=True)
    return sink.getvalue()


def write_shard(root: str, shard_id: str, table: pa.Table, *, schema: pa.Schema,
                metadata: Optional[dict] = None, row_group_size: int = 4096) -> ShardInfo:
    """Write one shard of a sharded dataset atomically, then its commit marker."""
    if not _SHARD_ID.match(shard_id):
        raise ValueError(f"invalid shard id {shard_id!r}: use letters, digits, '_', '-', '.'")
    missing = sorted(set(schema.names) - set(table.schema.names))
    if missing:
        raise FormatError(f"shard {shard_id}: missing columns {missing}")
    table = table.select(schema.names)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise FormatError(f"shard {shard_id}: column {field.name!r} has nulls but is required")
    try:  # Safe casts only (all-null -> string, int64 -> int32 without overflow).
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise FormatError(f"shard {shard_id}: cannot store as {schema.names}: {e}") from e
    data = _table_to_parquet_bytes(table, metadata, row_group_size)
    url = join_url(root, f"{shard_id}.parquet")
    write_bytes_atomic(url, data)
    info = ShardInfo(shard_id=shard_id, url=url, num_rows=table.num_rows,
                     sha256=hashing.sha256_bytes(data),
                     schema_name=(schema.metadata or {}).get(b"jest.schema", b"").decode())
    write_json_atomic(url + _MARKER, {
        "shard_id": shard_id, "num_rows": info.num_rows, "sha256": info.sha256,
        "schema": info.schema_name})
    return info


# Present while a writer fills a whole dataset (ingest); removed once it has finished.
# Its committed shards are then only part of the dataset, so readers refuse it.
INCOMPLETE = "_INCOMPLETE"


def mark_incomplete(root: str, writer: str) -> None:
    write_json_atomic(join_url(root, INCOMPLETE), {"writer": writer})


def clear_incomplete(root: str) -> None:
    fs, path = _fs(join_url(root, INCOMPLETE))
    if fs.exists(path):
        fs.rm(path)


def _refuse_incomplete(root: str, incomplete: Optional[bool] = None) -> None:
    if incomplete is None:
        incomplete = exists(join_url(root, INCOMPLETE))
    if incomplete:
        try:
            writer = read_json(join_url(root, INCOMPLETE)).get("writer", "its writer")
        except FileNotFoundError:  # Finished since.
            return
        raise FormatError(f"{root}: {writer} did not finish writing this dataset (it holds "
                          f"{INCOMPLETE}), so its shards are only part of it; rerun {writer}")


def list_shards(root: str, *, allow_incomplete: bool = False) -> list:
    """The shards of the dataset at `root`, sorted by shard id.

    A dataset with an index (`INDEX`) is read from it alone: one object, whatever the
    number of shards. One without (written shard by shard with `write_shard` and never
    committed as a whole) is listed from its commit markers (`scan_shards`). Raises
    FormatError if a writer has not finished the dataset (see INCOMPLETE), unless
    `allow_incomplete` (the writer itself, which then gets `scan_shards`).
    """
    if allow_incomplete:
        return scan_shards(root, allow_incomplete=True)
    try:
        index = read_index(root)
    except FileNotFoundError:
        return scan_shards(root)
    _refuse_incomplete(root)
    return index


def scan_shards(root: str, *, allow_incomplete: bool = False) -> list:
    """Committed shards under `root` from their markers (one read per shard), sorted by id.

    What a writer finds it has written; readers use `list_shards`. Uncommitted files
    are ignored.
    """
    fs, path = _fs(root)
    if not fs.exists(path):
        raise FileNotFoundError(f"no dataset at {root} (a corpus comes from `jest-curate ingest` "
                                "or `demo-data`, embeddings from `jest-curate embed`)")
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    names = sorted(fs.ls(path, detail=False))
    if not allow_incomplete:
        _refuse_incomplete(root, any(n.rsplit("/", 1)[-1] == INCOMPLETE for n in names))
    infos = []
    for name in names:
        # A marker being written is `_tmp.<hex>.<id>.parquet.commit`; ids never start with '_'.
        if not name.endswith(".parquet" + _MARKER) or name.rsplit("/", 1)[-1].startswith("_"):
            continue
        marker_url = protocol + name if protocol else name
        m = read_json(marker_url)
        infos.append(ShardInfo(shard_id=m["shard_id"], url=marker_url[:-len(_MARKER)],
                               num_rows=int(m["num_rows"]), sha256=m["sha256"],
                               schema_name=m.get("schema", "")))
    return sorted(infos, key=lambda i: i.shard_id)


# --------------------------------------------------------------------------- #
# The dataset index: one object listing every shard, written once at commit
# --------------------------------------------------------------------------- #
#   ROOT/_index.json  {"format": INDEX_FORMAT, "writer": ..., "num_shards", "num_rows",
#                      "shards": [{"id", "rows", "sha256"[, "file_rows", "drop_sha256"]
#                                  [, any fields the writer adds, e.g. "source", "input"]}]}
# Shard entries hold ids, never URLs, so equal datasets at two places have equal indexes.

DROP_SCHEMA = pa.schema([
    pa.field("row", pa.int64(), nullable=False),  # Row number in the shard's file.
    pa.field("uid", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
], metadata={"jest.schema": "drop/v1"})


def write_drop_list(shard: ShardInfo, rows: pa.Table) -> ShardInfo:
    """Write `<shard>.drop.parquet` (DROP_SCHEMA rows: file rows readers must skip) and
    return the ShardInfo that reads the shard without them (for `write_index`).

    The shard's own file and marker are left untouched; the drop list takes effect
    when the index naming it is written.
    """
    rows = rows.select(DROP_SCHEMA.names).cast(DROP_SCHEMA).sort_by("row")
    numbers = rows.column("row").to_numpy()
    if len(np.unique(numbers)) != len(numbers) or (len(numbers) and (
            numbers[0] < 0 or numbers[-1] >= shard.rows_in_file)):
        raise ValueError(f"shard {shard.shard_id}: drop rows must be distinct and within its "
                         f"{shard.rows_in_file} rows")
    data = _table_to_parquet_bytes(rows, None)
    url = shard.url[:-len(".parquet")] + _DROP
    write_bytes_atomic(url, data)
    return dataclasses.replace(shard, num_rows=shard.rows_in_file - rows.num_rows,
                               file_rows=shard.rows_in_file,
                               drop_sha256=hashing.sha256_bytes(data))


def dropped_rows(shard: "ShardInfo | str") -> Optional[np.ndarray]:
    """Sorted file rows the shard's drop list removes (None: no drop list)."""
    if not isinstance(shard, ShardInfo) or not shard.drop_sha256:
        return None
    with fsspec.open(shard.drop_url, "rb") as f:
        data = f.read()
    if hashing.sha256_bytes(data) != shard.drop_sha256:
        raise FormatError(f"{shard.drop_url}: bytes do not match the sha256 in the index")
    return np.sort(pq.read_table(pa.BufferReader(data), columns=["row"])
                   .column("row").to_numpy())


def _keep_mask(dropped: np.ndarray, start: int, n: int) -> Optional[pa.Array]:
    lo, hi = np.searchsorted(dropped, [start, start + n])
    if lo == hi:
        return None
    mask = np.ones(n, dtype=bool)
    mask[dropped[lo:hi] - start] = False
    return pa.array(mask)


def write_index(root: str, shards: Sequence[ShardInfo], *, writer: str,
                fields: Optional[dict] = None) -> dict:
    """Commit the dataset at `root`: one index listing `shards` (their rows, sha256s and
    drop lists); `fields` maps a shard id to extra JSON fields for its entry. Written in
    one atomic put (none if the index already holds exactly this); returns the document."""
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{root}: shard ids repeat in the index")
    entries = []
    for s in sorted(shards, key=lambda s: s.shard_id):
        entry = {**(fields or {}).get(s.shard_id, {}), "id": s.shard_id, "rows": s.num_rows,
                 "sha256": s.sha256}
        if s.schema_name:
            entry["schema"] = s.schema_name
        if s.drop_sha256:
            entry.update(file_rows=s.rows_in_file, drop_sha256=s.drop_sha256)
        entries.append(entry)
    doc = {"format": INDEX_FORMAT, "writer": writer, "num_shards": len(entries),
           "num_rows": sum(e["rows"] for e in entries), "shards": entries}
    data = (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
    url = join_url(root, INDEX)
    try:  # An unchanged dataset keeps its index untouched (a rerun writes nothing).
        with fsspec.open(url, "rb") as f:
            if f.read() == data:
                return doc
    except FileNotFoundError:
        pass
    write_bytes_atomic(url, data)
    return doc


def read_index(root: str, *, with_doc: bool = False):
    """The shards the index of `root` lists (FileNotFoundError if it has none)."""
    url = join_url(root, INDEX)
    try:
        doc = read_json(url)
    except json.JSONDecodeError as e:
        raise FormatError(f"{url}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise FormatError(f"{url}: not a {INDEX_FORMAT} index")
    try:
        infos = [ShardInfo(shard_id=e["id"], url=join_url(root, f"{e['id']}.parquet"),
                           num_rows=int(e["rows"]), sha256=e["sha256"],
                           schema_name=e.get("schema", ""), file_rows=e.get("file_rows"),
                           drop_sha256=e.get("drop_sha256")) for e in doc["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{url}: malformed shard entry ({e!r})") from e
    infos.sort(key=lambda i: i.shard_id)
    return (infos, doc) if with_doc else infos


def remove_index(root: str) -> None:
    """Uncommit the dataset as a whole (its shards' own markers stay)."""
    fs, path = _fs(join_url(root, INDEX))
    if fs.exists(path):
        fs.rm(path)


class ShardsById:
    """A dataset's shards by id, read from its index once (e.g. once per worker process,
    through Beam's `shared.Shared`, which needs an object, not a dict)."""

    def __init__(self, root: str):
        self.by_id = {s.shard_id: s for s in list_shards(root)}


def remove_tree(url: str) -> None:
    """Delete a file or a directory and everything under it, if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def committed_shard(root: str, shard_id: str) -> Optional[ShardInfo]:
    """The committed shard `shard_id` under `root`, or None if there is none."""
    marker_url = join_url(root, f"{shard_id}.parquet{_MARKER}")
    try:
        m = read_json(marker_url)
    except FileNotFoundError:
        return None
    return ShardInfo(shard_id=m["shard_id"], url=marker_url[:-len(_MARKER)],
                     num_rows=int(m["num_rows"]), sha256=m["sha256"],
                     schema_name=m.get("schema", ""))


def remove_shard(root: str, shard_id: str) -> None:
    """Uncommit (its index entry, its marker), then delete, one shard (readers stop seeing
    it at the first step)."""
    try:
        doc = read_json(join_url(root, INDEX))
    except FileNotFoundError:
        doc = None
    if doc is not None and any(e["id"] == shard_id for e in doc["shards"]):
        kept = [e for e in doc["shards"] if e["id"] != shard_id]
        doc.update(shards=kept, num_shards=len(kept), num_rows=sum(e["rows"] for e in kept))
        write_bytes_atomic(join_url(root, INDEX),
                           (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode())
    fs, path = _fs(join_url(root, f"{shard_id}.parquet"))
    for p in (path + _MARKER, path, path[:-len(".parquet")] + _DROP):
        if fs.exists(p):
            fs.rm(p)


def read_shard(shard: "ShardInfo | str", *, schema: Optional[pa.Schema] = None,
               columns: Optional[Sequence[str]] = None, verify_sha256: bool = False) -> pa.Table:
    """Read a whole shard, checking its schema and committed row count.

    `verify_sha256` (needs a ShardInfo) also checks the file's bytes against its commit
    marker: parquet has no checksums, and most flipped bits decode to wrong values.
    """
    url = shard.url if isinstance(shard, ShardInfo) else shard
    if verify_sha256 and not isinstance(shard, ShardInfo):
        raise ValueError(f"{url}: verify_sha256 needs the shard's ShardInfo (commit marker)")
    try:
        with fsspec.open(url, "rb") as f:
            if verify_sha256:
                data = f.read()
                if hashing.sha256_bytes(data) != shard.sha256:
                    raise FormatError(f"{url}: bytes do not match the sha256 in its commit "
                                      "marker (corrupted or replaced after it was written)")
                f = pa.BufferReader(data)
            table = pq.read_table(f, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FormatError(f"{url}: not a readable parquet file ({e})") from e
    if isinstance(shard, ShardInfo) and table.num_rows != shard.rows_in_file:
        raise FormatError(f"{url}: has {table.num_rows} rows, its commit marker says "
                          f"{shard.rows_in_file}")
    dropped = dropped_rows(shard)
    if dropped is not None:
        mask = _keep_mask(dropped, 0, table.num_rows)
        table = table if mask is None else table.filter(mask)
    if schema is not None:
        want = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        _validate_schema(table.replace_schema_metadata(None), want, url)
    return table


def iter_shard_batches(shard: "ShardInfo | str", *, batch_size: int,
                       columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
    """Stream a shard as record batches of at most `batch_size` rows, in row order
    (without the rows of its drop list, if it has one)."""
    url = shard.url if isinstance(shard, ShardInfo) else shard
    dropped = dropped_rows(shard)
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        start = 0
        for batch in pf.iter_batches(batch_size=batch_size,
                                     columns=list(columns) if columns else None):
            n, mask = batch.num_rows, None
            if dropped is not None:
                mask = _keep_mask(dropped, start, n)
            start += n
            if mask is None:
                yield batch
            elif (kept := batch.filter(mask)).num_rows:
                yield kept


def shard_metadata(shard: "ShardInfo | str") -> dict:
    """The key/value metadata a shard was written with (str -> str)."""
    url = shard.url if isinstance(shard, ShardInfo) else shard
    with fsspec.open(url, "rb") as f:
        md = pq.read_schema(f).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


# --------------------------------------------------------------------------- #
# uid sets: a slice of a corpus (one round's candidates), for embed and select --uids
# --------------------------------------------------------------------------- #

UIDS_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False)],
                        metadata={"jest.schema": "uids/v1"})


def write_uids(url: str, uids) -> None:
    """A set of uids as a one-column parquet file (sorted, so equal sets are equal bytes)."""
    table = pa.table({"uid": pa.array(sorted(uids), pa.string())}, schema=UIDS_SCHEMA)
    write_bytes_atomic(url, _table_to_parquet_bytes(table, None))


def read_uids(url: str) -> pa.Array:
    """The uids of a uid-set file: any parquet with a string `uid` column."""
    table = read_shard(url)
    if "uid" not in table.schema.names or table.schema.field("uid").type != pa.string():
        raise FormatError(f"{url}: a --uids file needs a string 'uid' column; "
                          f"has {table.schema}")
    return table.column("uid").combine_chunks()


# --------------------------------------------------------------------------- #
# Embeddings: partitioned like the corpus (same shard id, same row order)
# --------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class Embeddings:
    uids: list  # [n] str
    image: np.ndarray  # [n, d] float16, L2-normalised
    text: np.ndarray  # [n, d] float16, L2-normalised
    model_digest: str
    corpus_shard_sha256: str


def write_embeddings_shard(root: str, shard_id: str, emb: Embeddings, *,
                           metadata: Optional[dict] = None,
                           row_group_size: int = 4096) -> ShardInfo:
    """`metadata`: extra str -> str entries (e.g. what a partial run was restricted to)."""
    n, d = emb.image.shape
    if emb.text.shape != (n, d) or len(emb.uids) != n:
        raise ValueError(f"embeddings shape mismatch: {len(emb.uids)} uids, image "
                         f"{emb.image.shape}, text {emb.text.shape}")
    for name, arr in (("image", emb.image), ("text", emb.text)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} embeddings of shard {shard_id} contain NaN/inf")
    schema = embeddings_schema(d)

    def vectors(arr):
        flat = pa.array(np.ascontiguousarray(arr, dtype=np.float16).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, d)

    table = pa.table([pa.array(emb.uids, pa.string()), vectors(emb.image), vectors(emb.text)],
                     schema=schema)
    return write_shard(root, shard_id, table, schema=schema, row_group_size=row_group_size,
                       metadata={**(metadata or {}), "jest.model_digest": emb.model_digest,
                                 "jest.corpus_shard_sha256": emb.corpus_shard_sha256})


def read_embeddings_shard(shard: "ShardInfo | str", *,
                          expect_model_digest: Optional[str] = None,
                          table: Optional[pa.Table] = None) -> Embeddings:
    """Read one embeddings shard; refuse NaNs and another model's embeddings.

    Given a ShardInfo (from `committed_shard`/`list_shards`), the bytes are also checked
    against the commit marker's sha256. `table`: rows of the shard already read (e.g.
    some row groups of a layout's sidecar, `read_shard_bytes`), checked the same way.
    """
    url = shard.url if isinstance(shard, ShardInfo) else shard
    if table is None:
        table = read_shard(shard, verify_sha256=isinstance(shard, ShardInfo))
    md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if md.get("jest.schema") != "embeddings/v1":
        raise FormatError(f"{url}: not an embeddings shard (schema {md.get('jest.schema')!r})")
    digest = md.get("jest.model_digest", "")
    if expect_model_digest is not None and digest != expect_model_digest:
        raise FormatError(f"{url}: embeddings were made by model {digest[:12]!r}, "
                          f"expected {expect_model_digest[:12]!r}")
    d = table.schema.field("image_embedding").type.list_size
    _validate_schema(table.replace_schema_metadata(None), embeddings_schema(d), url)

    def matrix(col):
        flat = table.column(col).combine_chunks().flatten()
        return flat.to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, d)

    image, text = matrix("image_embedding"), matrix("text_embedding")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise FormatError(f"{url}: embeddings contain NaN or inf")
    return Embeddings(uids=table.column("uid").to_pylist(), image=image, text=text,
                      model_digest=digest,
                      corpus_shard_sha256=md.get("jest.corpus_shard_sha256", ""))


# --------------------------------------------------------------------------- #
# Candidate layouts: one pass of the pool in rank order (pipelines/layout.py)
# --------------------------------------------------------------------------- #
#   PASS/layout.json                    LayoutSpec + counts; written last (the commit)
#   PASS/candidates/<NNNNNN>.parquet    CANDIDATE_SCHEMA rows in rank order, whole
#                                       super-batches, one parquet row group each
#   PASS/candidates/_index.json         + "first_super_batch", "super_batches" per shard
#   PASS/reference/<NNNNNN>.parquet     the reference's embeddings, row-aligned with the
#                                       candidates (sidecar), + model.json and _index.json
#   PASS/carried.parquet                the pass's remainder (< S examples): CARRIED_SCHEMA
# A round is a contiguous range of super-batches, so it reads a contiguous run of
# candidate shards and nothing else.

CANDIDATE_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + [
    pa.field("corpus_shard", pa.string(), nullable=False),  # Provenance in the pool.
    pa.field("corpus_row", pa.int64(), nullable=False),
    pa.field("pass", pa.int32(), nullable=False),
    pa.field("super_batch", pa.int64(), nullable=False),
    pa.field("rank", pa.int64(), nullable=False),  # Position in the pass's permutation.
], metadata={"jest.schema": "candidates/v1"})

CARRIED_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("corpus_shard", pa.string(), nullable=False),
    pa.field("corpus_row", pa.int64(), nullable=False),
    pa.field("rank", pa.int64(), nullable=False),
], metadata={"jest.schema": "carried/v1"})

# The decisions of one round (pipelines/round_job.py): one row per candidate of the
# round's super-batches, one shard per curated tar (same name).
ROUND_MANIFEST_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [
    pa.field("pass", pa.int32(), nullable=False),
    pa.field("corpus_shard", pa.string(), nullable=False),
    pa.field("corpus_row", pa.int64(), nullable=False),
], metadata={"jest.schema": "round_manifest/v1"})

LAYOUT_FILE = "layout.json"
# Beside a round's selection: what its work measured (seconds; bytes read), which varies
# between runs, so it is kept out of stats.json and _SUCCESS.
METRICS_FILE = "metrics.json"
LAYOUT_FORMAT = "jest-curate/layout/v1"


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """What determines a pass's layout; equal specs give byte-identical layouts."""
    pool: str  # Corpus URL.
    pool_version: str  # sha256 of the corpus index (the rows the pool holds).
    reference: Optional[str]  # Embeddings root: the pool is what it embedded. None: all rows.
    reference_digest: Optional[str]  # Its model digest.
    seed: int  # The passes' seed: rank = (blake2b("pass", seed, pass, uid), uid).
    pass_index: int
    super_batch_size: int  # S.
    shard_super_batches: int  # Super-batches per candidate shard.
    keep: Optional[dict] = None  # A filter of the pool (clip-score's threshold), if any.


@dataclasses.dataclass(frozen=True)
class CandidateShard:
    info: ShardInfo
    reference: Optional[ShardInfo]  # Its sidecar, row-aligned.
    first_super_batch: int
    super_batches: int

    @property
    def stop_super_batch(self) -> int:
        return self.first_super_batch + self.super_batches


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str
    spec: LayoutSpec
    counts: dict  # pool_rows, pool, excluded_by_reason, super_batches, carried, shards
    shards: tuple  # CandidateShard, in super-batch order.

    @property
    def super_batches(self) -> int:
        return int(self.counts["super_batches"])

    def reference_card(self) -> Optional["ModelCard"]:
        return read_model_card(join_url(self.root, "reference")) if self.spec.reference else None

    def shards_between(self, first: int, stop: int) -> list:
        """The candidate shards holding super-batches [first, stop)."""
        if not 0 <= first <= stop <= self.super_batches:
            raise ValueError(f"{self.root}: super-batches [{first}, {stop}) are outside the "
                             f"pass's {self.super_batches}")
        return [s for s in self.shards
                if s.first_super_batch < stop and s.stop_super_batch > first]


def write_layout(root: str, spec: LayoutSpec, counts: dict, shards: Sequence[CandidateShard],
                 *, writer: str) -> None:
    """Commit a pass's layout: both indexes, then layout.json last."""
    write_index(join_url(root, "candidates"), [s.info for s in shards], writer=writer,
                fields={s.info.shard_id: {"first_super_batch": s.first_super_batch,
                                          "super_batches": s.super_batches} for s in shards})
    if spec.reference:
        write_index(join_url(root, "reference"), [s.reference for s in shards], writer=writer)
    write_json_atomic(join_url(root, LAYOUT_FILE), {
        "format": LAYOUT_FORMAT, "spec": dataclasses.asdict(spec), "counts": counts})


def read_layout(root: str) -> Layout:
    """A committed pass layout (FileNotFoundError if `root` has none)."""
    doc = read_json(join_url(root, LAYOUT_FILE))
    if not isinstance(doc, dict) or doc.get("format") != LAYOUT_FORMAT:
        raise FormatError(f"{join_url(root, LAYOUT_FILE)}: not a {LAYOUT_FORMAT} file")
    spec = _from_dict(LayoutSpec, doc["spec"], join_url(root, LAYOUT_FILE))
    infos, index = read_index(join_url(root, "candidates"), with_doc=True)
    extra = {e["id"]: e for e in index["shards"]}
    sidecars = ({s.shard_id: s for s in read_index(join_url(root, "reference"))}
                if spec.reference else {})
    shards = tuple(CandidateShard(
        info=i, reference=sidecars.get(i.shard_id) if spec.reference else None,
        first_super_batch=int(extra[i.shard_id]["first_super_batch"]),
        super_batches=int(extra[i.shard_id]["super_batches"])) for i in infos)
    if spec.reference and any(s.reference is None for s in shards):
        raise FormatError(f"{root}: a candidate shard has no reference sidecar")
    return Layout(root=root, spec=spec, counts=doc["counts"], shards=shards)


def table_bytes(table: pa.Table, schema: pa.Schema) -> bytes:
    """One parquet file of `schema` (fixed writer settings: equal tables, equal bytes)."""
    return _table_to_parquet_bytes(table.select(schema.names).cast(schema), None)


def layout_shard_id(index: int) -> str:
    return f"{index:06d}"


def read_shard_bytes(shard: ShardInfo) -> bytes:
    """A shard's file, checked against its sha256 (index or commit marker)."""
    with fsspec.open(shard.url, "rb") as f:
        data = f.read()
    if hashing.sha256_bytes(data) != shard.sha256:
        raise FormatError(f"{shard.url}: bytes do not match the sha256 in its index "
                          "(corrupted or replaced after it was written)")
    return data


def read_row_groups(data: bytes, groups: Sequence[int], *,
                    columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Row groups of a parquet file's bytes (a candidate shard's super-batches)."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    return pf.read_row_groups(list(groups), columns=list(columns) if columns else None)


# --------------------------------------------------------------------------- #
# model.json: what produced a set of embeddings, and how inputs were prepared
# --------------------------------------------------------------------------- #

def _from_dict(cls, data: dict, what: str):
    """Build a frozen dataclass from a dict, rejecting unknown or missing keys."""
    if not isinstance(data, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FormatError(f"{what}: unknown keys {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise FormatError(f"{what}: {e}") from e


def load_dataclass(cls, data: dict, what: str):
    """A frozen dataclass from JSON data; unknown keys are errors, not silently ignored."""
    return _from_dict(cls, data, what)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The full contract for turning an image and a caption into model inputs."""
    image_size: int
    mean: tuple
    std: tuple
    channels: int = 3  # Grayscale inputs are converted to this many channels.
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # Resize shortest side, then centre crop.
    tokenizer: str = "open_clip"  # open_clip's BPE ships inside the package.
    context_length: int = 32

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.image_size < 1 or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise FormatError(f"inconsistent preprocessing contract: {self}")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything needed to reproduce or validate a set of embeddings."""
    model_name: str
    model_cfg: dict  # open_clip model config ({"embed_dim", "vision_cfg", "text_cfg", ...}).
    checkpoint_sha256: str  # Of the checkpoint file the weights came from.
    logit_scale: float  # The multiplier t itself, i.e. exp(open_clip's logit_scale).
    logit_bias: float
    preprocess: Preprocess
    patch_dropout: float = 0.0  # Fraction of image tokens dropped at scoring time.
    precision: str = "fp32"
    flops_per_example: Optional[float] = None  # Measured forward FLOPs, both towers.

    @property
    def model_digest(self) -> str:
        """Identifies the weights and everything that changes the embeddings."""
        return hashing.blake2b_fields(
            "model", json.dumps(self.model_cfg, sort_keys=True), self.checkpoint_sha256,
            json.dumps(dataclasses.asdict(self.preprocess), sort_keys=True),
            repr(float(self.patch_dropout)), self.precision,
            # Selection reads t and b from here: an edit must not pass unnoticed.
            repr(float(self.logit_scale)), repr(float(self.logit_bias))).hex()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["preprocess"] = dataclasses.asdict(self.preprocess)
        d["model_digest"] = self.model_digest
        return d

    @classmethod
    def from_json(cls, data: dict, what: str = "model.json") -> "ModelCard":
        data = dict(data)
        claimed = data.pop("model_digest", None)
        pre = _from_dict(Preprocess, data.pop("preprocess", None), f"{what} preprocess")
        card = _from_dict(cls, {**data, "preprocess": pre}, what)
        if claimed is not None and claimed != card.model_digest:
            raise FormatError(f"{what}: model_digest {claimed[:12]} does not match its "
                              f"contents ({card.model_digest[:12]}); edited by hand?")
        return card


def write_model_card(root: str, card: ModelCard) -> None:
    write_json_atomic(join_url(root, "model.json"), card.to_json())


def read_model_card(root: str) -> ModelCard:
    url = join_url(root, "model.json")
    try:
        data = read_json(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"no model.json at {root}: not an embeddings directory "
                                f"(`jest-curate embed --output {root}` writes one)")
    except json.JSONDecodeError as e:
        raise FormatError(f"{url}: not valid JSON ({e})") from e
    return ModelCard.from_json(data, url)


# --------------------------------------------------------------------------- #
# Checkpoints: open_clip-compatible state dict + step + config
# --------------------------------------------------------------------------- #

CHECKPOINT_FORMAT = "jest-curate/checkpoint/v1"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used."""


@dataclasses.dataclass
class Checkpoint:
    state_dict: dict  # open_clip model state dict (no "module." prefixes).
    step: int
    model_cfg: Optional[dict]  # None for open_clip_train checkpoints (they don't carry it).
    model_name: Optional[str] = None
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    extra: Optional[dict] = None  # JSON-able training state (examples seen, FLOPs, RNG...).


def save_checkpoint(url: str, ckpt: Checkpoint) -> str:
    """Write atomically; returns the file's sha256."""
    import torch
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": ckpt.state_dict,
        "step": int(ckpt.step),
        "model_name": ckpt.model_name,
        # JSON text: torch.load(weights_only=True) accepts only plain containers.
        "model_cfg_json": json.dumps(ckpt.model_cfg, sort_keys=True) if ckpt.model_cfg else None,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "extra_json": json.dumps(ckpt.extra, sort_keys=True) if ckpt.extra else None,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    write_bytes_atomic(url, data)
    return hashing.sha256_bytes(data)


def load_checkpoint(url: str) -> Checkpoint:
    """Load our checkpoints or open_clip_train's `epoch_N.pt` safely.

    Only tensors and plain containers are unpickled (`weights_only=True`), so an
    arbitrary pickle is refused instead of executed.
    """
    import pickle

    import torch
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {url} (`jest-curate train` writes "
                                "OUTPUT/checkpoints/step_NNNNNNNN.pt)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{url}: refusing to load: not a plain state dict "
                              f"(weights_only load failed: {str(e).splitlines()[0]})") from e
    except Exception as e:  # Truncated/corrupt zip archives raise assorted errors.
        raise CheckpointError(f"{url}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{url}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == CHECKPOINT_FORMAT:
        state_dict, step = obj["state_dict"], int(obj["step"])
        cfg = json.loads(obj["model_cfg_json"]) if obj.get("model_cfg_json") else None
        extra = json.loads(obj["extra_json"]) if obj.get("extra_json") else None
        ckpt = Checkpoint(state_dict=state_dict, step=step, model_cfg=cfg,
                          model_name=obj.get("model_name"), optimizer=obj.get("optimizer"),
                          scheduler=obj.get("scheduler"), extra=extra)
    elif "state_dict" in obj:  # open_clip_train: {"epoch", "name", "state_dict", ...}
        sd = obj["state_dict"]
        if isinstance(sd, dict) and sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        ckpt = Checkpoint(state_dict=sd, step=int(obj.get("step", obj.get("epoch", 0)) or 0),
                          model_cfg=None, model_name=obj.get("name"))
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(state_dict=obj, step=0, model_cfg=None)  # A bare state dict.
    else:
        raise CheckpointError(f"{url}: a dict, but neither a jest-curate checkpoint nor a "
                              f"state dict (keys: {sorted(map(str, obj))[:8]})")
    if not isinstance(ckpt.state_dict, dict) or not ckpt.state_dict or not all(
            isinstance(v, torch.Tensor) for v in ckpt.state_dict.values()):
        raise CheckpointError(f"{url}: 'state_dict' is not a mapping of names to tensors")
    return ckpt


# --------------------------------------------------------------------------- #
# Run config: one validated JSON fixes a whole curation + training run
# --------------------------------------------------------------------------- #

METHODS = ("jest", "independent", "uniform", "easy-reference", "hard-learner", "clip-score")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A rounds run. Every seed is derived from `seed` and recorded in `derived_seeds`."""
    name: str
    seed: int
    method: str
    batch_size: int  # b: examples per training step (= per selected sub-batch).
    steps_per_round: int  # K sub-batches selected and trained on per round.
    rounds: int
    learner_model: str  # open_clip config name or path to a JSON config.
    reference_model: str
    filter_ratio: Optional[float] = None  # f; S = round(b / (1 - f)). Give f or S.
    super_batch_size: Optional[int] = None
    chunks: int = 16  # N
    temperature: float = 1.0  # tau
    rescore_every: int = 1  # k: the learner rescores the pool every k rounds.
    score_image_size: Optional[int] = None  # Cheap scoring: lower resolution...
    score_patch_dropout: float = 0.0  # ...and/or dropped image tokens.
    score_precision: str = "fp32"
    # Multi-resolution training (FlexiViT / Flexi-JEST): this fraction of every batch is
    # seen at train_low_res_size px by the learner (score it there: score_image_size).
    train_low_res_size: Optional[int] = None
    train_low_res_fraction: float = 0.0
    # clip-score (DataComp): keep this fraction of the pool by reference image-text
    # similarity, once, and train uniformly on it (needs filter_ratio 0: S = b).
    keep_fraction: Optional[float] = None
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.1
    train_precision: str = "auto"  # auto | fp32 | bf16
    pool: Optional[str] = None  # Canonical corpus URL the rounds draw from.
    reference_checkpoint: Optional[str] = None  # Trained on the curated set.
    # FLOPs spent training the reference (early stopping's extra steps and held-out evals
    # included); None: the reference checkpoint's own training FLOPs.
    reference_training_flops: Optional[int] = None
    eval_data: Optional[str] = None  # eval/ directory (zero-shot, retrieval).
    eval_every: int = 1  # Rounds between evaluations (the last round is always evaluated).
    eval_max_examples: Optional[int] = None  # Cap per eval split, for quick runs.
    train_processes: int = 1  # Data-parallel trainer processes (torchrun; one per GPU).
    # At most this many rows per candidate shard of a pass's layout (rounded down to a
    # divisor of K super-batches, so a round reads exactly its own shards).
    candidate_shard_rows: int = 4096
    # "offline": a round job per rescoring period selects with a stored checkpoint.
    # "online": the trainer selects every step's super-batch with its live weights (the
    # paper's JEST; no staleness), from the same layout, writing the same manifest rows.
    selection_mode: str = "offline"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} not in {METHODS}")
        if (self.filter_ratio is None) == (self.super_batch_size is None):
            raise ValueError("give exactly one of filter_ratio and super_batch_size")
        if self.filter_ratio is not None and not 0.0 <= self.filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must be in [0, 1), got {self.filter_ratio}")
        for name in ("batch_size", "steps_per_round", "rounds", "chunks", "rescore_every",
                     "eval_every", "train_processes", "candidate_shard_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.method in ("jest", "easy-reference", "hard-learner") and \
                self.chunks > self.batch_size:  # The joint methods draw in N chunks.
            raise ValueError(f"chunks ({self.chunks}) > batch_size ({self.batch_size}): every "
                             f"chunk needs at least one example")
        if self.score_precision not in ("fp32", "bf16"):
            raise ValueError(f"score_precision must be fp32 or bf16, got {self.score_precision}")
        if self.selection_mode not in ("offline", "online"):
            raise ValueError(f"selection_mode must be offline or online, got "
                             f"{self.selection_mode!r}")
        if self.selection_mode == "online" and self.rescore_every != 1:
            raise ValueError("online selection rescores every step: leave rescore_every at 1")
        if (self.train_low_res_size is None) != (self.train_low_res_fraction == 0.0) or not \
                0.0 <= self.train_low_res_fraction <= 1.0:
            raise ValueError("multi-resolution training needs both train_low_res_size and "
                             "train_low_res_fraction in (0, 1]")
        if (self.method == "clip-score") != (self.keep_fraction is not None):
            raise ValueError("keep_fraction is the clip-score method's setting: give it for "
                             "clip-score and only there")
        if self.method == "clip-score":
            if not 0.0 < self.keep_fraction <= 1.0:
                raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
            if self.resolved_super_batch_size != self.batch_size:
                raise ValueError("clip-score filters the pool once and trains uniformly on "
                                 "what it keeps: set filter_ratio 0 (super-batch = batch)")

    @property
    def resolved_super_batch_size(self) -> int:
        if self.super_batch_size is not None:
            return self.super_batch_size
        return round(self.batch_size / (1.0 - self.filter_ratio))

    def derived_seeds(self) -> dict:
        """The child seeds every stage uses, for the run's records."""
        return {stage: hashing.derive_seed(self.seed, stage)
                for stage in ("learner_init", "reference_init", "select", "train_data")}

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "derived_seeds": self.derived_seeds()}

    @classmethod
    def from_json(cls, data: dict, what: str = "run config") -> "RunConfig":
        data = dict(data)
        recorded = data.pop("derived_seeds", None)
        cfg = _from_dict(cls, data, what)
        if recorded is not None and recorded != cfg.derived_seeds():
            raise FormatError(f"{what}: recorded derived_seeds do not match seed {cfg.seed}")
        return cfg


def read_run_config(url: str) -> RunConfig:
    if not exists(url):
        raise FileNotFoundError(f"no run config at {url} (see jest_curate/configs/ for examples)")
    return RunConfig.from_json(read_json(url), url)


# --------------------------------------------------------------------------- #
# Curated WebDataset shards (what selection writes and trainers read)
# --------------------------------------------------------------------------- #
#   DIR/00000.tar, 00001.tar, ...   samples {uid}.{ext} / {uid}.txt / {uid}.json
#   DIR/sizes.json                  {"00000.tar": n, ...} as open_clip_train reads it
# Tar headers are fixed (mtime 0, root-less, mode 644) so shards are byte-identical
# across reruns. A shard is a concatenation of sample blobs plus the end-of-archive.

IMAGE_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_TAR_BLOCK = 512
# The same rule ingest enforces (pipelines/validate.py). No dots: WebDataset splits keys at
# the first '.'.
_UID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _tar_member(name: str, data: bytes) -> bytes:
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    pad = (-len(data)) % _TAR_BLOCK
    # PAX only adds an extended header for names over 100 characters.
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * pad


def encode_wds_sample(*, uid: str, image: bytes, image_format: str, caption: str,
                      metadata: dict) -> bytes:
    """The tar bytes of one sample: image, caption and JSON metadata members."""
    if not _UID.match(uid):
        raise ValueError(f"uid {uid!r} is not usable as a WebDataset key ([A-Za-z0-9_-], no dots)")
    ext = IMAGE_EXTENSIONS.get(image_format)
    if ext is None:
        raise ValueError(f"unsupported image_format {image_format!r}")
    meta = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    return (_tar_member(f"{uid}.{ext}", image) + _tar_member(f"{uid}.txt", caption.encode())
            + _tar_member(f"{uid}.json", meta))


TAR_END = b"\0" * (2 * _TAR_BLOCK)


def iter_wds_samples(url: str, keep: Optional[Callable[[int], bool]] = None
                     ) -> Iterator[dict]:
    """Stream samples of one tar in written order: {"uid", "image", "ext", "caption", "json"}.

    With `keep` (a sample's index in the tar -> bool) the tar is read with seeks, and a
    sample not kept is {"uid", "skipped": True}: its members' headers are read, their
    data is not (a training process reads only its own part of a global batch).
    Refuses absolute paths, `..` components and links instead of trusting them.
    """
    import tarfile
    with fsspec.open(url, "rb") as f, tarfile.open(
            fileobj=f, mode="r|" if keep is None else "r:") as tar:
        sample, index = None, -1
        for member in tar:
            name = member.name
            if name.startswith("/") or ".." in name.split("/") or not member.isfile():
                raise FormatError(f"{url}: refusing tar member {name!r} (absolute, '..' or "
                                  f"not a regular file)")
            key, _, ext = name.rpartition("/")[2].partition(".")
            if sample is None or sample["uid"] != key:
                if sample is not None:
                    yield sample
                index += 1
                sample = {"uid": key}
                if keep is not None and not keep(index):
                    sample["skipped"] = True
            if sample.get("skipped"):
                continue
            data = tar.extractfile(member).read()
            if ext == "txt":
                sample["caption"] = data.decode("utf-8")
            elif ext == "json":
                sample["json"] = json.loads(data)
            else:
                sample["image"], sample["ext"] = data, ext
        if sample is not None:
            yield sample
