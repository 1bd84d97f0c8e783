"""WebDataset samples out of untrusted tar files, one header at a time; tar ingest readers.

    for sample in iter_tar_samples(fileobj, max_member_bytes=..., keep=...):
        sample.key, sample.offset, sample.members  # {ext: bytes}; or sample.problem

Nothing is extracted: member names only become keys, data is read into memory
only for wanted extensions and up to `max_member_bytes`, and the file is read
front to back (skips use `seek` when the file allows it, so a remote object is
not downloaded for members we refuse).

Members group into samples as WebDataset groups them: key = the path up to the
first '.' of the file name, extension = the rest, lowercased; consecutive members
with the same key form one sample. A sample is refused whole (its `problem` set,
its data dropped) when one of its members is:

    unsafe_tar_member   an absolute path, a '..' component, a non-UTF-8 name, or not a
                        regular file (symlink, hard link, device, fifo, sparse file)
    member_too_large    larger than `max_member_bytes`
    duplicate_member    a second member with the same key and extension
    truncated_member    cut short by the end of the file

and the archive as a whole may end with

    truncated_tar       no end-of-archive marker: the last sample may be missing
                        members, so it is refused (earlier samples are complete)
    corrupt_tar         a header fails its checksum: reading stops there, and the
                        sample in progress is refused too

A problem found outside any sample (an empty or non-tar file) is reported as a
sample with key None. Directories and pax/GNU bookkeeping headers are not samples.

The `webdataset` and `img2dataset` ingest readers at the end turn samples into
`RawExample`s: image = the first member with an image extension (jpg, jpeg, png,
webp, then others validation refuses), caption = the txt/caption/text member (else
the --caption-column field of the .json), metadata = the .json object. img2dataset
shards also have NNNNN.parquet, one row per input URL: rows whose download failed
become `download_failed` dead letters, successes absent from the tar (cut off by a
truncation) `missing_from_tar`, so every URL img2dataset saw is accounted for.
"""
import dataclasses
import json
import re
import tarfile
from typing import BinaryIO, Callable, Iterable, Iterator, List, NamedTuple, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jest_curate import formats
from pipelines import ingest_readers as readers
from pipelines import validate
from pipelines.validate import Rejection

__all__ = ["TarSample", "split_key", "iter_tar_samples", "MAX_META_BYTES", "tar_work",
           "read_tar", "img2dataset_upstream"]

_BLOCK = tarfile.BLOCKSIZE
_END_BLOCK = b"\0" * _BLOCK
MAX_META_BYTES = 1 << 20  # pax / GNU long-name headers larger than this are corrupt.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_META = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


@dataclasses.dataclass
class TarSample:
    key: Optional[str]  # None for archive-level problems.
    offset: int  # Byte offset of the sample's first header.
    members: dict = dataclasses.field(default_factory=dict)  # ext -> bytes (None if not kept)
    problem: Optional[Rejection] = None

    def refuse(self, reason: str, detail: str) -> None:
        if self.problem is None:  # The first problem explains the sample.
            self.problem = Rejection(reason, detail)
        self.members = {}


