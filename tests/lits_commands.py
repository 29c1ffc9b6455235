"""`lits ARGS` from a test, as the suite runs a stage: a child of the fork server (``experiments.commands.processes``).

A new interpreter per command would spend seconds importing torch, Lightning, MONAI and W&B; the fork server
of a test worker imports them once and forks a child per command, which is still a process of its own (its
exit code, its console, its DDP launch). ``tests/experiments/test_processes.py`` checks that path against a
new interpreter (``LITS_FORK=0``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import experiments.commands.cli
from experiments.commands.processes import start_cli, wait_cli

CLI = experiments.commands.cli.__file__  # the child's sys.argv[0]: what a DDP launch inside it starts for its other ranks


def lits(*args, cwd, env: dict | None = None, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``lits ARGS`` in ``cwd`` with ``os.environ`` updated by ``env`` (``LITS_RUN_VERSION`` removed);
    its exit code, stdout and stderr, as ``subprocess.run(..., capture_output=True, text=True)`` gives them.
    ``check``: fail the test, showing the end of both streams, unless the command succeeded."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("LITS_RUN_VERSION", None)
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        process = start_cli([str(a) for a in args], environment, out, cwd, program=CLI, error_log=err)
        if isinstance(process, subprocess.Popen):
            code = process.wait(timeout)
        else:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
                raise TimeoutError(f"lits {' '.join(map(str, args))} ran past {timeout} s")
            code = wait_cli(process)
        result = subprocess.CompletedProcess(list(args), code, out.read_text(), err.read_text())
    if check:
        assert code == 0, f"lits {' '.join(map(str, args))} failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result
