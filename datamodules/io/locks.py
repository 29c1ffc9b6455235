"""Locks for writes that several processes may start at once on a shared file system.

In a multi-node run every node's local rank 0 runs ``prepare_data``, so two nodes may build the same
cache entry (``datamodules.io.cache``) or the same resampled volume (``datamodules.io.volume3d``) at
the same moment. Whoever writes a file or folder ``final`` holds ``lock_for(final)`` meanwhile (a
``filelock`` lock: ``fcntl`` locks, which NFS and Lustre clients honour when mounted with locking on)
and rechecks, once it holds it, whether another process finished the work while it waited.

Because a writer writes only while it holds the lock, the temporary copies of ``final`` found by a
process that holds it (``temporaries_of``) belong to a writer that was killed: that process may
remove them, whoever made them. Lock files are never deleted: removing one while another process
waits on it would let two writers in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock, Timeout

from datamodules.io.atomic import TEMPORARY_PREFIX

LOCKS = ".locks"


def lock_for(final: Path) -> FileLock:
    """The lock held by whoever writes ``final``: ``.locks/<name>.lock`` in ``final``'s folder."""
    folder = final.parent / LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / f"{final.name}.lock")


def acquire(lock: FileLock, wait: bool) -> bool:
    """Take ``lock``, waiting for it if ``wait``; without ``wait``, False at once when another process holds it."""
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return False
    return True


def temporaries_of(final: Path, names: Iterable[str]) -> list[Path]:
    """The names among ``names`` (in ``final``'s folder) that ``datamodules.io.atomic.temporary_path(final)`` gives
    in any process: ``.tmp-<host>-<pid>-<8 hex>-<final's name>``."""
    pattern = re.compile(rf"{re.escape(TEMPORARY_PREFIX)}.+-\d+-[0-9a-f]{{8}}-{re.escape(final.name)}")
    return [final.parent / name for name in names if pattern.fullmatch(name)]
