"""Test-only fault injection: chosen DoFns fail the *first* attempt of some of their elements.

Off unless the environment variable JEST_CURATE_FAULTS holds a plan (JSON):

    {"dir": "/tmp/faults",                  # local directory for attempt markers
     "seed": 0,                             # which keys a fraction picks
     "points": {
        "select.assemble_tar": {"fraction": 0.5},           # half the tars, once each
        "embed.write_shard": {"limit": 1},                  # one shard, once, mid-write
        "select.write_fragment": {"after": 2, "limit": 1,   # the 3rd fragment...
                                  "action": "hang"}}}       # ...blocks until killed

Pipelines call `maybe_fail(point, key)` where a DoFn starts on an element (key: what
the element is, e.g. a shard id or a super-batch index), and
`maybe_fail(point, key, partial_write=(url, data))` just before writing an output, which
on a firing leaves the first half of `data` at `url` (written in place, not atomically:
the worst a crashed writer can leave) before failing.

Which elements fail is deterministic: a key is chosen when blake2b(seed, point, key)
falls in `fraction` (default 1); chosen keys are numbered in the order they first
arrive, and those numbered `after` .. `after + limit - 1` fire (default: all). A key
fires only on its first attempt: an exclusively created marker file per (point, key)
in `dir` tells a retry from a first attempt, across threads and worker processes on
one machine. A retry that passes leaves a `.retried` marker, so a test can show that
the runner (not the DoFn) retried every failed element: `report(dir)`.

A bundle is retried whole, and each attempt can fail on another chosen element of
it; runners give up after a few attempts (the direct runner after 4), so keep `limit`
at 3 or less where many chosen elements may share a bundle.

Hook points (`POINTS`): ingest.read, corpus_io.write_shard (after the commit marker,
before the DoFn emits), embed.embed_batch, embed.write_shard (dead letters committed,
embeddings not), select.join_shard, select.select_super_batch, select.write_fragment
and select.assemble_tar (both with a torn partial write), select.write_manifest,
layout.key_shard, layout.route_rows, layout.write_candidates, round.select_shard and
round.write_tar (with a torn partial write).

Actions: "raise" (default) raises `InjectedFault` out of the DoFn; "hang" blocks the
worker until it is killed (for kill-and-resume tests; the `.fired` marker tells the
test when to kill).

The plan is read once per process, at the first hook call; with no plan every hook
is one global lookup and a comparison (no I/O, no environment lookups per element).
`injected(plan)` sets a plan for the current process (and the subprocesses it starts).
"""
import contextlib
import json
import os
import time
from typing import Optional

import fsspec

from jest_curate import hashing

__all__ = ["ENV_VAR", "POINTS", "InjectedFault", "maybe_fail", "injected", "reset", "report"]

ENV_VAR = "JEST_CURATE_FAULTS"
POINTS = ("ingest.read", "corpus_io.write_shard", "embed.embed_batch", "embed.write_shard",
          "select.join_shard", "select.select_super_batch", "select.write_fragment",
          "select.assemble_tar", "select.write_manifest", "layout.key_shard",
          "layout.route_rows", "layout.write_candidates", "round.select_shard",
          "round.write_tar")
_ACTIONS = ("raise", "hang")
_POINT_KEYS = {"fraction", "after", "limit", "action"}

_UNLOADED = object()
_plan = _UNLOADED  # None (off) or a validated plan dict, once loaded.


class InjectedFault(RuntimeError):
    """Raised by a hook on the first attempt of a chosen element (tests only)."""


def _validate(plan: dict) -> dict:
    if not isinstance(plan, dict) or not isinstance(plan.get("dir"), str):
        raise ValueError(f"{ENV_VAR}: expected {{\"dir\": ..., \"points\": {{...}}}}, got {plan!r}")
    unknown = set(plan) - {"dir", "seed", "points"}
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}")
    points = plan.get("points") or {}
    for name, spec in points.items():
        if name not in POINTS:
            raise ValueError(f"{ENV_VAR}: unknown point {name!r}; hooks are {POINTS}")
        bad = set(spec) - _POINT_KEYS
        if bad:
            raise ValueError(f"{ENV_VAR}: point {name!r} has unknown keys {sorted(bad)}")
        if not 0.0 <= float(spec.get("fraction", 1.0)) <= 1.0:
            raise ValueError(f"{ENV_VAR}: point {name!r}: fraction must be in [0, 1]")
        if spec.get("action", "raise") not in _ACTIONS:
            raise ValueError(f"{ENV_VAR}: point {name!r}: action must be one of {_ACTIONS}")
    return {"dir": plan["dir"], "seed": int(plan.get("seed", 0)), "points": dict(points)}


def _load():
    global _plan
    text = os.environ.get(ENV_VAR)
    _plan = _validate(json.loads(text)) if text else None
    return _plan


def reset() -> None:
    """Forget the loaded plan; the next hook call reads the environment again."""
    global _plan
    _plan = _UNLOADED


@contextlib.contextmanager
def injected(plan: dict):
    """Run the body with `plan` active in this process (and in subprocesses it starts)."""
    _validate(plan)
    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = json.dumps(plan)
    reset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved
        reset()


def maybe_fail(point: str, key, *, partial_write: Optional[tuple] = None) -> None:
    """Fail here if the plan says so (see the module docstring); a no-op when off."""
    plan = _load() if _plan is _UNLOADED else _plan
    if plan is None:
        return
    spec = plan["points"].get(point)
    if spec is None:
        return
    key_hash = hashing.hash_u64("fault", plan["seed"], point, repr(key))
    if key_hash >= float(spec.get("fraction", 1.0)) * 2.0 ** 64:
        return
    folder = os.path.join(plan["dir"], point)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{key_hash:016x}")
    if not _create_exclusive(stem + ".seen", repr(key)):  # A retry (or a spared key).
        if os.path.exists(stem + ".fired"):
            _create_exclusive(stem + ".retried", repr(key))
        return
    ordinal = _claim_ordinal(folder)
    after, limit = int(spec.get("after", 0)), spec.get("limit")
    if ordinal < after or (limit is not None and ordinal >= after + int(limit)):
        return
    if partial_write is not None:
        url, data = partial_write
        with fsspec.open(url, "wb") as f:  # In place: a torn file at the final name.
            f.write(bytes(data[:len(data) // 2]))
    action = spec.get("action", "raise")
    _create_exclusive(stem + ".fired", json.dumps({"point": point, "key": repr(key),
                                                   "action": action}))
    if action == "hang":
        while True:  # Until the test kills this process.
            time.sleep(3600)
    raise InjectedFault(f"injected fault at {point} for {key!r} (first attempt)")


def _create_exclusive(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _claim_ordinal(folder: str) -> int:
    """The number of chosen keys that arrived before this one (exclusive-create slots)."""
    ordinal = 0
    while not _create_exclusive(os.path.join(folder, f"ordinal-{ordinal:06d}"), ""):
        ordinal += 1
    return ordinal


def report(directory: str) -> dict:
    """{point: {"fired": [key repr...], "retried": [key repr...]}} from a plan's markers."""
    out = {}
    if not os.path.isdir(directory):
        return out
    for point in sorted(os.listdir(directory)):
        folder = os.path.join(directory, point)
        entry = {"fired": [], "retried": []}
        for name in sorted(os.listdir(folder)):
            kind = name.rsplit(".", 1)[-1]
            if kind in entry:
                with open(os.path.join(folder, name)) as f:
                    text = f.read()
                entry[kind].append(json.loads(text)["key"] if kind == "fired" else text)
        out[point] = entry
    return out
