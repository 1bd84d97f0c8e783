"""Reproducible installs (issue 13): one lock, used by make, CI and the Dataflow container."""
import importlib.metadata
import os
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!*,;@ ]", version), line
            pins[canonicalize_name(name)] = version
    return pins


def _setup_requirements() -> list:
    text = (ROOT / "setup.py").read_text()
    body = text[text.index("install_requires=["):text.index("entry_points")]
    return [Requirement(r) for r in re.findall(r'^\s*"([^"]+)",', body, re.M)]


def test_the_lock_pins_every_package_exactly_within_setup_py_ranges():
    pins = _lock()
    for name in ("apache-beam", "torch", "torchvision", "open-clip-torch", "numpy", "pyarrow",
                 "webdataset", "pip", "setuptools", "wheel"):
        assert name in pins, name
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not locked"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"the lock's {req.name}=={pins[name]} is outside setup.py's {req}"


@pytest.mark.skipif(bool(os.environ.get("JEST_CURATE_UNLOCKED")),
                    reason="make test-latest runs without the lock on purpose")
def test_this_environment_is_the_lock():
    """`make test` installed exactly the lock: no drifted or hand-installed versions."""
    drift = {}
    for name, version in _lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # A platform-specific dependency this machine does not need.
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"installed versions differ from constraints.txt (lock, installed): {drift}"


def test_make_and_ci_install_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := constraints.txt" in makefile
    install = makefile[makefile.index("$(STAMP): setup.py $(LOCK)"):makefile.index("data:")]
    assert install.count("-c $(LOCK)") == 2  # pip itself, then the project.
    for target in ("demo: $(STAMP)", "test: $(STAMP)", "lock:", "test-latest:"):
        assert f"\n{target}" in makefile, target
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):]
    block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make demo",
                                                                           "make test"]


def test_the_dataflow_container_installs_the_launchers_lock():
    docs = (ROOT / "docs/dataflow.md").read_text()
    dockerfile = re.search(r"```dockerfile\n(.*?)```", docs, re.S).group(1)
    base = re.search(r"^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)$", dockerfile, re.M)
    assert base, dockerfile
    assert base.group(2) == _lock()["apache-beam"]
    assert re.search(r"pip install .*-c /opt/jest-curate/constraints\.txt", dockerfile)
