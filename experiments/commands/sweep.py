"""``lits sweep SWEEP.yaml --count N [--jobs K] [--key=value ...]``: a W&B sweep YAML run on this machine, no server needed.

The YAML is W&B's own sweep format (``experiments/sweeps/*.yaml``); online, ``wandb sweep`` and
``wandb agent`` run it unchanged (and in parallel by starting more agents: one per GPU with
``CUDA_VISIBLE_DEVICES=i wandb agent ID``, or one per machine). Offline, this command asks W&B's
open-source sweep engine (the ``sweeps`` package, the one the W&B server runs; ``sweep_engine.py``) for each next
configuration, so random, grid and bayes search behave as they do online, and runs the YAML's
``command`` with the same argument macros (``${args}``, ``${env}``, ...) as ``wandb agent``. While a
trial runs, its validation history (``history.jsonl`` of its run folder) is fed to the engine's
early-termination rule (e.g. hyperband); a trial the rule stops is terminated and recorded as stopped.

``--jobs K`` runs K trials at once, each in its own process, placed as ``lits study --jobs`` places its
runs (``experiments/commands/study_jobs.py``: ``cores // K`` threads each on a CPU, the least busy visible GPU
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
N (a grid stops earlier when it is exhausted); ``sweep.json`` is replaced whole at every change, and one cut short
(written in place by an older version) starts the sweep afresh with a one-line warning. Overrides
(``--data.root=DIR``, ``--trainer.max_epochs=5``...) reach every trial; the swept parameters are given after them, so
the sweep's values win.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.errors import ConfigError
from datamodules.io.atomic import read_state, write_json_atomically, write_text_atomically
from experiments.commands.stages import normalise_overrides, override_value, read_metrics
from experiments.commands.study_jobs import Launcher, Started, prepare_data, runs_at_once, whole_number
from experiments.commands.sweep_engine import engine, engine_run, load_sweep, metric_value, objective, trial_command
from experiments.commands.wandb_mode import yaml_command

POLL_SECONDS = 2.0
# Data settings the preprocessing cache is built with: trials side by side share one cache, so they must agree on them
CACHE_SETTINGS = ("data.root", "data.cache_dir", "data.image_size", "data.hu_window", "data.liver_roi.roi_margin_px",
                  "data.liver_roi.roi_margin_slices", "data.phantom")
SWEEP_OPTIONS = ("count", "jobs", "runs_per_device")


def read_history(trial_folder: Path) -> list[dict]:
    """Validation history of the trial's newest run folder (the last stage of a multi-stage run)."""
    files = sorted(trial_folder.rglob("history.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    history = []
    for line in filter(str.strip, files[-1].read_text().splitlines()):
        try:
            history.append(json.loads(line))
        except ValueError:  # a line being written as we read, or cut by a kill: the epochs before it count
            break
    return history


def read_result(trial_folder: Path) -> dict | None:
    """The trial's final ``metrics.json`` (the shallowest one: a multi-stage run's summary)."""
    found = sorted(trial_folder.rglob("metrics.json"), key=lambda p: len(p.parts))
    return read_metrics(found[0].parent) if found else None


def propose(config: dict, trials: list[dict], folder: Path) -> dict | None:
    """The engine's next trial from every trial so far (the running ones in flight), appended to ``trials`` and
    saved; None when the search space is exhausted."""
    metric, goal = objective(config)
    proposal = engine().next_run(config, [engine_run(t, metric, goal) for t in trials])
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
    metric, goal = objective(config)
    for run in engine().stop_runs(config, [engine_run(t, metric, goal) for t in trials]):
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
    """The trials with a finite figure, best first."""
    scored = [(v, t) for t in trials if (v := metric_value(t, metric, goal)) is not None and math.isfinite(v)]
    return sorted(scored, key=lambda x: -x[0] if goal == "maximize" else x[0])


def write_results(folder: Path, trials: list[dict], config: dict) -> str:
    """``sweep.json`` (every trial) and ``results.md`` (the trials ranked) in the sweep's folder; the table."""
    metric, goal = objective(config)
    write_json_atomically(folder / "sweep.json", {"config": config, "trials": trials})
    names = sorted({k for t in trials for k in t["params"]})
    lines = [f"| rank | trial | state | {metric} | " + " | ".join(names) + " |", "|---" * (4 + len(names)) + "|"]
    for rank, (value, trial) in enumerate(ranked(trials, metric, goal), 1):
        cells = [str(rank), trial["name"], trial["state"], f"{value:.4f}", *(str(trial["params"].get(n, "")) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + f"\n\n{config['method']} search, goal: {goal} {metric}.\n"
    write_text_atomically(folder / "results.md", table)
    return table


@dataclass
class SweepTrials:
    """The trials of one ``lits sweep``: started up to ``jobs`` at once, watched while they run, recorded as they end."""

    config: dict
    folder: Path
    count: int  # the sweep's total number of trials
    overrides: list[str]  # every trial's
    launcher: Launcher
    trials: list[dict]  # every trial so far, as sweep.json records them
    running: dict[str, Started] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)  # stopped early by the engine's rule
    exhausted: bool = False  # the engine has no more proposals
    prepared: bool = False  # the data cache is built (or one trial at a time builds it itself)

    def next_trial(self) -> dict | None:
        """A trial interrupted by a kill, to resume; else the engine's next proposal; None when no more will start."""
        trial = next((t for t in self.trials if t["state"] == "running" and t["name"] not in self.running), None)
        if trial is not None:
            print(f"[lits sweep] {trial['name']}: resuming")
            return trial
        if self.exhausted or len(self.trials) >= self.count:
            return None
        trial = propose(self.config, self.trials, self.folder)
        if trial is None:
            print("[lits sweep] the search space is exhausted")
            self.exhausted = True
        return trial

    def start(self, trial: dict) -> None:
        command = trial_command(self.config, trial["params"], self.overrides, Path(trial["folder"]))
        if not self.prepared:  # side by side, the trials would each build the data cache at once
            prepare_data(command, "lits sweep")
            self.prepared = True
        log = self.folder / f"{trial['name']}.log"
        self.running[trial["name"]] = started = self.launcher.start(command, log, own_session=True)
        shown = " ".join(f"{k}={v}" for k, v in trial["params"].items())
        print(f"[lits sweep] {trial['name']} ({self.trials.index(trial) + 1}/{self.count}){started.where}: {shown} (console: {log})", flush=True)

    def start_more(self) -> None:
        """Start trials until ``jobs`` run or no more will start."""
        while len(self.running) < self.launcher.jobs and (trial := self.next_trial()) is not None:
            self.start(trial)

    def watch(self) -> None:
        """One look at the running trials: their histories read, early stops applied, the ended ones recorded."""
        time.sleep(POLL_SECONDS)
        for trial in self.trials:
            if trial["name"] in self.running:
                trial["history"] = read_history(Path(trial["folder"]))
        stop_early(self.config, self.trials, self.running, self.stopped)
        metric, goal = objective(self.config)
        for trial in self.trials:
            code = self.launcher.poll(self.running[trial["name"]]) if trial["name"] in self.running else None
            if code is None:
                continue
            started = self.running.pop(trial["name"])
            finish(trial, code, trial["name"] in self.stopped)
            value = metric_value(trial, metric, goal)
            failed = f" (console: {started.log})" if trial["state"] == "failed" else ""
            print(f"[lits sweep] {trial['name']}: {trial['state']}, {metric} = {value if value is not None else 'n/a'}{failed}", flush=True)
            write_results(self.folder, self.trials, self.config)

    def terminate(self) -> None:
        """End the running trials with the sweep: they resume from their last checkpoint on the next run."""
        for started in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.process.pid, signal.SIGTERM)


def run_sweep(path: str | Path, argv: list[str]) -> Path:
    """The sweep of ``path`` with the options (``--count``, ``--jobs``, ``--runs_per_device``) and overrides of ``argv``; its folder."""
    config = load_sweep(path)
    count, jobs, overrides = take_options(normalise_overrides(argv))
    if jobs > 1:
        check_side_by_side(config, path)
    folder = (Path(override_value(overrides, "trainer.default_root_dir") or "runs") / f"sweep_{Path(path).stem}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "sweep.json"
    trials = SweepTrials(
        config, folder, count,
        overrides=[a for a in overrides if not a.startswith("--trainer.default_root_dir=")],  # each trial has its own
        launcher=Launcher(jobs),
        trials=earlier_trials(state_file),
        prepared=jobs == 1,
    )
    try:
        trials.start_more()
        while trials.running:
            trials.watch()
            trials.start_more()
    except BaseException:
        trials.terminate()
        raise
    print_summary(folder, trials.trials, config)
    return folder


def print_summary(folder: Path, trials: list[dict], config: dict) -> None:
    """The ranked table and the best trial's settings."""
    metric, goal = objective(config)
    table = write_results(folder, trials, config)
    best = ranked(trials, metric, goal)
    print(f"\n{table}")
    if best:
        value, trial = best[0]
        print(f"[lits sweep] best: {trial['name']} with {metric} = {value:.4f}; its settings:")
        print("  " + " ".join(f"--{k}={v}" for k, v in trial["params"].items()))
    print(f"[lits sweep] results in {folder}/results.md and sweep.json")


def earlier_trials(state_file: Path) -> list[dict]:
    """The trials a killed sweep recorded in ``sweep.json``; none (a fresh start, with a one-line warning) when the
    file is cut short or not a sweep's."""
    state = read_state(state_file, "sweep state")
    trials = state.get("trials") if isinstance(state, dict) else None
    if state is not None and not isinstance(trials, list):
        warnings.warn(f"{state_file}: no `trials` list; starting the sweep afresh", stacklevel=2)
    return trials if isinstance(trials, list) else []


def take_options(overrides: list[str]) -> tuple[int, int, list[str]]:
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


def check_side_by_side(config: dict, path: str | Path) -> None:
    """Trials side by side share the data cache built with the first one's settings: refuse a sweep that varies them."""
    for key in config["parameters"]:
        setting = key if key.startswith("data.") else key.partition(".")[2]  # a stage's own: <stage>.data.image_size
        if setting.startswith(CACHE_SETTINGS):
            raise ConfigError(f"{path}: the sweep varies {key}, which the data cache is built with, so its trials cannot share one cache side by side; use --jobs=1")


def sweep_main(argv: list[str]) -> None:
    yaml_command(argv, __doc__, run_sweep)
