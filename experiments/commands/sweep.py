"""``lits sweep SWEEP.yaml --count N [--jobs K] [--key=value ...]``: a W&B sweep YAML run on this machine, no server needed.

The YAML is W&B's own sweep format (``experiments/sweeps/*.yaml``); online, ``wandb sweep`` and
``wandb agent`` run it unchanged (and in parallel by starting more agents: one per GPU with
``CUDA_VISIBLE_DEVICES=i wandb agent ID``, or one per machine). Offline, this command asks W&B's
open-source sweep engine (the ``sweeps`` package, the one the W&B server runs) for each next
configuration, so random, grid and bayes search behave as they do online, and runs the YAML's
``command`` with the same argument macros (``${args}``, ``${env}``, ...) as ``wandb agent``. While a
trial runs, its validation history (``history.jsonl`` of its run folder) is fed to the engine's
early-termination rule (e.g. hyperband); a trial the rule stops is terminated and recorded as stopped.

``--jobs K`` runs K trials at once, each in its own process, placed as ``lits study --jobs`` places its
runs (``experiments/study_jobs.py``: ``cores // K`` threads each on a CPU, the least busy visible GPU
each on GPUs; ``--runs_per_device N`` for K = devices x N). Each next configuration is proposed from the
finished trials and the running ones, which the engine counts as in flight (a grid skips them, bayes
search proposes around them, as the W&B server does for concurrent agents). Before the first trial
starts, ``lits preprocess`` builds the data cache that the trials then share; a sweep that varies a
setting the cache is built with (``data.image_size``, ``data.hu_window``, ...) is refused with ``--jobs``.
A failed trial is recorded as failed and the sweep goes on, as it does one trial at a time.

Everything lands in ``<trainer.default_root_dir>/sweep_<yaml name>/`` (default ``runs/``): a folder
per trial, its console (``trial_<n>.log``), ``sweep.json`` (every trial's configuration, state, metric
and history) and ``results.md`` (the trials ranked). ``--count N`` is the sweep's total number of
trials: a rerun after a kill keeps the finished trials, resumes the interrupted ones and goes on up to
N (a grid stops earlier when it is exhausted). Overrides (``--data.root=DIR``, ``--trainer.max_epochs=5``...)
reach every trial; the swept parameters are given after them, so the sweep's values win.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import yaml

from datamodules import DataError
from experiments.commands.stages import normalise_overrides, override_value
from experiments.commands.study_jobs import Launcher, Started, prepare_data, runs_at_once, whole_number

POLL_SECONDS = 2.0
# Data settings the preprocessing cache is built with: trials side by side share one cache, so they must agree on them
CACHE_SETTINGS = ("data.root", "data.cache_dir", "data.image_size", "data.hu_window", "data.roi_margin_px",
                  "data.roi_margin_slices", "data.phantom_")


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
        command = [sys.executable, "-m", "experiments.commands.cli", *command[1:]]
    subcommand = command[3] if command[1:3] == ["-m", "experiments.commands.cli"] and len(command) > 3 else None
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


def _engine_run(trial: dict, metric: str, goal: str):
    """The trial as the engine's ``SweepRun``; a running trial is in flight: a grid skips it, bayes search proposes around it."""
    sweeps = _engine()
    value = _metric_value(trial, metric, goal)
    states = {"running": sweeps.RunState.running, "finished": sweeps.RunState.finished,
              "stopped": sweeps.RunState.killed, "failed": sweeps.RunState.failed}
    return sweeps.SweepRun(
        name=trial["name"],
        config={k: {"value": v} for k, v in trial["params"].items()},
        state=states[trial["state"]],
        summary_metrics={metric: value} if value is not None else {},
        history=[{metric: h[metric], "_step": i} for i, h in enumerate(trial.get("history", [])) if metric in h],
    )


def propose(config: dict, trials: list[dict], folder: Path) -> dict | None:
    """The engine's next trial from every trial so far (the running ones in flight), appended to ``trials`` and
    saved; None when the search space is exhausted."""
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    proposal = _engine().next_run(config, [_engine_run(t, metric, goal) for t in trials])
    if proposal is None:
        return None
    name = f"trial_{len(trials):03d}"
    trial = {"name": name, "params": {k: v["value"] for k, v in proposal.config.items()}, "state": "running",
             "folder": str(folder / name), "history": []}
    trials.append(trial)
    write_results(folder, trials, config)  # the proposal survives a kill
    return trial


def stop_early(config: dict, trials: list[dict], running: dict[str, Started], stopped: set[str]) -> None:
    """Terminate the running trials that the engine's early-termination rule stops given every trial's history."""
    watched = {t["name"] for t in trials if t["name"] in running and t["history"] and t["name"] not in stopped}
    if "early_terminate" not in config or not watched:
        return
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    for run in _engine().stop_runs(config, [_engine_run(t, metric, goal) for t in trials]):
        if run.name in watched:
            validations = len(next(t for t in trials if t["name"] == run.name)["history"])
            print(f"[lits sweep] {run.name}: stopped early by {config['early_terminate']['type']} after {validations} validations", flush=True)
            with contextlib.suppress(ProcessLookupError):  # it may have ended since the last look
                os.killpg(running[run.name].process.pid, signal.SIGTERM)
            stopped.add(run.name)


