"""``lits sweep SWEEP.yaml --count N [--key=value ...]``: a W&B sweep YAML run on this machine, no server needed.

The YAML is W&B's own sweep format (``experiments/sweeps/*.yaml``); online, ``wandb sweep`` and
``wandb agent`` run it unchanged. Offline, this command asks W&B's open-source sweep engine (the
``sweeps`` package, the one the W&B server runs) for each next configuration, so random, grid and
bayes search behave as they do online, and runs the YAML's ``command`` with the same argument
macros (``${args}``, ``${env}``, ...) as ``wandb agent``. While a trial runs, its validation
history (``history.jsonl`` of its run folder) is fed to the engine's early-termination rule
(e.g. hyperband); a trial the rule stops is terminated and recorded as stopped.

Everything lands in ``<trainer.default_root_dir>/sweep_<yaml name>/`` (default ``runs/``): a folder
per trial, ``sweep.json`` (every trial's configuration, state, metric and history) and
``results.md`` (the trials ranked). ``--count N`` is the sweep's total number of trials: a rerun
after a kill keeps the finished trials, resumes the interrupted one and goes on up to N (a grid
stops earlier when it is exhausted). Overrides (``--data.root=DIR``, ``--trainer.max_epochs=5``...)
reach every trial; the swept parameters are given after them, so the sweep's values win.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from datamodules import DataError
from experiments.stages import normalise_overrides, override_value

POLL_SECONDS = 2.0


def _engine():
    with warnings.catch_warnings():  # the engine's pydantic models emit v1->v2 migration noise on import
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def load_sweep(path: str | Path) -> dict:
    """Read a sweep YAML and check it with the sweep engine's own schema; one-line DataError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sweep file {path} not found; pass a W&B sweep YAML, e.g. experiments/sweeps/cmunet.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: a sweep YAML is a mapping with method, metric, parameters and command")
    violations = _engine().schema_violations_from_proposed_config(config)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise DataError(f"{path}: the W&B sweep engine rejects it: {violations[0]}{more}")
    if "metric" not in config or "name" not in config["metric"]:
        raise DataError(f"{path}: no metric.name; say which logged figure to optimise, e.g. val/dice_volume")
    command = [str(c) for c in config.get("command", [])]
    if not any(c.startswith("${args") for c in command):
        raise DataError(f"{path}: its command has no ${{args}} macro, so the trials would not receive the swept values")
    return config


