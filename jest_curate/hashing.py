"""Deterministic hashing shared by every stage.

Python's `hash()` is salted per process, so anything that must agree across
workers and reruns (uids, shuffles, seeds) goes through these helpers instead.
Fields are type-tagged and length-prefixed so ("ab", "c") and ("a", "bc") differ.
"""
import hashlib
import struct

__all__ = ["blake2b_fields", "hash_u64", "derive_seed", "sha256_bytes"]


def _encode(field) -> bytes:
    if isinstance(field, bool):  # Before int: bool is an int subclass.
        tag, payload = b"b", bytes([field])
    elif isinstance(field, int):
        tag, payload = b"i", field.to_bytes(16, "big", signed=True)
    elif isinstance(field, str):
        tag, payload = b"s", field.encode("utf-8")
    elif isinstance(field, (bytes, bytearray, memoryview)):
        tag, payload = b"y", bytes(field)
    else:
        raise TypeError(f"cannot hash field of type {type(field).__name__}: {field!r}")
    return tag + struct.pack(">Q", len(payload)) + payload


def blake2b_fields(*fields, digest_size: int = 16) -> bytes:
    """blake2b over type-tagged, length-prefixed fields (str, int, bool, bytes)."""
    h = hashlib.blake2b(digest_size=digest_size)
    for field in fields:
        h.update(_encode(field))
    return h.digest()


def hash_u64(*fields) -> int:
    """An unsigned 64-bit integer hash of `fields`, stable across processes."""
    return int.from_bytes(blake2b_fields(*fields, digest_size=8), "big")


def derive_seed(root_seed: int, *names) -> int:
    """A child seed in [0, 2**63) for the stage/round/batch named by `names`."""
    return hash_u64("seed", root_seed, *names) >> 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
