"""Fixtures shared by several test modules."""
import collections
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch


def file_digests(root: str, skip=("metrics.json",)) -> dict:
    """{path relative to root: sha256} of every file under `root`, except those named in
    `skip` (by default a round's metrics.json: measured seconds, meant to vary)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f not in skip:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the body, restored afterwards.

    Small models gain nothing from threads on a busy machine, and float sums depend on
    how work is split over threads, so runs compared bit for bit use one.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


WorkerPool = collections.namedtuple("WorkerPool", "address pid log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("localhost", port)) == 0


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group `proc` leads: it and the workers it started, nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # Whatever outlived the SIGTERM.
    except ProcessLookupError:  # The whole group is gone.
        pass
    proc.wait()


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    """A Beam SDK worker pool (`python -m apache_beam.runners.worker.worker_pool_main`),
    once per module, for `--environment_type=EXTERNAL --environment_config=ADDRESS`.

    It starts each job's SDK worker as `python -c ...`, so this interpreter's bin comes
    first on its PATH. It runs in a scratch directory, so workers import what is installed
    (as on a real worker), not what the current directory holds. It leads its own process
    group: teardown stops it and its workers.
    """
    scratch = tmp_path_factory.mktemp("worker_pool")
    env = {**os.environ, "PATH": os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    log = scratch / "pool.log"
    for _ in range(3):  # Another process may take the free port first.
        port = _free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                 f"--service_port={port}"], cwd=scratch, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and not _listening(port) and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None and _listening(port):
                yield WorkerPool(f"localhost:{port}", proc.pid, log)
                return
        finally:
            _stop_group(proc)
    pytest.fail(f"the worker pool did not start: {log.read_text()[-2000:]}")
