"""The ``lits`` command.

    lits fit --config experiments/quickstart.yaml [--config more.yaml] [--key=value ...]
    lits validate|test --config ... --ckpt_path RUN/checkpoints/best.ckpt
    lits preprocess --data.root DIR [--data.cache_dir DIR]
    lits synth --out DIR [--volumes N --seed S]
    lits predict MODEL [MODEL ...] --input PATH --output DIR [--tta]   (see experiments/commands/predict.py)
    lits evaluate --pred DIR --truth DIR [--out DIR] [--workers N] [--no-lesions]   (see experiments/commands/evaluate.py)
    lits run experiments/pu_net.yaml [--key=value ...]     (multi-stage, see experiments/commands/stages.py)
    lits study experiments/studies/quickstart.yaml [--key=value ...]   (see experiments/commands/study.py)
    lits sweep experiments/sweeps/cmunet.yaml --count 20 [--key=value ...]   (see experiments/commands/sweep.py)

Every run gets a folder ``<trainer.default_root_dir>/<name>/version_<n>`` holding ``config.yaml``
(the resolved config), ``metrics.json`` (the final figures), CSV logs, checkpoints, per-volume
tables and overlay figures; W&B logs there too (offline without an API key or network).

This module is the entry point and stays light: it imports a command's module only when that command runs
(``COMMANDS``). ``run``, ``study`` and ``sweep`` only read YAML and start processes, so they run without
importing torch, Lightning, MONAI or W&B (~6 s on a 2-core CPU); the training commands import
``experiments/commands/lightning_cli.py``, the LightningCLI side. Its names (``LitsCLI``, ...) stay importable
from here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from experiments.commands.error_line import EXIT_CODE, print_error_line, suite_error

# The LightningCLI side: it receives the whole command line, as its parser reads the subcommand itself (and answers
# `lits --help` or a mistyped command with the list of commands)
LITS_CLI = "experiments.commands.lightning_cli:lits_cli_main"

# command -> "module:function", imported when the command runs; the function receives the arguments after the command
COMMANDS = {
    "fit": LITS_CLI,
    "validate": LITS_CLI,
    "test": LITS_CLI,
    "preprocess": LITS_CLI,
    "synth": "experiments.commands.synth:synth_main",
    "predict": "experiments.commands.predict:predict_main",
    "evaluate": "experiments.commands.evaluate:evaluate_main",
    "run": "experiments.commands.stages:run_main",
    "study": "experiments.commands.study:study_main",
    "sweep": "experiments.commands.sweep:sweep_main",
}


def command_function(target: str) -> Callable[[list[str]], None]:
    """The function named by ``"module:function"``, its module imported now."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    target = COMMANDS.get(argv[0] if argv else "", LITS_CLI)
    try:
        command_function(target)(argv if target == LITS_CLI else argv[1:])
    except Exception as error:
        cause = suite_error(error)
        if cause is None:
            raise
        print_error_line(cause)
        sys.exit(EXIT_CODE)


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
