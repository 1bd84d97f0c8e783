"""Per-example checks shared by every ingest format, and their use on a reader batch.

Each check is a pure function returning None when the value is usable, or a
`Rejection`: a str equal to the short reason code (the dead-letter `reason` and the
`dropped_{reason}` counter) that also carries a human-readable `detail`.
`validate_examples` applies them in order (reader problem, uid, blocklist, image,
caption) and splits a batch into corpus rows and dead letters.
"""
import io
from typing import Optional

import fsspec
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from jest_curate import formats
from training.preprocess import ImageDecodeError, decode_image

__all__ = ["MAX_CAPTION_CHARS", "MAX_IMAGE_BYTES", "IMAGE_FORMATS", "REASONS", "Rejection",
           "image_problem", "image_format", "caption_problem", "clean_caption", "uid_problem",
           "is_valid_uid", "blocklist_problem", "read_blocklist", "validate_examples"]

MAX_CAPTION_CHARS = 1000
MAX_IMAGE_BYTES = 32 << 20  # Encoded size; pixels are capped by preprocess.MAX_IMAGE_PIXELS.
IMAGE_FORMATS = ("jpeg", "png", "webp")  # What CORPUS_SCHEMA's image_format may hold.
_UID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
MAX_UID_CHARS = 128
# Every dead-letter reason ingest can give, in the order checks run.
REASONS = (
    # The input itself (readers).
    "unreadable_input", "schema_mismatch", "corrupt_tar", "truncated_tar", "truncated_member",
    "unsafe_tar_member", "member_too_large", "duplicate_member", "bad_metadata",
    "download_failed", "missing_from_tar",
    # One example (validate_examples).
    "invalid_uid", "blocklisted", "missing_image", "image_too_large", "not_an_image",
    "undecodable_image", "unsupported_image_format", "missing_caption", "caption_not_utf8",
    "empty_caption", "caption_too_long",
    # Across examples (dedup).
    "duplicate_uid", "duplicate_image_caption", "duplicate_image")


class Rejection(str):
    """A reason code (the string itself) with a `detail` for the dead-letter record."""

    detail: str

    def __new__(cls, reason: str, detail: str = ""):
        obj = super().__new__(cls, reason)
        obj.detail = detail
        return obj

    def __reduce__(self):
        return Rejection, (str(self), self.detail)


