"""``lits study STUDY.yaml --jobs K``: a study's runs K at a time, each in its own process.

A study's runs are chains, one per seed: the models of a seed run in the study's order, because
``share_stages`` hands a seed's finished stages to the later models of the same seed. Chains are
independent (seeds share nothing but the data cache), so K of them run at once, after one
``lits preprocess`` of the first model's first stage has generated and preprocessed the data cache
that the runs then read (caches that only later stages use are built by their first run). Each run is ``lits study STUDY.yaml --model=LABEL --seed=S`` (the study's single-run mode,
also what a W&B sweep agent runs): the same code, the same seeds and resumable stages as a sequential
study, so the figures are the same where the arithmetic is (same threads per run: see ``threads``).

On a CPU the cores are shared out: each run gets ``cores // K`` intra-op threads (``OMP_NUM_THREADS``;
a value the user set is kept).
On GPUs, runs are spread over the visible devices round-robin (``CUDA_VISIBLE_DEVICES``), ``K`` runs in
all, so ``--jobs`` = devices x runs per device. Each run's console goes to ``console.log`` in its run
folder; the study prints one line when a run starts and when it ends. A failed run stops new runs
from starting, lets the running ones finish, and names its log. A killed parallel study resumes like a
sequential one: finished runs are skipped, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datamodules import DataError


def threads(jobs: int) -> int:
    """Intra-op threads per run: the user's ``OMP_NUM_THREADS`` if set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // jobs)


def _devices() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: CPU runs
        return []


def _preprocess(study: dict, overrides: list[str]) -> None:
    """``lits preprocess`` with the first model's first stage's settings, before runs start side by side."""
    from experiments.stages import load_experiment, normalise_overrides, stage_overrides
    from experiments.study import model_overrides

    label = next(iter(study["models"]))
    _, stages = load_experiment(study["models"][label])
    names = [stage["name"] for stage in stages]
    command = [sys.executable, "-m", "experiments.cli", "preprocess"]
    for config in stages[0]["config"]:
        command += ["--config", str(config)]
    every = model_overrides(study, label, normalise_overrides(study["args"]) + overrides)
    every += [f"--seed_everything={study['seeds'][0]}", f"--data.split_seed={study['seeds'][0]}"]
    command += list(stages[0].get("args", [])) + stage_overrides(every, names[0], names)
    print("[lits study] preparing the data cache", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"preparing the data for {label} failed: {(result.stderr.strip().splitlines() or ['(no output)'])[-1]}")


def run_parallel(path: str | Path, study: dict, folder: Path, overrides: list[str], jobs: int, slug) -> dict:
    """Every (model, seed) of ``study`` through ``jobs`` worker processes; ``{label: {seed: final metrics}}``.

    ``overrides`` are the command line's (the study file's own ``args`` are read again by each run).
    """
    devices = _devices()
    results: dict = {label: {} for label in study["models"]}
    stop = threading.Event()
    lock = threading.Lock()
    started = [0]

    def run(label: str, seed: int) -> None:
        run_folder = folder / slug(label) / f"seed_{seed}"
        run_folder.mkdir(parents=True, exist_ok=True)
        trial = folder / ".jobs" / f"{slug(label)}_seed_{seed}"
        log = run_folder / "console.log"
        with lock:
            slot = started[0]
            started[0] += 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads(jobs)), "MKL_NUM_THREADS": str(threads(jobs))}
        where = ""
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
        command = [sys.executable, "-m", "experiments.cli", "study", str(path), *overrides,
                   f"--model={label}", f"--seed={seed}", f"--trial_dir={trial}"]
        print(f"[lits study] {label}, seed {seed}: started{where} (console: {log})", flush=True)
        with open(log, "a") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            stop.set()
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise DataError(f"{label}, seed {seed} failed (exit {code}); last lines of {log}:\n{tail}")
        results[label][seed] = json.loads((trial / "metrics.json").read_text())
        print(f"[lits study] {label}, seed {seed}: done", flush=True)

    def chain(runs: list[tuple[str, int]]) -> None:
        for label, seed in runs:
            if stop.is_set():
                return
            run(label, seed)

    _preprocess(study, overrides)
    chains = [[(label, seed) for label in study["models"]] for seed in study["seeds"]]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(chain, c) for c in chains if c]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    return results
