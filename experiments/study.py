"""``lits study STUDY.yaml [--key=value ...]``: every model of a study for N paired seeds, then a Table-1-style table.

A study file::

    name: cmunet_table1
    baseline: U-Net                      # the model the others are tested against
    seeds: [0, 1, 2]                     # or an integer N for seeds 0..N-1
    models:                              # label -> experiment (a `lits fit` config or a `lits run` stages file)
      U-Net: experiments/baseline_unet.yaml
      PU-Net: experiments/pu_net.yaml
      CMU-Net: experiments/cmunet.yaml
    args: ["--trainer.max_epochs=100"]   # optional overrides for every run
    inc: false                           # true for mask-mining experiments: see below

Seeds are paired: seed ``s`` sets ``--seed_everything=s`` (the same initial weights for the layers
models share, which the backbone builds in the same order) and ``--data.split_seed=s`` (the same
volumes in every split). Runs land in ``<default_root_dir>/<name>/<model>/seed_<s>/`` and a killed
study resumes: finished runs are skipped, an unfinished one continues from its last checkpoint.

The table (``results.md``, ``results.csv``, ``results.json`` in the study folder, printed at the
end) gives mean ± std over seeds of the test Dice and Hausdorff, per slice (px) and per volume
(mm), and for each model against the baseline the paired t-test and Wilcoxon signed-rank p-values
(scipy) over the seeds. With ``inc: true`` (mask-mining experiments) every model gets two rows,
as in the mask-mining paper's Table 1: before mining (the base evaluated in the same run,
``test/before/*``) and "Inc." after, tested against the row before.

Spread over machines, as a W&B grid sweep over model and seed:

    lits study STUDY.yaml --sweep [--key=value ...]
        writes <study folder>/sweep.yaml; online it registers the sweep and prints the
        `wandb agent` command to start on each machine; offline it runs the grid here with
        `lits sweep`, then prints the table.
    lits study STUDY.yaml --model=LABEL --seed=S [--key=value ...]
        one run of the study (what each agent runs).
    lits study STUDY.yaml --from_sweep=ENTITY/PROJECT/SWEEP_ID
        the table from the sweep's finished runs (their W&B summaries).
With a shared run folder, plain ``lits study STUDY.yaml`` also builds the table: it skips finished runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from datamodules import DataError
from experiments.stages import load_experiment, normalise_overrides, override_value, run_experiment
from experiments.study_figure import qualitative_figure

METRICS = {  # column title -> metrics.json key; the per-slice pair is the CMU-Net paper's convention
    "Dice (slice)": "test/dice_slice",
    "HD (slice, px)": "test/hd_slice_px",
    "Dice (volume)": "test/dice_volume",
    "HD95 (volume, mm)": "test/hd95_volume_mm",
    "HD (volume, mm)": "test/hd_volume_mm",
}


def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"study file {path} not found; pass a YAML with `models:` and `seeds:`, e.g. experiments/studies/quickstart.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    models = spec.get("models")
    if not isinstance(models, dict) or not models:
        raise DataError(f"{path}: no `models:` mapping of label -> experiment file")
    for label, experiment in models.items():
        found = [p for p in (Path(experiment), path.parent / experiment) if p.is_file()]
        if not found:
            raise DataError(f"{path}: model {label!r} names experiment file {experiment}, which does not exist")
        models[label] = found[0]
        load_experiment(found[0])  # a broken experiment fails now, not after hours of other models
    baseline = spec.get("baseline", next(iter(models)))
    if baseline not in models:
        raise DataError(f"{path}: baseline {baseline!r} is not one of the models {list(models)}")
    seeds = spec.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    return {"name": spec.get("name") or path.stem, "models": models, "baseline": baseline, "seeds": seeds,
            "args": list(spec.get("args", [])), "inc": bool(spec.get("inc", False))}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def paired_tests(values: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """(paired t-test p, Wilcoxon signed-rank p) of ``values`` against ``baseline`` over seeds; NaN when undefined."""
    if len(values) < 2 or np.allclose(values, baseline):
        return math.nan, math.nan
    t_p = float(stats.ttest_rel(values, baseline).pvalue)
    try:
        w_p = float(stats.wilcoxon(values, baseline).pvalue)
    except ValueError:
        w_p = math.nan
    return t_p, w_p


def summarize(results: dict[str, dict[int, dict]], baseline: str, references: dict[str, str] | None = None) -> list[dict]:
    """Rows of the table: per model, mean/std per metric and paired p-values against its reference.

    ``references`` maps a model to the model it is tested against (default: every model but the
    baseline against the baseline); a model without a reference gets no p-values.
    """
    references = references if references is not None else {label: baseline for label in results if label != baseline}
    rows = []
    for label, runs in results.items():
        row = {"model": label, "runs": len(runs)}
        reference = references.get(label)
        seeds = sorted(s for s in runs if reference is None or s in results[reference])
        for title, key in METRICS.items():
            values = np.array([runs[s][key] for s in seeds], dtype=float)
            row[f"{title} mean"] = float(values.mean())
            row[f"{title} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            if reference is not None:
                t_p, w_p = paired_tests(values, np.array([results[reference][s][key] for s in seeds], dtype=float))
                row[f"{title} t-test p"], row[f"{title} Wilcoxon p"] = t_p, w_p
        rows.append(row)
    return rows


def before_and_after(results: dict[str, dict[int, dict]]) -> tuple[dict[str, dict[int, dict]], dict[str, str]]:
    """Mask-mining studies: each model's row before mining (its run's ``test/before/*`` figures, the
    base model evaluated in the same run) and its "Inc." row after, tested against the row before."""
    expanded, references = {}, {}
    for label, runs in results.items():
        missing = [s for s, m in runs.items() if any(k.replace("test/", "test/before/", 1) not in m for k in METRICS.values())]
        if missing:
            raise DataError(f"model {label!r}: its runs (seed {missing[0]}) report no test/before/* figures; `inc: true` needs mask-mining experiments")
        expanded[label] = {s: {k: m[k.replace("test/", "test/before/", 1)] for k in METRICS.values()} for s, m in runs.items()}
        expanded[f"{label} Inc."] = runs
        references[f"{label} Inc."] = label
    return expanded, references


def markdown_table(rows: list[dict], baseline: str, inc: bool = False) -> str:
    header = ["Model", "runs", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], str(row["runs"])]
        for title in METRICS:
            cell = f"{row[f'{title} mean']:.4f} ± {row[f'{title} std']:.4f}"
            if f"{title} t-test p" in row:
                cell += f" (p={row[f'{title} t-test p']:.3g} t, {row[f'{title} Wilcoxon p']:.3g} W)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    against = "the same model before mask mining (Inc.: after)" if inc else baseline
    lines.append(f"\nTest-set figures, mean ± std over seeds; p: paired t-test (t) and Wilcoxon signed-rank (W) against {against}.")
    return "\n".join(lines)


def write_tables(folder: Path, rows: list[dict], baseline: str, inc: bool = False) -> str:
    table = markdown_table(rows, baseline, inc)
    (folder / "results.md").write_text(table + "\n")
    (folder / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return table


STUDY_OPTIONS = ("model", "seed", "sweep", "from_sweep", "trial_dir")


def _split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The study's own options (--model, --seed, --sweep, --from_sweep, --trial_dir) and the overrides for every run."""
    options, rest = {}, []
    for arg in normalise_overrides(argv):
        key, _, value = arg[2:].partition("=")
        if key in STUDY_OPTIONS:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def run_one(study: dict, folder: Path, label: str, seed: int, overrides: list[str]) -> dict:
    """One model at one seed (resumable); returns its final metrics."""
    if label not in study["models"]:
        raise DataError(f"unknown model {label!r}; the study has {list(study['models'])}")
    print(f"[lits study] {label}, seed {seed}", flush=True)
    run_folder = folder / _slug(label) / f"seed_{seed}"
    seeded = [f"--seed_everything={seed}", f"--data.split_seed={seed}"]
    run_experiment(study["models"][label], overrides + seeded, run_folder=run_folder)
    return json.loads((run_folder / "metrics.json").read_text())


def sweep_config(path: str | Path, study: dict, overrides: list[str]) -> dict:
    """A W&B grid sweep over model and seed whose every run is `lits study PATH --model=.. --seed=..`."""
    return {
        "name": study["name"],
        "program": "lits",
        "method": "grid",
        "metric": {"name": "test/dice_volume", "goal": "maximize"},
        "parameters": {"model": {"values": list(study["models"])}, "seed": {"values": study["seeds"]}},
        "command": ["lits", "study", str(path), *overrides, "${args}"],
    }


def run_study(path: str | Path, argv: list[str]) -> Path:
    study = load_study(path)
    options, argv_overrides = _split_options(argv)
    overrides = normalise_overrides(study["args"]) + argv_overrides
    folder = Path(override_value(overrides, "trainer.default_root_dir") or "runs") / study["name"]
    if "model" in options or "seed" in options:
        if "model" not in options or "seed" not in options:
            raise DataError("one run of a study needs both --model=LABEL and --seed=S")
        final = run_one(study, folder, options["model"], _as_seed(options["seed"]), overrides)
        if options.get("trial_dir"):  # `lits sweep` reads each trial's figures from its own folder
            Path(options["trial_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(options["trial_dir"]) / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        return folder
    if "from_sweep" in options:
        results = results_from_wandb(options["from_sweep"], study)
    else:
        if "sweep" in options:
            if run_as_sweep(path, study, folder, argv_overrides):
                return folder
        results = {label: {} for label in study["models"]}
        for seed in study["seeds"]:
            for label in study["models"]:
                results[label][seed] = run_one(study, folder, label, seed, overrides)
    return report(study, folder, results, overrides, figure="from_sweep" not in options)


def _as_seed(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"--seed must be an integer, got {value!r}") from None


def run_as_sweep(path: str | Path, study: dict, folder: Path, overrides: list[str]) -> bool:
    """Write the grid sweep; online, register it and stop (True); offline, run it here (False: go on to the table)."""
    from experiments.sweep import run_sweep

    folder.mkdir(parents=True, exist_ok=True)
    config = sweep_config(path, study, overrides)
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(config, sort_keys=False))
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        import wandb

        sweep_id = wandb.sweep(config, project=override_value(overrides, "wandb_project") or "lits-suite")
        print(f"[lits study] sweep {sweep_id} registered ({sweep_file}). On each machine run:\n"
              f"  wandb agent <entity>/<project>/{sweep_id}\nthen build the table with:\n"
              f"  lits study {path} --from_sweep=<entity>/<project>/{sweep_id}")
        return True
    count = len(study["models"]) * len(study["seeds"])
    run_sweep(sweep_file, [f"--count={count}", f"--trainer.default_root_dir={folder / 'sweep'}"])
    return False


def results_from_wandb(sweep_path: str, study: dict) -> dict[str, dict[int, dict]]:
    """Each (model, seed)'s final figures from the summaries of a W&B sweep's finished runs."""
    import wandb

    results: dict[str, dict[int, dict]] = {label: {} for label in study["models"]}
    for run in wandb.Api().sweep(sweep_path).runs:
        label, seed = run.config.get("model"), run.config.get("seed")
        if run.state == "finished" and label in results and seed is not None:
            results[label][int(seed)] = dict(run.summary)
    missing = [f"{label}/seed {s}" for label in results for s in study["seeds"] if s not in results[label]]
    if missing:
        raise DataError(f"sweep {sweep_path} has no finished run for {', '.join(missing)}; let its agents finish, then rerun")
    return results


def report(study: dict, folder: Path, results: dict[str, dict[int, dict]], overrides: list[str], figure: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    references = None
    if study["inc"]:
        results, references = before_and_after(results)
    rows = summarize(results, study["baseline"], references)
    table = write_tables(folder, rows, study["baseline"], study["inc"])
    if figure:  # the figure needs the run folders, which a sweep spread over machines does not have here
        first_seed = study["seeds"][0]
        finals = {label: _final_stage(folder / _slug(label) / f"seed_{first_seed}") for label in study["models"]}
        qualitative_figure(finals, folder / "qualitative.png")
    log_to_wandb(study["name"], folder, rows, project=override_value(overrides, "wandb_project") or "lits-suite")
    print(f"\n{table}\n\n[lits study] tables in {folder}/results.{{md,csv,json}}" + (f", figure {folder / 'qualitative.png'}" if figure else ""))
    return folder


def _final_stage(run_folder: Path) -> Path:
    stages = json.loads((run_folder / "metrics.json").read_text())["stages"]
    return Path(list(stages.values())[-1])


def log_to_wandb(name: str, folder: Path, rows: list[dict], project: str) -> None:
    """The table and the figure as one W&B run of job type `study` (offline without a key, like every run)."""
    import wandb

    columns = list(dict.fromkeys(k for row in rows for k in row))
    run = wandb.init(project=project, name=name, job_type="study", dir=str(folder))
    logged = {"study/results": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])}
    if (folder / "qualitative.png").is_file():
        logged["study/qualitative"] = wandb.Image(str(folder / "qualitative.png"))
    run.log(logged)
    run.finish()


def study_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_study(argv[0], argv[1:])