def split_key(name: str):
    """(key, lowercased extension) as WebDataset splits it; a name without '.' has ext ''."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def _unsafe_name(name: str) -> Optional[str]:
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in name):  # surrogateescape'd bytes
        return "name is not UTF-8"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "'..' path component"
    return None


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _skip(f: BinaryIO, n: int) -> None:
    if n <= 0:
        return
    if f.seekable():
        f.seek(n, 1)  # Past the end is fine: the next header read comes back short.
        return
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def _pax_records(data: bytes) -> dict:
    """POSIX.1-2001 extended header records "LEN key=value\\n" -> {key: value}."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_tar_samples(f: BinaryIO, *, max_member_bytes: int,
                     keep: Optional[Callable[[str], bool]] = None) -> Iterator[TarSample]:
    """WebDataset samples of the tar stream `f`, in archive order (see module docstring).

    `keep(ext)` says whose data to read; other members are recorded with data None.
    """
    sample, offset, long_name, pax = None, 0, None, {}
    while True:
        header = _read_exact(f, _BLOCK)
        if header == _END_BLOCK:
            if sample is not None:
                yield sample
            return
        if len(header) < _BLOCK:
            detail = (f"archive ends at byte {offset} without an end-of-archive marker"
                      if header or offset else "empty file")
            if sample is None:
                sample = TarSample(None, offset)
            sample.refuse("truncated_tar", detail)
            yield sample
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            is_meta = info.type in _META
            size = info.size if is_meta else int(pax.get("size", info.size))  # pax: > 8 GiB
            if size < 0:
                raise ValueError(f"negative member size {size}")
        except (tarfile.HeaderError, ValueError) as e:
            if sample is None:
                sample = TarSample(None, offset)
            sample.refuse("corrupt_tar", f"bad header at byte {offset}: {e}")
            yield sample
            return
        padded = size + (-size) % _BLOCK
        member_offset, offset = offset, offset + _BLOCK + padded

        if is_meta:
            data = _read_exact(f, padded) if 0 <= size <= MAX_META_BYTES else None
            try:
                if data is None or len(data) < size:
                    raise ValueError(f"{size}-byte {info.type!r} header")
                if info.type == tarfile.XHDTYPE:
                    pax = _pax_records(data[:size])
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            except ValueError as e:
                if sample is None:
                    sample = TarSample(None, member_offset)
                sample.refuse("corrupt_tar", f"bad extended header at byte {member_offset}: {e}")
                yield sample
                return
            continue  # Global pax headers and long link names do not matter here.

        name = pax.get("path") or long_name or info.name
        long_name, pax = None, {}
        if info.type == tarfile.DIRTYPE:
            _skip(f, padded)
            continue
        key, ext = split_key(_printable(name))
        if sample is None or sample.key != key:
            if sample is not None:
                yield sample
            sample = TarSample(key, member_offset)

        problem = _unsafe_name(name)
        if problem is None and info.type not in _REGULAR:
            problem = f"not a regular file (tar type {info.type!r})"
        if problem is not None:
            sample.refuse("unsafe_tar_member", f"{_printable(name)!r}: {problem}")
        elif size > max_member_bytes:
            sample.refuse("member_too_large", f"{_printable(name)!r}: {size} bytes > "
                                              f"{max_member_bytes}")
        elif ext in sample.members:
            sample.refuse("duplicate_member", f"{_printable(name)!r} repeats .{ext}")
        elif sample.problem is None:
            if keep is None or keep(ext):
                data = _read_exact(f, size)
                if len(data) < size:
                    sample.refuse("truncated_member", f"{_printable(name)!r}: {len(data)} of "
                                                      f"{size} bytes before the end of the file")
                    yield sample
                    return
                sample.members[ext] = data
                _skip(f, padded - size)
                continue
            sample.members[ext] = None
        _skip(f, padded)


# --------------------------------------------------------------------------- #
# Readers of the webdataset and img2dataset formats (see pipelines.ingest_readers)
# --------------------------------------------------------------------------- #

class _TarItem(NamedTuple):
    tar_url: Optional[str]  # None: img2dataset wrote a parquet but no tar.
    rel: str  # The tar's path relative to INPUT (part of every uid).
    parquet_url: Optional[str] = None  # img2dataset: every input row with its status.
    stats_url: Optional[str] = None  # img2dataset: NNNNN_stats.json.


def tar_work(cfg: readers.ReadConfig) -> list:
    """One item per tar (webdataset) or per img2dataset shard (tar, parquet, stats)."""
    if cfg.format == "webdataset":
        fs, root, tars = readers.list_files(cfg, (".tar",))
        if not tars:
            raise FileNotFoundError(f"no .tar files at {cfg.input}")
        return [_TarItem(fs.unstrip_protocol(p), readers.relative(p, root)) for p in tars]
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no img2dataset output directory at {cfg.input}")
    files = set(fs.find(root))
    stems = sorted({p.rsplit(".", 1)[0] for p in files if p.endswith((".tar", ".parquet"))
                    and not p.rsplit("/", 1)[-1].startswith(("_", "."))})
    if not stems:
        raise FileNotFoundError(f"no img2dataset shards (NNNNN.tar / .parquet) at {cfg.input}")

    def present(path):
        return fs.unstrip_protocol(path) if path in files else None
    return [_TarItem(present(s + ".tar"), readers.relative(s, root) + ".tar",
                     present(s + ".parquet"), present(s + "_stats.json")) for s in stems]


def _keep_member(ext: str) -> bool:
    return ext in readers.IMAGE_EXTENSIONS or ext in readers.CAPTION_EXTENSIONS or ext == "json"


