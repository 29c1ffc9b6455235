"""The one line ``lits`` prints for the suite's own errors (``lits: error: ...``, exit status 2) instead of a traceback.

A leaf module: the command's entry point and the process runner (a forked call's error) both print it, and the
runner must not import the entry point, which dispatches to every command.
"""

from __future__ import annotations

import sys

from datamodules.errors import SuiteError

EXIT_CODE = 2  # what argparse and jsonargparse leave with on a bad argument


def suite_error(error: BaseException | None) -> SuiteError | None:
    """The suite's own error behind ``error``, if any: jsonargparse wraps errors raised while it instantiates the model."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SuiteError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def print_error_line(error: SuiteError) -> None:
    """``lits: error: <message>`` on stderr."""
    print(f"lits: error: {error}", file=sys.stderr)
