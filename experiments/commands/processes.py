"""Run one ``lits`` command (a stage's ``lits fit``, a study's ``lits test``) in a process of its own, cheaply.

A multi-stage run, a study and a sweep run each stage in a process of its own: its own memory, its own
crash, its own DDP launch. A new interpreter spends ~6 s of a 2-core CPU importing torch, Lightning,
MONAI and W&B before it trains, and a seed of the Table 1 quickstart runs 9 stages. So the stages
of one ``lits`` process are forked from a **fork server** (``multiprocessing``'s ``forkserver``): a
clean process started once, which imports the suite (``experiments.commands.lightning_cli``) and then forks a child per
stage. A child is a separate process with its own exit code, as before, but starts in a fraction of a
second. The server itself never trains, so no thread pool or CUDA context is ever forked (forking a
process whose torch has started its OpenMP threads deadlocks the child).

In the child, ``sys.argv`` is the stage's own command (``<the program> fit --config ...``), so that a DDP
launch inside the stage starts its other ranks with the stage's command. ``LITS_FORK=0`` in the
environment, or a platform other than Linux (Windows has no fork; macOS' system frameworks are not
fork-safe), runs each command as ``python -m experiments.commands.cli ...`` in a new interpreter instead.

A child that orchestrates (``lits run``, or one run of a parallel ``lits study``, which the study itself forks
from its server) forks its own stages directly (``fork``), without a server of its own: it is a copy of the
clean server that has computed nothing and runs no other thread, so it saves a second import of the suite
per run (with threads, it starts a server of its own). ``log`` sends a child's console to a file (a parallel
study's ``console.log`` per run; ``error_log`` its stderr apart), ``cwd`` sets its working directory.
``call_forked`` runs a function in such a child the same way: a study's report, which needs torch and W&B.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.util
import os
import subprocess
import sys
import threading
import traceback
import warnings

from experiments.commands.error_line import EXIT_CODE, print_error_line, suite_error

# The module whose `main` a child runs (`lits ARGS`), named, not imported: that entry point dispatches to every
# command, and `lits run`, `study` and `sweep` import this module.
CLI_MODULE = "experiments.commands.cli"

# Set in the fork server (it preloads this module first) and so in every child: a child started from
# `python -m experiments.commands.cli` re-runs that module as multiprocessing's main, which runpy reports because
# the preloaded suite has imported it already. Harmless: the module only defines functions.
warnings.filterwarnings("ignore", message="'experiments.commands.cli' found in sys.modules", category=RuntimeWarning)

# What every child imports, imported once in the server. Besides the suite: W&B, which Lightning's logger imports
# on its first run, and its launch module, which `wandb.init` imports (~3.5 s of a 2-core CPU per run together).
# The server skips a module that cannot be imported.
_PRELOAD = ["experiments.commands.processes", "experiments.commands.lightning_cli", "wandb", "wandb.sdk.launch"]
_context = None
_clean_child = False  # True in a child of the fork server: it may fork its own stages (see the module docstring)


def _fork_server():
    """The ``forkserver`` context with the suite preloaded (``fork`` in a clean child), or None where forking is off or unavailable."""
    global _context
    if os.environ.get("LITS_FORK", "1") == "0" or not sys.platform.startswith("linux"):
        return None  # elsewhere: Windows has no fork, macOS' system frameworks are not fork-safe
    if _clean_child and threading.active_count() == 1:  # forking a process with threads may copy a held lock
        return multiprocessing.get_context("fork")
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # W&B switched off (WANDB_MODE=disabled, as in the tests): `wandb.init` never imports the launch module
        disabled = os.environ.get("WANDB_MODE") == "disabled"
        _context.set_forkserver_preload([m for m in _PRELOAD if not (disabled and m == "wandb.sdk.launch")])
    return _context


def _child(args: list[str], env: dict[str, str], program: str, log: str | None = None, cwd: str | None = None,
           new_session: bool = False, error_log: str | None = None) -> None:
    """``lits ARGS`` in a forked child; leaves with the command's exit code, like a process of its own."""
    global _clean_child
    _clean_child = True
    code = 1
    try:
        if new_session:  # a process group of its own, which os.killpg ends with its children
            os.setsid()
        sys.stdout.flush()
        sys.stderr.flush()
        for path, streams in ((log, (1, 2) if error_log is None else (1,)), (error_log, (2,))):
            if path is not None:  # the console (and that of any process it starts) appended to the log
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                for stream in streams:
                    os.dup2(descriptor, stream)
                os.close(descriptor)
        if cwd is not None:
            os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        threads = env.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # the server's OpenMP read its own environment when it loaded
            import torch

            torch.set_num_threads(int(threads))
        sys.argv = [program, *args]
        importlib.import_module(CLI_MODULE).main(list(args))
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop)
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
        _leave(code)


