"""Files that are either whole or absent: every file the suite writes and later trusts goes through here.

A file is written under a temporary name in its own folder (``.tmp-<owner>-<name>``: hidden, and named after the
process that writes it), flushed to disk, then renamed over the final name: a rename within one file system is
atomic, so a kill or a full disk leaves the old file or the new one, never half of one. Readers skip temporary
names (``is_temporary``); a writer removes only its own (``remove_own_temporaries``), never another process's, which
may still be writing.

``read_state`` is the other half: a state file that is missing or cannot be parsed (written by an older version
without this module, or damaged by hand) counts as "not there", with a one-line warning, so that the stage or
sweep it records is simply done again.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"


def owner_tag() -> str:
    """This process's mark in its temporary names: host and pid, so concurrent writers never share one."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file or folder of a writer (its own or another's), to be ignored by readers."""
    return Path(path).name.startswith(TEMPORARY_PREFIX)


def temporary_path(final: Path) -> Path:
    """A fresh temporary name beside ``final``, owned by this process; it keeps ``final``'s suffixes (``np.save``
    appends ``.npy`` to a name without it, nibabel picks the format from ``.nii.gz``)."""
    return final.with_name(f"{TEMPORARY_PREFIX}{owner_tag()}-{uuid.uuid4().hex[:8]}-{final.name}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_atomically(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the content to the temporary path it is given; it is synced to disk, then renamed over
    ``final``. On any error (or a kill) the temporary file is removed and ``final`` is left as it was."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(final: str | os.PathLike, text: str) -> None:
    write_atomically(final, lambda tmp: tmp.write_text(text))


def write_json_atomically(final: str | os.PathLike, value, indent: int | None = 2) -> None:
    write_text_atomically(final, json.dumps(value, indent=indent) + "\n")


def replace_together(files: Sequence[tuple[str | os.PathLike, Callable[[Path], None]]]) -> None:
    """Write several files so that a reader sees all of the new ones or, if anything fails while they are written,
    none of them: every file is written to its temporary name first, and only when all are complete are they
    renamed into place (renames that cannot fail on one file system, done last and back to back)."""
    written: list[tuple[Path, Path]] = []
    try:
        for final, write in files:
            final = Path(final)
            tmp = temporary_path(final)
            written.append((tmp, final))
            write(tmp)
            _fsync(tmp)
        for tmp, final in written:
            os.replace(tmp, final)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)


def remove_own_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporary files this process left in ``folder`` (e.g. after an interrupted write); other
    processes' temporaries stay, since they may still be writing them."""
    for path in Path(folder).glob(f"{TEMPORARY_PREFIX}{owner_tag()}-*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def read_state(path: str | os.PathLike, what: str = "state file"):
    """The JSON value of ``path``, or None when it is missing, empty or unparseable (then with a one-line warning:
    the work it records counts as not done)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        warnings.warn(f"{path}: unreadable {what} ({error.strerror}); treating it as not done", stacklevel=2)
        return None
    try:
        return json.loads(text)
    except ValueError:
        warnings.warn(f"{path}: {what} is empty or cut short (a killed run?); treating it as not done", stacklevel=2)
        return None
