"""A study's settings: its YAML (``load_study``), its command-line options and the overrides each model's runs receive.

A study file::

    name: cmunet_table1
    baseline: U-Net                      # the model the others are tested against
    seeds: [0, 1, 2]                     # or an integer N for seeds 0..N-1
    models:                              # label -> experiment (a `lits fit` config or a `lits run` stages file)
      U-Net: experiments/baseline_unet.yaml
      PU-Net: experiments/pu_net.yaml
      CMU-Net: experiments/cmunet.yaml
    args: ["--trainer.max_epochs=100"]   # optional overrides for every run
    inc: false                           # true for mask-mining experiments (see experiments/commands/study.py)
    table: segmentation                  # or lits_liver_lesion (the mask-mining paper's Table 1)
    rows: {U-Net: U-Net, ...}            # optional: which models are table rows, under which label
    share_stages: false                  # true: stages several models have alike are trained once per seed
    jobs: 1                              # runs at once (--jobs=K overrides; see experiments/commands/study_jobs.py)
    runs_per_device: 1                   # or: runs per GPU (the CPU: one device), so jobs = devices x N

Every mistake in it is a one-line ``ConfigError``, raised before any run starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from datamodules.errors import ConfigError
from experiments.commands.stages import load_experiment, normalise_overrides
from experiments.commands.study_tables import TABLES

# The study's own command-line options; every other --key=value is an override for its runs
STUDY_OPTIONS = ("model", "seed", "sweep", "from_sweep", "trial_dir", "jobs", "runs_per_device")


def load_study(path: str | Path) -> dict:
    """Read and check a study file: its settings with defaults filled in and experiment paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; pass a YAML with `models:` and `seeds:`, e.g. experiments/studies/quickstart.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    models = spec.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{path}: no `models:` mapping of label -> experiment file")
    for label, experiment in models.items():
        found = [p for p in (Path(experiment), path.parent / experiment) if p.is_file()]
        if not found:
            raise ConfigError(f"{path}: model {label!r} names experiment file {experiment}, which does not exist")
        models[label] = found[0]
        load_experiment(found[0])  # a broken experiment fails now, not after hours of other models
    baseline = spec.get("baseline", next(iter(models)))
    if baseline not in models:
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the models {list(models)}")
    seeds = spec.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    table = spec.get("table", "segmentation")
    if table not in TABLES:
        raise ConfigError(f"{path}: table {table!r} is not one of {', '.join(TABLES)}")
    rows = spec.get("rows") or {label: label for label in models}
    if not isinstance(rows, dict) or any(model not in models for model in rows.values()):
        raise ConfigError(f"{path}: `rows:` maps a table row's label to one of the models {list(models)}; got {rows!r}")
    if not spec.get("inc") and baseline not in rows.values():
        raise ConfigError(f"{path}: the baseline {baseline!r} must be one of the table's rows {list(rows.values())}")
    return {"name": spec.get("name") or path.stem, "models": models, "baseline": baseline, "seeds": seeds,
            "args": list(spec.get("args", [])), "inc": bool(spec.get("inc", False)), "table": table, "rows": rows,
            "share_stages": bool(spec.get("share_stages", False)), "jobs": spec.get("jobs"),
            "runs_per_device": spec.get("runs_per_device")}


def slug(label: str) -> str:
    """A model's label as a folder name: ``"2D, dice"`` -> ``2D_dice``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def run_folder(folder: Path, label: str, seed: int) -> Path:
    """The run folder of one model at one seed, in the study's folder."""
    return folder / slug(label) / f"seed_{seed}"


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The study's own options (--model, --seed, --sweep, --from_sweep, --trial_dir, --jobs, --runs_per_device) and the overrides for every run."""
    options, rest = {}, []
    for arg in normalise_overrides(argv):
        key, _, value = arg[2:].partition("=")
        if key in STUDY_OPTIONS:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def as_seed(value: str) -> int:
    """``--seed=S`` as an integer."""
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--seed must be an integer, got {value!r}") from None


def model_overrides(study: dict, label: str, overrides: list[str]) -> list[str]:
    """The overrides one model's runs receive: all but those scoped to a stage that another model of the
    study has and this model's experiment lacks (``--liver.trainer.max_epochs=2`` or ``--liver_ckpt=PATH``
    for a model without a ``liver`` stage)."""
    stages = {label: {s["name"] for s in load_experiment(path)[1]} for label, path in study["models"].items()}
    foreign = set().union(*stages.values()) - stages[label]

    def scoped_to_foreign(arg: str) -> bool:
        key = arg[2:].split("=", 1)[0]
        return ("." in key and key.split(".", 1)[0] in foreign) or (key.endswith("_ckpt") and key[: -len("_ckpt")] in foreign)

    return [arg for arg in overrides if not scoped_to_foreign(arg)]
