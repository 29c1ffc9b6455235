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

Seeds are paired: seed ``s`` sets ``--seed_everything=s`` (the same initial weights for the layers
models share, which the backbone builds in the same order) and ``--data.split_seed=s`` (the same
volumes in every split). Runs land in ``<default_root_dir>/<name>/<model>/seed_<s>/`` and a killed
study resumes: finished runs are skipped, an unfinished one continues from its last checkpoint.

The table (``results.md``, ``results.csv``, ``results.json`` in the study folder, printed at the
end) gives mean ± std over seeds of the test Dice and Hausdorff, per slice (px) and per volume
(mm), and for each model against the baseline the paired t-test and Wilcoxon signed-rank p-values
(scipy) over the seeds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from datamodules import DataError
from experiments.stages import normalise_overrides, override_value, run_experiment
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
    baseline = spec.get("baseline", next(iter(models)))
    if baseline not in models:
        raise DataError(f"{path}: baseline {baseline!r} is not one of the models {list(models)}")
    seeds = spec.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    return {"name": spec.get("name") or path.stem, "models": models, "baseline": baseline, "seeds": seeds, "args": list(spec.get("args", []))}


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


def summarize(results: dict[str, dict[int, dict]], baseline: str) -> list[dict]:
    """Rows of the table: per model, mean/std per metric and the paired p-values against the baseline."""
    rows = []
    seeds = sorted(results[baseline])
    for label, runs in results.items():
        row = {"model": label, "runs": len(runs)}
        for title, key in METRICS.items():
            values = np.array([runs[s][key] for s in seeds if s in runs], dtype=float)
            row[f"{title} mean"] = float(values.mean())
            row[f"{title} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            if label != baseline:
                paired = [s for s in seeds if s in runs]
                t_p, w_p = paired_tests(values, np.array([results[baseline][s][key] for s in paired]))
                row[f"{title} t-test p"], row[f"{title} Wilcoxon p"] = t_p, w_p
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], baseline: str) -> str:
    header = ["Model", "runs", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], str(row["runs"])]
        for title in METRICS:
            cell = f"{row[f'{title} mean']:.4f} ± {row[f'{title} std']:.4f}"
            if row["model"] != baseline:
                cell += f" (p={row[f'{title} t-test p']:.3g} t, {row[f'{title} Wilcoxon p']:.3g} W)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nTest-set figures, mean ± std over seeds; p: paired t-test (t) and Wilcoxon signed-rank (W) against {baseline}.")
    return "\n".join(lines)


def write_tables(folder: Path, rows: list[dict], baseline: str) -> str:
    table = markdown_table(rows, baseline)
    (folder / "results.md").write_text(table + "\n")
    (folder / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return table


def run_study(path: str | Path, argv: list[str]) -> Path:
    study = load_study(path)
    overrides = normalise_overrides(study["args"] + argv)
    folder = Path(override_value(overrides, "trainer.default_root_dir") or "runs") / study["name"]
    results: dict[str, dict[int, dict]] = {label: {} for label in study["models"]}
    for seed in study["seeds"]:
        for label, experiment in study["models"].items():
            print(f"[lits study] {label}, seed {seed}", flush=True)
            run_folder = folder / _slug(label) / f"seed_{seed}"
            seeded = [f"--seed_everything={seed}", f"--data.split_seed={seed}"]
            run_experiment(experiment, overrides + seeded, run_folder=run_folder)
            results[label][seed] = json.loads((run_folder / "metrics.json").read_text())
    rows = summarize(results, study["baseline"])
    table = write_tables(folder, rows, study["baseline"])
    first_seed = study["seeds"][0]
    finals = {label: _final_stage(folder / _slug(label) / f"seed_{first_seed}") for label in study["models"]}
    qualitative_figure(finals, folder / "qualitative.png")
    log_to_wandb(study["name"], folder, rows, project=override_value(overrides, "wandb_project") or "lits-suite")
    print(f"\n{table}\n\n[lits study] tables in {folder}/results.{{md,csv,json}}, figure {folder / 'qualitative.png'}")
    return folder


def _final_stage(run_folder: Path) -> Path:
    stages = json.loads((run_folder / "metrics.json").read_text())["stages"]
    return Path(list(stages.values())[-1])


def log_to_wandb(name: str, folder: Path, rows: list[dict], project: str) -> None:
    """The table and the figure as one W&B run of job type `study` (offline without a key, like every run)."""
    import wandb

    columns = list(dict.fromkeys(k for row in rows for k in row))
    run = wandb.init(project=project, name=name, job_type="study", dir=str(folder))
    run.log({"study/results": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows]),
             "study/qualitative": wandb.Image(str(folder / "qualitative.png"))})
    run.finish()


def study_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_study(argv[0], argv[1:])
