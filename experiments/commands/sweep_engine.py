"""A sweep YAML in W&B's format and W&B's open-source sweep engine (the ``sweeps`` package, the one the W&B server
runs): the YAML read and checked, each trial's command as ``wandb agent`` builds it, and the trials as the engine
sees them (``engine_run``), from which it proposes the next one and decides which to stop early."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from datamodules.errors import ConfigError
from experiments.commands.processes import cli_arguments, cli_command
from experiments.commands.yaml_schema import Sweep, read_yaml, validate


def engine():
    """The ``sweeps`` package, imported on first use."""
    with warnings.catch_warnings():  # the engine's pydantic models emit v1->v2 migration noise on import
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def objective(config: dict) -> tuple[str, str]:
    """The sweep's metric and goal (``minimize`` unless the YAML says otherwise)."""
    return config["metric"]["name"], config["metric"].get("goal", "minimize")


def load_sweep(path: str | Path) -> dict:
    """Read a sweep YAML and check it against ``yaml_schema.Sweep`` and the sweep engine's own schema; one-line
    ConfigError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found; pass a W&B sweep YAML, e.g. experiments/sweeps/cmunet.yaml")
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a sweep YAML is a mapping with method, metric, parameters and command")
    validate(Sweep, config, path)  # its keys and their types, with a hint for a mistyped key
    violations = engine().schema_violations_from_proposed_config(config)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise ConfigError(f"{path}: the W&B sweep engine rejects it: {violations[0]}{more}")
    if "metric" not in config or "name" not in config["metric"]:
        raise ConfigError(f"{path}: no metric.name; say which logged figure to optimise, e.g. val/dice_volume")
    command = [str(c) for c in config.get("command", [])]
    if not any(c.startswith("${args") for c in command):
        raise ConfigError(f"{path}: its command has no ${{args}} macro, so the trials would not receive the swept values")
    return config


def trial_command(config: dict, params: dict, overrides: list[str], trial_folder: Path) -> list[str]:
    """The command ``wandb agent`` would run for these parameter values, pointed at ``trial_folder``."""
    # W&B's own macro expansion, imported when a trial starts, not with this module, which `lits study` imports too
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros |= {"env": [], "interpreter": [sys.executable], "program": [str(config.get("program", ""))]}
    command: list[str] = []
    for chunk in create_sweep_command(list(config["command"])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            if chunk[2:-1] not in macros:
                raise ConfigError(f"sweep command macro {chunk} is not supported offline; use ${{args}}")
            if chunk.startswith("${args"):
                command += overrides  # before the swept values, which therefore win
            command += [str(c) for c in macros[chunk[2:-1]]]
        else:
            command.append(chunk)
    if command[:1] == ["lits"]:  # this interpreter's suite, whatever `lits` is on PATH
        command = cli_command(command[1:])
    suite_args = cli_arguments(command)
    subcommand = suite_args[0] if suite_args else None
    if subcommand == "fit":
        command.append(f"--run_dir={trial_folder}")
        last = trial_folder / "checkpoints" / "last.ckpt"
        if last.is_file():
            command.append(f"--ckpt_path={last}")
    elif subcommand == "study":  # the run stays in the study's folder; a copy of its figures comes here
        command.append(f"--trial_dir={trial_folder}")
    else:  # lits run puts its folder under the root directory
        command.append(f"--trainer.default_root_dir={trial_folder}")
    return command


def metric_value(trial: dict, metric: str, goal: str) -> float | None:
    """The trial's figure: its final one, else the best of its validation history so far; None without either."""
    if trial.get("result") and metric in trial["result"]:
        return float(trial["result"][metric])
    values = [h[metric] for h in trial.get("history", []) if metric in h]
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def engine_run(trial: dict, metric: str, goal: str):
    """The trial as the engine's ``SweepRun``; a running trial is in flight: a grid skips it, bayes search proposes around it."""
    sweeps = engine()
    value = metric_value(trial, metric, goal)
    states = {"running": sweeps.RunState.running, "finished": sweeps.RunState.finished,
              "stopped": sweeps.RunState.killed, "failed": sweeps.RunState.failed}
    return sweeps.SweepRun(
        name=trial["name"],
        config={k: {"value": v} for k, v in trial["params"].items()},
        state=states[trial["state"]],
        summary_metrics={metric: value} if value is not None else {},
        history=[{metric: h[metric], "_step": i} for i, h in enumerate(trial.get("history", [])) if metric in h],
    )
