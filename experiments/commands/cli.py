"""The ``lits`` command.

    lits fit --config experiments/quickstart.yaml [--config more.yaml] [--key=value ...]
    lits validate|test --config ... --ckpt_path RUN/checkpoints/best.ckpt
    lits preprocess --data.root DIR [--data.cache_dir DIR]
    lits synth --out DIR [--volumes N --seed S]
    lits predict MODEL --input PATH --output DIR   (see experiments/predict.py)
    lits evaluate --pred DIR --truth DIR [--out DIR] [--workers N] [--no-lesions]   (see experiments/evaluate.py)
    lits run experiments/pu_net.yaml [--key=value ...]     (multi-stage, see experiments/stages.py)
    lits study experiments/studies/quickstart.yaml [--key=value ...]   (see experiments/study.py)
    lits sweep experiments/sweeps/cmunet.yaml --count 20 [--key=value ...]   (see experiments/sweep.py)

Every run gets a folder ``<trainer.default_root_dir>/<name>/version_<n>`` holding ``config.yaml``
(the resolved config), ``metrics.json`` (the final figures), CSV logs, checkpoints, per-volume
tables and overlay figures; W&B logs there too (offline without an API key or network).

This module is the entry point and stays light: ``run``, ``study`` and ``sweep`` only read YAML and
start processes, so they run without importing torch, Lightning, MONAI or W&B (~6 s on a 2-core CPU);
every other command imports ``experiments/lightning_cli.py``, the LightningCLI side. Its names
(``LitsCLI``, ...) stay importable from here.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

from datamodules.errors import SuiteError


def configure_wandb_mode() -> None:
    """Offline unless an API key and the W&B host are reachable; an explicit WANDB_MODE always wins."""
    if "WANDB_MODE" in os.environ:
        return
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if has_key:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError:
            warnings.warn(f"W&B host {host} unreachable: logging offline (sync later with `wandb sync`)")
    os.environ["WANDB_MODE"] = "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None or argv == sys.argv[1:]
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("run", "study", "sweep"):
            from experiments.commands.stages import run_main
            from experiments.commands.study import study_main
            from experiments.commands.sweep import sweep_main

            configure_wandb_mode()
            {"run": run_main, "study": study_main, "sweep": sweep_main}[argv[0]](argv[1:])
            return
        from experiments.commands.lightning_cli import run_command

        run_command(argv, from_command_line)
    except Exception as error:
        cause = _suite_error(error)
        if cause is None:
            raise
        print(f"lits: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _suite_error(error: BaseException | None) -> Exception | None:
    """The suite's own one-line error behind ``error``, if any: jsonargparse wraps errors raised while it instantiates the model."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SuiteError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def __getattr__(name: str):
    # LitsCLI, EpochHistory, ...: the LightningCLI side, imported on first use. Not for dunder names: the console
    # script's `from experiments.commands.cli import main` looks up `__path__`, which would import Lightning (~5 s) in
    # `lits study`/`run`/`sweep`, processes that only orchestrate.
    if name.startswith("__"):
        raise AttributeError(f"module 'experiments.commands.cli' has no attribute {name!r}")
    from experiments.commands import lightning_cli
    try:
        return getattr(lightning_cli, name)
    except AttributeError:
        raise AttributeError(f"module 'experiments.commands.cli' has no attribute {name!r}") from None


if __name__ == "__main__":
    main()