def _status_rows(item: _TarItem, cfg: readers.ReadConfig):
    """img2dataset's parquet -> ({key: (row, metadata dict)}, problem or None)."""
    if item.parquet_url is None:
        return {}, None
    try:
        with fsspec.open(item.parquet_url, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            wanted = {"key", "status", "error_message", cfg.caption_column, cfg.uid_column,
                      *readers.provenance(names, cfg).values()}
            if "key" not in names or "status" not in names:
                return {}, validate.Rejection("schema_mismatch",
                                              f"no key/status columns in {names}")
            rows = pf.read(columns=[n for n in names if n in wanted]).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        return {}, validate.Rejection("unreadable_input", f"{type(e).__name__}: {e}")
    statuses = {}
    for i, row in enumerate(rows):
        statuses.setdefault(readers.optional_str(row["key"]), (i, row))
    return statuses, None


def _example(ex: readers.RawExample, meta: dict, cfg: readers.ReadConfig) -> readers.RawExample:
    """Fill uid (if from a field), url and license from a sample's metadata."""
    columns = readers.provenance(meta, cfg)
    if cfg.uid_column:
        ex.uid = readers.optional_str(meta.get(cfg.uid_column))
    ex.url = readers.optional_str(meta.get(columns["url"])) if columns["url"] else None
    ex.license = readers.optional_str(meta.get(columns["license"])) if columns["license"] else None
    return ex


def _sample_example(sample: TarSample, item: _TarItem, cfg: readers.ReadConfig,
                    meta: dict) -> readers.RawExample:
    if sample.key is None:  # The archive itself is broken here.
        return readers.RawExample(f"{item.tar_url}@{sample.offset}", rejection=sample.problem)
    ex = readers.RawExample(f"{item.tar_url}#{sample.key}@{sample.offset}",
                            uid=readers.derived_uid(cfg.source, item.rel, sample.key))
    if sample.problem is not None:
        ex.rejection = sample.problem
        return ex
    if sample.members.get("json") is not None:
        try:
            found = json.loads(sample.members["json"])
            if not isinstance(found, dict):
                raise ValueError(f"a JSON {type(found).__name__}, not an object")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included.
            ex.rejection = validate.Rejection("bad_metadata", f"{sample.key}.json: {e}")
            return ex
        meta = {**meta, **found}
    members = sample.members
    ex.image = next((members[e] for e in readers.IMAGE_EXTENSIONS if e in members), None)
    ex.caption = next((members[e] for e in readers.CAPTION_EXTENSIONS if e in members),
                      meta.get(cfg.caption_column))
    return _example(ex, meta, cfg)


def _tar_examples(item: _TarItem, cfg: readers.ReadConfig) -> Iterable[readers.RawExample]:
    statuses, problem = _status_rows(item, cfg)
    if problem is not None:
        yield readers.RawExample(item.parquet_url, rejection=problem)
    found = set()
    if item.tar_url is not None:
        with fsspec.open(item.tar_url, "rb") as f:
            for sample in iter_tar_samples(f, max_member_bytes=cfg.max_member_bytes,
                                           keep=_keep_member):
                found.add(sample.key)
                meta = statuses[sample.key][1] if sample.key in statuses else {}
                yield _sample_example(sample, item, cfg, meta)
    # img2dataset rows that never reached the tar: failed downloads, or lost to truncation.
    for key, (row, meta) in sorted(statuses.items(), key=lambda kv: kv[1][0]):
        if key in found:
            continue
        if meta["status"] == "success":
            rejection = validate.Rejection("missing_from_tar", f"no sample {key} in the tar")
        else:
            rejection = validate.Rejection("download_failed",
                                           f"{meta['status']}: {meta.get('error_message')}")
        yield _example(readers.RawExample(f"{item.parquet_url}#row={row}",
                                          uid=readers.derived_uid(cfg.source, item.rel, key),
                                          rejection=rejection), meta, cfg)


def read_tar(item: _TarItem, cfg: readers.ReadConfig) -> Iterable[List[readers.RawExample]]:
    yield from readers.batches(_tar_examples(item, cfg), cfg.batch_size)


def img2dataset_upstream(item: _TarItem, cfg: readers.ReadConfig) -> dict:
    """Counts img2dataset reported for this shard (summed per source into stats.json)."""
    counts = {"shards": 1, "shards_with_stats": 0}
    try:
        reported = formats.read_json(item.stats_url) if item.stats_url else None
    except (ValueError, OSError):  # Unreadable: shards_with_stats stays short.
        reported = None
    if isinstance(reported, dict):
        counts["shards_with_stats"] = 1
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(reported.get(name), int):
                counts[name] = reported[name]
    return counts
