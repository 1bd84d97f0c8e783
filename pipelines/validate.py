"""Per-example checks shared by every ingest format.

Each check is a pure function returning None when the value is usable, or a
`Rejection`: a str equal to the short reason code (the dead-letter `reason` and the
`dropped_{reason}` counter) that also carries a human-readable `detail`.
"""
import io
from typing import Optional

from PIL import Image, UnidentifiedImageError

from training.preprocess import ImageDecodeError, decode_image

__all__ = ["MAX_CAPTION_CHARS", "IMAGE_FORMATS", "REASONS", "Rejection", "image_problem",
           "image_format", "caption_problem", "clean_caption", "uid_problem", "is_valid_uid"]

MAX_CAPTION_CHARS = 1000
IMAGE_FORMATS = ("jpeg", "png", "webp")  # What CORPUS_SCHEMA's image_format may hold.
_UID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
MAX_UID_CHARS = 128
REASONS = ("missing_image", "undecodable_image", "image_too_large", "unsupported_image_format",
           "missing_caption", "caption_not_utf8", "empty_caption", "caption_too_long",
           "invalid_uid", "unreadable_input")


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


def image_problem(data) -> Optional[Rejection]:
    """None if `data` is a fully decodable, not oversized JPEG/PNG/WebP image."""
    if data is None or len(data) == 0:
        return Rejection("missing_image", "no image bytes")
    try:
        decode_image(bytes(data))
    except ImageDecodeError as e:
        return Rejection(e.reason, e.detail)
    fmt = image_format(bytes(data))
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
