"""Shared fixtures: tiny synthetic LiTS folders written as real NIfTI, made in seconds."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.synthetic import tiny_volume, write_pair

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B unless a test asks
# Under pytest-xdist (`pytest -n 2`) the workers share the cores: one intra-op thread pool per core,
# not per worker, or the workers and the `lits` processes they start oversubscribe the CPU.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REAL_CT = Path(__file__).parent / "data" / "real-ct-sample"


@pytest.fixture
def tiny_lits(tmp_path) -> Path:
    """Six tiny volumes (32x32x10, 1.5x1.5x4 mm) in LiTS layout."""
    root = tmp_path / "lits"
    for i in range(6):
        write_pair(root, str(i), *tiny_volume(i))
    return root


@functools.cache
def _starts_processes(path: Path) -> bool:
    """Whether a test file runs `lits` commands or other processes: the suite's slowest files."""
    return any(word in path.read_text() for word in ("tests.lits_commands", "subprocess", "torch.distributed.run"))


def pytest_collection_modifyitems(config, items):
    """The files that start processes first: under `pytest -n 2 --dist loadfile` each file goes to one worker, and a
    long file handed out last keeps one worker busy while the other idles (see `--no-loadscope-reorder` in
    pyproject.toml, which keeps this order instead of xdist's most-tests-first)."""
    items.sort(key=lambda item: not _starts_processes(Path(item.fspath)))