def finish(trial: dict, code: int, stopped: bool) -> None:
    """Record an ended trial: its history, its final figures and its state."""
    folder = Path(trial["folder"])
    trial["history"] = read_history(folder)
    trial["result"] = read_result(folder)
    trial["state"] = "stopped" if stopped else ("finished" if code == 0 and trial["result"] else "failed")


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
    """The sweep of ``path`` with the options (``--count``, ``--jobs``, ``--runs_per_device``) and overrides of ``argv``; its folder."""
    config = load_sweep(path)
    count, jobs, overrides = _take_options(normalise_overrides(argv))
    if jobs > 1:
        _check_side_by_side(config, path)
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    folder = (Path(override_value(overrides, "trainer.default_root_dir") or "runs") / f"sweep_{Path(path).stem}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "sweep.json"
    trials: list[dict] = json.loads(state_file.read_text())["trials"] if state_file.is_file() else []
    forwarded = [a for a in overrides if not a.startswith("--trainer.default_root_dir=")]  # each trial has its own
    launcher = Launcher(jobs)
    running: dict[str, Started] = {}
    stopped: set[str] = set()
    exhausted, prepared = False, jobs == 1
    try:
        while True:
            while len(running) < jobs:
                trial = next((t for t in trials if t["state"] == "running" and t["name"] not in running), None)  # interrupted by a kill
                if trial is not None:
                    print(f"[lits sweep] {trial['name']}: resuming")
                elif exhausted or len(trials) >= count:
                    break
                elif (trial := propose(config, trials, folder)) is None:
                    print("[lits sweep] the search space is exhausted")
                    exhausted = True
                    break
                command = trial_command(config, trial["params"], forwarded, Path(trial["folder"]))
                if not prepared:  # side by side, the trials would each build the data cache at once
                    prepare_data(command, "lits sweep")
                    prepared = True
                log = folder / f"{trial['name']}.log"
                running[trial["name"]] = started = launcher.start(command, log, own_session=True)
                shown = " ".join(f"{k}={v}" for k, v in trial["params"].items())
                print(f"[lits sweep] {trial['name']} ({trials.index(trial) + 1}/{count}){started.where}: {shown} (console: {log})", flush=True)
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for trial in trials:
                if trial["name"] in running:
                    trial["history"] = read_history(Path(trial["folder"]))
            stop_early(config, trials, running, stopped)
            for trial in trials:
                code = launcher.poll(running[trial["name"]]) if trial["name"] in running else None
                if code is None:
                    continue
                started = running.pop(trial["name"])
                finish(trial, code, trial["name"] in stopped)
                value = _metric_value(trial, metric, goal)
                failed = f" (console: {started.log})" if trial["state"] == "failed" else ""
                print(f"[lits sweep] {trial['name']}: {trial['state']}, {metric} = {value if value is not None else 'n/a'}{failed}", flush=True)
                write_results(folder, trials, config)
    except BaseException:
        for started in running.values():  # killed with the sweep: they resume from their last checkpoint on the next run
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.process.pid, signal.SIGTERM)
        raise
    table = write_results(folder, trials, config)
    best = ranked(trials, metric, goal)
    print(f"\n{table}")
    if best:
        value, trial = best[0]
        print(f"[lits sweep] best: {trial['name']} with {metric} = {value:.4f}; its settings:")
        print("  " + " ".join(f"--{k}={v}" for k, v in trial["params"].items()))
    print(f"[lits sweep] results in {folder}/results.md and sweep.json")
    return folder


SWEEP_OPTIONS = ("count", "jobs", "runs_per_device")


def _take_options(overrides: list[str]) -> tuple[int, int, list[str]]:
    """The sweep's own options: (--count, default 10; trials at once from --jobs / --runs_per_device; the overrides for every trial)."""
    options, rest = {}, []
    for arg in overrides:
        key, _, value = arg[2:].partition("=")
        if key in SWEEP_OPTIONS:
            options[key] = value
        else:
            rest.append(arg)
    count = whole_number("count", options.get("count", 10), "trials")
    return count, runs_at_once(options.get("jobs"), options.get("runs_per_device")), rest


def _check_side_by_side(config: dict, path: str | Path) -> None:
    """Trials side by side share the data cache built with the first one's settings: refuse a sweep that varies them."""
    for key in config["parameters"]:
        setting = key if key.startswith("data.") else key.partition(".")[2]  # a stage's own: <stage>.data.image_size
        if setting.startswith(CACHE_SETTINGS):
            raise DataError(f"{path}: the sweep varies {key}, which the data cache is built with, so its trials cannot share one cache side by side; use --jobs=1")


def sweep_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_sweep(argv[0], argv[1:])
