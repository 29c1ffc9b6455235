"""A study spread over machines as a W&B grid sweep over model and seed (``lits study STUDY.yaml --sweep``), and its
table from the sweep's finished runs (``--from_sweep=ENTITY/PROJECT/SWEEP_ID``); see experiments/commands/study.py."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from datamodules.errors import DataError
from datamodules.io.atomic import write_text_atomically
from experiments.commands import sweep
from experiments.commands.stages import override_value
from experiments.commands.study_tables import TABLES


def sweep_config(path: str | Path, study: dict, overrides: list[str]) -> dict:
    """A W&B grid sweep over model and seed whose every run is `lits study PATH --model=.. --seed=..`."""
    return {
        "name": study["name"],
        "program": "lits",
        "method": "grid",
        "metric": {"name": TABLES[study.get("table", "segmentation")].sweep_metric, "goal": "maximize"},
        "parameters": {"model": {"values": list(study["models"])}, "seed": {"values": study["seeds"]}},
        "command": ["lits", "study", str(path), *overrides, "${args}"],
    }


def run_as_sweep(path: str | Path, study: dict, folder: Path, overrides: list[str]) -> bool:
    """Write the grid sweep; online, register it and stop (True); offline, run it here (False: go on to the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = sweep_config(path, study, overrides)
    sweep_file = folder / "sweep.yaml"
    write_text_atomically(sweep_file, yaml.safe_dump(config, sort_keys=False))
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        import wandb  # here, not at the top: the study's own process orchestrates and does not import W&B otherwise

        sweep_id = wandb.sweep(config, project=override_value(overrides, "wandb_project") or "lits-suite")
        print(f"[lits study] sweep {sweep_id} registered ({sweep_file}). On each machine run:\n"
              f"  wandb agent <entity>/<project>/{sweep_id}\nthen build the table with:\n"
              f"  lits study {path} --from_sweep=<entity>/<project>/{sweep_id}")
        return True
    count = len(study["models"]) * len(study["seeds"])
    sweep.run_sweep(sweep_file, [f"--count={count}", f"--trainer.default_root_dir={folder / 'sweep'}"])
    return False


def results_from_wandb(sweep_path: str, study: dict) -> dict[str, dict[int, dict]]:
    """Each (model, seed)'s final figures from the summaries of a W&B sweep's finished runs, keyed by seed: the API lists
    runs in any order, and the table pairs a model's runs with its reference's by seed. Runs of seeds the study does
    not have are left out; of several finished runs of one (model, seed) (a rerun), the latest created is used."""
    import wandb

    chosen: dict[tuple[str, int], object] = {}
    repeated: set[tuple[str, int]] = set()
    for run in wandb.Api().sweep(sweep_path).runs:
        label, seed = run.config.get("model"), run.config.get("seed")
        if run.state != "finished" or label not in study["models"] or seed is None or int(seed) not in study["seeds"]:
            continue
        key = (label, int(seed))
        if key in chosen:
            repeated.add(key)
        if key not in chosen or _created(run) > _created(chosen[key]):
            chosen[key] = run
    for label, seed in sorted(repeated, key=lambda k: (list(study["models"]).index(k[0]), k[1])):
        latest = getattr(chosen[label, seed], "id", "?")
        print(f"[lits study] sweep {sweep_path}: several finished runs of {label}/seed {seed}; the latest, {latest}, is used")
    missing = [f"{label}/seed {s}" for label in study["models"] for s in study["seeds"] if (label, s) not in chosen]
    if missing:
        raise DataError(f"sweep {sweep_path} has no finished run for {', '.join(missing)}; let its agents finish, then rerun")
    return {label: {s: dict(chosen[label, s].summary) for s in study["seeds"]} for label in study["models"]}


def _created(run) -> tuple[str, str]:
    """When a W&B run was created (ISO 8601 text, which sorts as time does), then its id: an order independent of the API's."""
    return str(getattr(run, "created_at", "") or ""), str(getattr(run, "id", "") or "")