def image_format(data: bytes) -> Optional[str]:
    """'jpeg' | 'png' | 'webp' | another lowercase PIL format name, from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.format or "").lower() or None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _looks_like_markup(data: bytes) -> bool:
    """HTML error pages and SVG served under an image name start with '<'."""
    return data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def image_problem(data, *, max_bytes: int = MAX_IMAGE_BYTES) -> Optional[Rejection]:
    """None if `data` is a fully decodable, not oversized JPEG/PNG/WebP image."""
    if data is None or len(data) == 0:
        return Rejection("missing_image", "no image bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        return Rejection("image_too_large", f"encoded image is over {max_bytes} bytes")
    if _looks_like_markup(data):
        return Rejection("not_an_image", f"markup, not an image: {data[:60]!r}")
    try:  # Header only; PIL refuses > 2x its own pixel limit before decode_image can.
        Image.open(io.BytesIO(data)).close()
    except Image.DecompressionBombError as e:
        return Rejection("image_too_large", str(e))
    except Exception:  # PIL raises many types for garbage; decode_image classifies them.
        pass
    try:
        decode_image(data)
    except ImageDecodeError as e:
        return Rejection(e.reason, e.detail)
    fmt = image_format(data)
    if fmt not in IMAGE_FORMATS:
        return Rejection("unsupported_image_format", f"{fmt} is not one of {IMAGE_FORMATS}")
    return None


def clean_caption(caption) -> str:
    """The caption as stored: decoded from UTF-8 if bytes, outer whitespace stripped."""
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8")
    return caption.lstrip("\ufeff").strip()  # Editors on Windows start .txt files with a BOM.


def caption_problem(caption, *, max_chars: int = MAX_CAPTION_CHARS) -> Optional[Rejection]:
    """None if `caption` (str or UTF-8 bytes) is non-empty once stripped and <= `max_chars`."""
    if caption is None:
        return Rejection("missing_caption", "no caption")
    if not isinstance(caption, (str, bytes, bytearray)):
        return Rejection("missing_caption", f"caption is a {type(caption).__name__}, not text")
    try:
        text = clean_caption(caption)
    except UnicodeDecodeError as e:
        return Rejection("caption_not_utf8", str(e))
    if "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return Rejection("caption_not_utf8", "NUL or unpaired surrogate in caption")
    if not text:
        return Rejection("empty_caption", "caption is empty or whitespace")
    if len(text) > max_chars:
        return Rejection("caption_too_long", f"{len(text)} characters > {max_chars}")
    return None


def is_valid_uid(uid) -> bool:
    """uids become WebDataset keys and file names: [A-Za-z0-9_-], at most 128 characters."""
    return (isinstance(uid, str) and 0 < len(uid) <= MAX_UID_CHARS
            and all(c in _UID_CHARS for c in uid))


def uid_problem(uid) -> Optional[Rejection]:
    if is_valid_uid(uid):
        return None
    return Rejection("invalid_uid", f"uid {str(uid)[:64]!r} must be 1-{MAX_UID_CHARS} of "
                                    "[A-Za-z0-9_-] (WebDataset splits keys at '.')")


def blocklist_problem(uid, url, blocklist) -> Optional[Rejection]:
    """Takedowns: `blocklist` holds uids and/or source URLs."""
    if blocklist and (uid in blocklist or (url is not None and url in blocklist)):
        return Rejection("blocklisted", f"{'uid' if uid in blocklist else 'url'} is blocklisted")
    return None


def read_blocklist(url: Optional[str]) -> frozenset:
    """uids and/or source URLs, one per line; blank lines and `#` comments ignored."""
    if url is None:
        return frozenset()
    with fsspec.open(url, "r", encoding="utf-8") as f:
        return frozenset(line.strip() for line in f
                         if line.strip() and not line.lstrip().startswith("#"))


def _problem(ex, blocklist, max_image_bytes: int, max_caption_chars: int) -> Optional[Rejection]:
    return (ex.rejection or uid_problem(ex.uid) or blocklist_problem(ex.uid, ex.url, blocklist)
            or image_problem(ex.image, max_bytes=max_image_bytes)
            or caption_problem(ex.caption, max_chars=max_caption_chars))


def validate_examples(examples: list, *, source: str, blocklist=frozenset(),
                      max_image_bytes: int = MAX_IMAGE_BYTES,
                      max_caption_chars: int = MAX_CAPTION_CHARS):
    """RawExamples -> (corpus pa.RecordBatch, dead-letter pa.RecordBatch, {source: counts})."""
    rows = {name: [] for name in formats.CORPUS_SCHEMA.names}
    dead = {name: [] for name in formats.DEAD_LETTER_SCHEMA.names}
    reasons = {}
    for ex in examples:
        problem = _problem(ex, blocklist, max_image_bytes, max_caption_chars)
        if problem is not None:
            reasons[str(problem)] = reasons.get(str(problem), 0) + 1
            for name, value in (("uid", ex.uid if is_valid_uid(ex.uid) else None),
                                ("reason", str(problem)), ("detail", problem.detail[:1000]),
                                ("source_location", ex.source_location)):
                dead[name].append(value)
            continue
        image = bytes(ex.image)
        values = {"uid": ex.uid, "image": image, "image_format": image_format(image),
                  "caption": clean_caption(ex.caption), "source": source,
                  "source_location": ex.source_location, "url": ex.url, "license": ex.license}
        for name, value in values.items():
            rows[name].append(value)
    corpus = pa.RecordBatch.from_pydict(rows, schema=formats.CORPUS_SCHEMA)
    dead_letters = pa.RecordBatch.from_pydict(dead, schema=formats.DEAD_LETTER_SCHEMA)
    return corpus, dead_letters, {source: {
        "seen": len(examples), "ingested": corpus.num_rows,
        "dead_lettered": dead_letters.num_rows, "reasons": reasons}}