def _exit_code(stop: SystemExit) -> int:
    """The exit code an interpreter leaves with on ``stop``: its integer, 0 for None, 1 for anything else."""
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


def _leave(code: int) -> None:
    """Leave a forked child with ``code`` without the interpreter's exit, which would wait on threads a library
    left running, but with multiprocessing's: its finalizers unregister the semaphores the command created
    (tqdm's lock), which the resource tracker would otherwise report as leaked when the study ends."""
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def call_forked(function, *args) -> None:
    """``function(*args)`` in a child of the fork server, which has imported the suite, torch and W&B already: a
    study's report (its table, figure and W&B run) would otherwise spend ~10 s of a 2-core CPU importing them in the
    study's own process, which only orchestrates. In this process where forking is off. The child's one-line error
    (``lits: error: ...``) or traceback is printed there; here it leaves with the child's exit code."""
    context = _fork_server()
    if context is None:
        function(*args)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    process = context.Process(target=_call, args=(function, args, dict(os.environ)))
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(process.exitcode)


def _call(function, args: tuple, env: dict[str, str]) -> None:
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        function(*args)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop)
    except BaseException as error:  # noqa: BLE001 -- reported here, as `lits` would report it
        cause = suite_error(error)
        if cause is None:
            traceback.print_exc()
        else:
            print_error_line(cause)
            code = EXIT_CODE
    finally:
        _leave(code)


def start_cli(args: list[str], env: dict[str, str], log: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
              program: str | None = None, new_session: bool = False, error_log: str | os.PathLike | None = None):
    """Start ``lits ARGS`` with environment ``env``: a child of the fork server (a ``multiprocessing.Process``) or,
    where forking is off, a new interpreter (a ``subprocess.Popen``).

    ``log``: its console appended to this file (stderr to ``error_log`` instead, if given); ``cwd``: its working
    directory; ``new_session``: a session of its own (``os.killpg`` ends it with its children); ``program``: its
    ``sys.argv[0]``, what a DDP launch inside it restarts (default: this process's own, which a ``lits`` command's is).
    """
    log, cwd, error_log = (None if p is None else os.fspath(p) for p in (log, cwd, error_log))
    context = _fork_server()
    if context is None:
        output = open(log, "a") if log is not None else None
        errors = open(error_log, "a") if error_log is not None else (subprocess.STDOUT if output else None)
        try:
            return subprocess.Popen(cli_command(args), env=env, cwd=cwd, stdout=output,
                                    stderr=errors, start_new_session=new_session)
        finally:
            for handle in (output, errors):
                if hasattr(handle, "close"):
                    handle.close()
    sys.stdout.flush()
    sys.stderr.flush()
    process = context.Process(target=_child, args=(list(args), dict(env), program or sys.argv[0], log, cwd, new_session, error_log))
    process.start()
    return process


def cli_command(args: list[str]) -> list[str]:
    """``lits ARGS`` as a new interpreter's command line: this interpreter's suite, whatever ``lits`` is on PATH."""
    return [sys.executable, "-m", CLI_MODULE, *args]


def cli_arguments(command: list[str]) -> list[str] | None:
    """``ARGS`` of a command line ``<any python> -m experiments.commands.cli ARGS``; None for any other."""
    return list(command[3:]) if command[1:3] == ["-m", CLI_MODULE] else None


def poll_cli(process) -> int | None:
    """The exit code of a command started by ``start_cli`` if it has ended, else None."""
    return process.poll() if isinstance(process, subprocess.Popen) else process.exitcode


def wait_cli(process) -> int:
    """The exit code of a command started by ``start_cli``, once it has ended."""
    if isinstance(process, subprocess.Popen):
        return process.wait()
    process.join()
    return process.exitcode


def run_cli(args: list[str], env: dict[str, str], log: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
            program: str | None = None) -> int:
    """Exit code of ``lits ARGS`` run with environment ``env`` (see ``start_cli``)."""
    return wait_cli(start_cli(args, env, log, cwd, program))