def trial_command(config: dict, params: dict, overrides: list[str], trial_folder: Path) -> list[str]:
    """The command ``wandb agent`` would run for these parameter values, pointed at ``trial_folder``."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros |= {"env": [], "interpreter": [sys.executable], "program": [str(config.get("program", ""))]}
    command: list[str] = []
    for chunk in create_sweep_command(list(config["command"])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            if chunk[2:-1] not in macros:
                raise DataError(f"sweep command macro {chunk} is not supported offline; use ${{args}}")
            if chunk.startswith("${args"):
                command += overrides  # before the swept values, which therefore win
            command += [str(c) for c in macros[chunk[2:-1]]]
        else:
            command.append(chunk)
    if command[:1] == ["lits"]:  # this interpreter's suite, whatever `lits` is on PATH
        command = [sys.executable, "-m", "experiments.cli", *command[1:]]
    subcommand = command[3] if command[1:3] == ["-m", "experiments.cli"] and len(command) > 3 else None
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


def read_history(trial_folder: Path) -> list[dict]:
    """Validation history of the trial's newest run folder (the last stage of a multi-stage run)."""
    files = sorted(trial_folder.rglob("history.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def read_result(trial_folder: Path) -> dict | None:
    """The trial's final ``metrics.json`` (the shallowest one: a multi-stage run's summary)."""
    found = sorted(trial_folder.rglob("metrics.json"), key=lambda p: len(p.parts))
    return json.loads(found[0].read_text()) if found else None


def _metric_value(trial: dict, metric: str, goal: str) -> float | None:
    if trial.get("result") and metric in trial["result"]:
        return float(trial["result"][metric])
    values = [h[metric] for h in trial.get("history", []) if metric in h]
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def _engine_run(trial: dict, metric: str, goal: str, running: bool = False):
    sweeps = _engine()
    value = _metric_value(trial, metric, goal)
    states = {"finished": sweeps.RunState.finished, "stopped": sweeps.RunState.killed, "failed": sweeps.RunState.failed}
    return sweeps.SweepRun(
        name=trial["name"],
        config={k: {"value": v} for k, v in trial["params"].items()},
        state=sweeps.RunState.running if running else states[trial["state"]],
        summary_metrics={metric: value} if value is not None else {},
        history=[{metric: h[metric], "_step": i} for i, h in enumerate(trial.get("history", [])) if metric in h],
    )


def run_trial(config: dict, trial: dict, command: list[str], finished: list[dict], log_path: Path) -> None:
    """Run one trial, feeding its history to the engine's early-termination rule while it runs."""
    sweeps = _engine()
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    folder = Path(trial["folder"])
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            trial["history"] = read_history(folder)
            if "early_terminate" in config and trial["history"] and not stopped:
                runs = [_engine_run(t, metric, goal) for t in finished] + [_engine_run(trial, metric, goal, running=True)]
                if any(r.name == trial["name"] for r in sweeps.stop_runs(config, runs)):
                    print(f"[lits sweep] {trial['name']}: stopped early by {config['early_terminate']['type']} "
                          f"after {len(trial['history'])} validations", flush=True)
                    os.killpg(process.pid, signal.SIGTERM)
                    stopped = True
        process.wait()
    trial["history"] = read_history(folder)
    trial["result"] = read_result(folder)
    trial["state"] = "stopped" if stopped else ("finished" if process.returncode == 0 and trial["result"] else "failed")


def ranked(trials: list[dict], metric: str, goal: str) -> list[tuple[float, dict]]:
    scored = [(v, t) for t in trials if (v := _metric_value(t, metric, goal)) is not None and math.isfinite(v)]
    return sorted(scored, key=lambda x: -x[0] if goal == "maximize" else x[0])


def write_results(folder: Path, trials: list[dict], config: dict) -> str:
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    (folder / "sweep.json").write_text(json.dumps({"config": config, "trials": trials}, indent=2) + "\n")
    names = sorted({k for t in trials for k in t["params"]})
    lines = [f"| rank | trial | state | {metric} | " + " | ".join(names) + " |", "|---" * (4 + len(names)) + "|"]
    for rank, (value, trial) in enumerate(ranked(trials, metric, goal), 1):
        cells = [str(rank), trial["name"], trial["state"], f"{value:.4f}", *(str(trial["params"].get(n, "")) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + f"\n\n{config['method']} search, goal: {goal} {metric}.\n"
    (folder / "results.md").write_text(table)
    return table


def run_sweep(path: str | Path, argv: list[str]) -> Path:
    config = load_sweep(path)
    sweeps = _engine()
    count, overrides = _take_count(normalise_overrides(argv))
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    folder = (Path(override_value(overrides, "trainer.default_root_dir") or "runs") / f"sweep_{Path(path).stem}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "sweep.json"
    trials: list[dict] = json.loads(state_file.read_text())["trials"] if state_file.is_file() else []
    while True:
        pending = next((t for t in trials if t["state"] == "running"), None)  # interrupted by a kill
        if pending is None:
            if len(trials) >= count:
                break
            finished = [_engine_run(t, metric, goal) for t in trials]
            proposal = sweeps.next_run(config, finished)
            if proposal is None:
                print("[lits sweep] the search space is exhausted")
                break
            name = f"trial_{len(trials):03d}"
            params = {k: v["value"] for k, v in proposal.config.items()}
            pending = {"name": name, "params": params, "state": "running", "folder": str(folder / name), "history": []}
            trials.append(pending)
            write_results(folder, trials, config)  # the proposal survives a kill
        else:
            print(f"[lits sweep] {pending['name']}: resuming")
        forwarded = [a for a in overrides if not a.startswith("--trainer.default_root_dir=")]  # each trial has its own
        command = trial_command(config, pending["params"], forwarded, Path(pending["folder"]))
        shown = " ".join(f"{k}={v}" for k, v in pending["params"].items())
        print(f"[lits sweep] {pending['name']} ({len(trials)}/{count}): {shown}", flush=True)
        done = [t for t in trials if t is not pending]
        run_trial(config, pending, command, done, folder / f"{pending['name']}.log")
        value = _metric_value(pending, metric, goal)
        print(f"[lits sweep] {pending['name']}: {pending['state']}, {metric} = {value if value is not None else 'n/a'}", flush=True)
        write_results(folder, trials, config)
    table = write_results(folder, trials, config)
    best = ranked(trials, metric, goal)
    print(f"\n{table}")
    if best:
        value, trial = best[0]
        print(f"[lits sweep] best: {trial['name']} with {metric} = {value:.4f}; its settings:")
        print("  " + " ".join(f"--{k}={v}" for k, v in trial["params"].items()))
    print(f"[lits sweep] results in {folder}/results.md and sweep.json")
    return folder


def _take_count(overrides: list[str]) -> tuple[int, list[str]]:
    value = override_value(overrides, "count")
    rest = [a for a in overrides if a.split("=", 1)[0] != "--count"]
    try:
        count = int(value) if value is not None else 10
    except ValueError:
        raise DataError(f"--count must be a whole number of trials, got {value!r}") from None
    if count < 1:
        raise DataError(f"--count must be at least 1, got {count}")
    return count, rest


def sweep_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_sweep(argv[0], argv[1:])
