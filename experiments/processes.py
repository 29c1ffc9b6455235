"""Run one ``lits`` command (a stage's ``lits fit``, a study's ``lits test``) in a process of its own, cheaply.

A multi-stage run, a study and a sweep run each stage in a process of its own: its own memory, its own
crash, its own DDP launch. A new interpreter spends ~6 s of a 2-core CPU importing torch, Lightning,
MONAI and W&B before it trains, and a seed of the Table 1 quickstart runs 9 stages. So the stages
of one ``lits`` process are forked from a **fork server** (``multiprocessing``'s ``forkserver``): a
clean process started once, which imports the suite (``experiments.lightning_cli``) and then forks a child per
stage. A child is a separate process with its own exit code, as before, but starts in a fraction of a
second. The server itself never trains, so no thread pool or CUDA context is ever forked (forking a
process whose torch has started its OpenMP threads deadlocks the child).

In the child, ``sys.argv`` is the stage's own command (``<the program> fit --config ...``), so that a DDP
launch inside the stage starts its other ranks with the stage's command. ``LITS_FORK=0`` in the
environment, or a platform other than Linux (Windows has no fork; macOS' system frameworks are not
fork-safe), runs each command as ``python -m experiments.cli ...`` in a new interpreter instead.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import traceback
import warnings

# Set in the fork server (it preloads this module first) and so in every child: a child started from
# `python -m experiments.cli` re-runs that module as multiprocessing's main, which runpy reports because
# the preloaded suite has imported it already. Harmless: the module only defines functions.
warnings.filterwarnings("ignore", message="'experiments.cli' found in sys.modules", category=RuntimeWarning)

_context = None


def _fork_server():
    """The ``forkserver`` context with the suite preloaded, or None where forking is off or unavailable."""
    global _context
    if os.environ.get("LITS_FORK", "1") == "0" or not sys.platform.startswith("linux"):
        return None  # elsewhere: Windows has no fork, macOS' system frameworks are not fork-safe
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["experiments.processes", "experiments.lightning_cli"])
    return _context


def _child(args: list[str], env: dict[str, str], program: str) -> None:
    """``lits ARGS`` in a forked child; leaves with the command's exit code, like a process of its own."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [program, *args]
        from experiments.cli import main

        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 -- report as an interpreter would, then leave with its exit code
        traceback.print_exc()
    finally:
        # What interpreter exit does for a stage: close the W&B run (its atexit hook would), flush the output.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            try:
                wandb.finish(exit_code=code)
            except Exception:  # noqa: BLE001 -- a logging failure must not change the stage's result
                traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cli(args: list[str], env: dict[str, str]) -> int:
    """Exit code of ``lits ARGS`` run with environment ``env``, in a child of the fork server or a new interpreter."""
    context = _fork_server()
    if context is None:
        return subprocess.run([sys.executable, "-m", "experiments.cli", *args], env=env).returncode
    sys.stdout.flush()
    sys.stderr.flush()
    process = context.Process(target=_child, args=(list(args), dict(env), sys.argv[0]))
    process.start()
    process.join()
    return process.exitcode
