"""A study's settings: its YAML (``load_study``), its command-line options and the overrides each model's runs receive.

A study file::

    name: cmunet_table1
    baseline: U-Net                      # the model the others are tested against
    seeds: [0, 1, 2]                     # or an integer N for seeds 0..N-1
    split: per_seed                      # or fixed: one train/val/test split for every seed (see seed_overrides)
    split_seed: 0                        # split: fixed only: the seed that draws that split (default 0)
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
    launcher: slurm                      # optional: one SLURM job per run (experiments/commands/study_slurm.py)
    slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 600}   # the jobs' resources

Its shape is declared in ``experiments/commands/yaml_schema.py`` (``Study``): a key it does not know, a value of
another type (``seeds: "10"``) or a name that is not a folder name is refused. Every mistake in it is a one-line
``ConfigError``, raised before any run starts.
"""

from __future__ import annotations

import re
from pathlib import Path


from datamodules.errors import ConfigError
from experiments.commands.names import check_name, inside
from experiments.commands.stages import load_experiment, normalise_overrides
from experiments.commands.study_tables import TABLES
from experiments.commands.yaml_schema import Study, read_yaml, validate

# The study's own command-line options; every other --key=value is an override for its runs
STUDY_OPTIONS = ("model", "seed", "sweep", "from_sweep", "trial_dir", "jobs", "runs_per_device", "launcher")


def load_study(path: str | Path) -> dict:
    """Read and check a study file: its settings with defaults filled in and experiment paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; pass a YAML with `models:` and `seeds:`, e.g. experiments/studies/quickstart.yaml")
    spec = read_yaml(path)
    spec = {} if spec is None else spec
    if isinstance(spec, dict) and not spec.get("models"):
        raise ConfigError(f"{path}: no `models:` mapping of label -> experiment file")
    study = validate(Study, spec, path)
    models = {}
    for label, experiment in study.models.items():
        found = [p for p in (Path(experiment), path.parent / experiment) if p.is_file()]
        if not found:
            raise ConfigError(f"{path}: model {label!r} names experiment file {experiment}, which does not exist")
        models[label] = found[0]
        load_experiment(found[0])  # a broken experiment fails now, not after hours of other models
    slugs = [slug(label) for label in models]
    if len(set(slugs)) < len(slugs):
        raise ConfigError(f"{path}: two model labels share a folder name ({', '.join(slugs)}); make them differ in letters or digits")
    baseline = study.baseline if study.baseline is not None else next(iter(models))
    if baseline not in models:
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the models {list(models)}")
    seeds = list(range(study.seeds)) if isinstance(study.seeds, int) else study.seeds
    if study.split_seed is not None and study.split != "fixed":
        raise ConfigError(f"{path}: split_seed applies to `split: fixed` only; with `split: per_seed` each run's split seed is its seed")
    if study.table not in TABLES:
        raise ConfigError(f"{path}: table {study.table!r} is not one of {', '.join(TABLES)}")
    rows = study.rows or {label: label for label in models}
    if any(model not in models for model in rows.values()):
        raise ConfigError(f"{path}: `rows:` maps a table row's label to one of the models {list(models)}; got {rows!r}")
    if not study.inc and baseline not in rows.values():
        raise ConfigError(f"{path}: the baseline {baseline!r} must be one of the table's rows {list(rows.values())}")
    return {"name": study.name or check_name(path.stem, f"{path}: name (from the file's name)"), "models": models,
            "baseline": baseline, "seeds": seeds, "split": study.split, "split_seed": study.split_seed or 0,
            "args": study.args, "inc": study.inc, "table": study.table, "rows": rows,
            "share_stages": study.share_stages, "jobs": study.jobs, "runs_per_device": study.runs_per_device,
            "launcher": study.launcher, "slurm": study.slurm}


def split_seed_of(study: dict, seed: int) -> int:
    """The data split's seed of the run at ``seed``: the seed itself (``split: per_seed``: a new train/val/test split
    per seed), or the study's ``split_seed`` for every seed (``split: fixed``: the papers' protocol, N runs on one split)."""
    return study.get("split_seed", 0) if study.get("split", "per_seed") == "fixed" else seed


def seed_overrides(study: dict, seed: int) -> list[str]:
    """What a run of the study at ``seed`` receives: the model seed (initial weights, sampling, augmentation) is the
    seed under either protocol; the split seed is ``split_seed_of``'s."""
    return [f"--seed_everything={seed}", f"--data.split_seed={split_seed_of(study, seed)}"]


def slug(label: str) -> str:
    """A model's label as a folder name: ``"2D, dice"`` -> ``2D_dice``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def run_folder(folder: Path, label: str, seed: int) -> Path:
    """The run folder of one model at one seed, in the study's folder (never outside it)."""
    return inside(folder, folder / slug(label) / f"seed_{seed}", f"model {label!r}'s run folder")


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The study's own options (--model, --seed, --sweep, --from_sweep, --trial_dir, --jobs, --runs_per_device, --launcher) and
    the overrides for every run."""
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
