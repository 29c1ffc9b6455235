"""The tables of ``lits study``: which figures a table holds, mean ± std over seeds, paired tests, and
the lesion voxel counts behind the mask-mining paper's Fig. 4. No training here: ``experiments/study.py``
runs the studies and calls these on their final figures."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.errors import ConfigError
from datamodules.io.atomic import replace_together

ERROR_TYPES = ("fp", "fn", "tp")  # the lesion error types of Fig. 4, in the figure's order

METRICS = {  # column title -> metrics.json key; the per-slice pair is the CMU-Net paper's convention
    "Dice (slice)": "test/dice_slice",
    "HD (slice, px)": "test/hd_slice_px",
    "Dice (volume)": "test/dice_volume",
    "HD95 (volume, mm)": "test/hd95_volume_mm",
    "HD (volume, mm)": "test/hd_volume_mm",
}
# the mask-mining paper's Table 1: per-case LiTS Dice of liver and lesions on the training, validation and test volumes
LITS_LIVER_LESION = {
    f"{part.capitalize()} Dice ({split})": f"{split}/{part}/dice" for split in ("train", "val", "test") for part in ("liver", "lesion")
}


@dataclass(frozen=True)
class Table:
    metrics: dict[str, str]  # column title -> metrics.json key (``train/...``: the training-volume evaluation)
    caption: str  # what the figures are, for the line under the table
    figure: str  # the study's figure: "qualitative" (CT, truth, predictions) or "lesion_error_types" (Fig. 4)
    sweep_metric: str  # what a W&B sweep of the study reports as its metric

    @property
    def evaluates_training_volumes(self) -> bool:
        return any(key.startswith("train/") for key in self.metrics.values())


TABLES = {
    "segmentation": Table(METRICS, "Test-set figures", "qualitative", "test/dice_volume"),
    "lits_liver_lesion": Table(LITS_LIVER_LESION, "Per-case Dice (LiTS) on the training (train), validation (val) and test volumes",
                               "lesion_error_types", "val/lesion/dice"),
}


def split_protocol(split: str, split_seed: int, runs: int) -> str:
    """The split protocol in words, for the table's caption: ``split: fixed`` (the papers': every run on one split,
    only the model seed varies) or ``split: per_seed`` (each seed draws its own split, so the spread includes the split's)."""
    if split == "fixed":
        return f"one fixed split (split seed {split_seed}), {runs} runs"
    return f"a new split per seed, {runs} runs"


def paired_tests(values: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """(paired t-test p, Wilcoxon signed-rank p) of ``values`` against ``baseline`` over seeds; NaN when undefined."""
    if len(values) < 2 or np.allclose(values, baseline):
        return math.nan, math.nan
    from scipy import stats  # here: a study's runs import this module and never test

    t_p = float(stats.ttest_rel(values, baseline).pvalue)
    try:
        w_p = float(stats.wilcoxon(values, baseline).pvalue)
    except ValueError:
        w_p = math.nan
    return t_p, w_p


def _mean_and_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std over seeds; std 0 for one seed, both NaN for none."""
    if not len(values):
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(results: dict[str, dict[int, dict]], baseline: str, references: dict[str, str] | None = None,
              metrics: dict[str, str] | None = None) -> list[dict]:
    """Rows of the table: per model, mean/std per metric and paired p-values against its reference.

    ``references`` maps a model to the model it is tested against (default: every model but the
    baseline against the baseline); a model without a reference gets no p-values. A model with one also
    gets its ``reference`` and the mean and std over seeds of its paired differences to it (``<title>
    difference mean`` and ``... std``; with ``before_and_after``: mining's gain). Runs are paired by seed,
    never by their order in ``results`` (runs collected from W&B arrive in any order): the tests and the
    differences are over the seeds both the model and its reference have (``paired runs``; ``<title> pairs``:
    those of them that report the figure); the mean and std over all of the model's runs. ``metrics``: column
    title -> key (default ``METRICS``). A key no run reports (e.g. test figures without a test split) gives
    NaN; one some runs lack is taken over the runs (and pairs) that have it.
    """
    metrics = METRICS if metrics is None else metrics
    references = references if references is not None else {label: baseline for label in results if label != baseline}
    rows = []
    for label, runs in results.items():
        row = {"model": label, "runs": len(runs)}
        reference = references.get(label)
        for title, key in metrics.items():
            own = np.array([runs[s][key] for s in sorted(runs) if key in runs[s]], dtype=float)
            row[f"{title} mean"], row[f"{title} std"] = _mean_and_std(own)
            if reference is None:
                continue
            paired = sorted(s for s in runs if key in runs[s] and key in results[reference].get(s, {}))
            values, reference_values = (np.array([source[s][key] for s in paired], dtype=float) for source in (runs, results[reference]))
            t_p, w_p = paired_tests(values, reference_values)
            row[f"{title} t-test p"], row[f"{title} Wilcoxon p"], row[f"{title} pairs"] = t_p, w_p, len(paired)
            row[f"{title} difference mean"], row[f"{title} difference std"] = _mean_and_std(values - reference_values)
        if reference is not None:
            row["reference"], row["paired runs"] = reference, sum(s in results[reference] for s in runs)
        rows.append(row)
    return rows


def _before(key: str) -> str:
    """``test/dice_volume`` -> ``test/before/dice_volume``: the mined base's figure in a mask-mining run."""
    split, _, rest = key.partition("/")
    return f"{split}/before/{rest}"


def before_and_after(results: dict[str, dict[int, dict]], metrics: dict[str, str] | None = None) -> tuple[dict[str, dict[int, dict]], dict[str, str]]:
    """Mask-mining studies: each model's row before mining (its run's ``<split>/before/*`` figures, the
    base model evaluated in the same run) and its "Inc." row after, tested against the row before."""
    metrics = METRICS if metrics is None else metrics
    expanded, references = {}, {}
    for label, runs in results.items():
        missing = [s for s, m in runs.items() if any(k in m and _before(k) not in m for k in metrics.values())]
        if missing:
            raise ConfigError(f"model {label!r}: its runs (seed {missing[0]}) report no <split>/before/* figures (e.g. test/before/*); "
                            "`inc: true` needs mask-mining experiments")
        expanded[label] = {s: {k: m[_before(k)] for k in metrics.values() if k in m} for s, m in runs.items()}
        expanded[f"{label} Inc."] = runs
        references[f"{label} Inc."] = label
    return expanded, references


def _cell(row: dict, title: str, figures: str = "") -> str:
    """``figures``: "" for the row's own figures, "difference " for its paired differences to its reference."""
    mean, std = row[f"{title} {figures}mean"], row[f"{title} {figures}std"]
    if math.isnan(mean):
        return "n/a"
    cell = f"{mean:+.4f} ± {std:.4f}" if figures else f"{mean:.4f} ± {std:.4f}"
    if f"{title} t-test p" in row:
        cell += f" (p={row[f'{title} t-test p']:.3g} t, {row[f'{title} Wilcoxon p']:.3g} W)"
    return cell


def _table_lines(rows: list[dict], metrics: dict[str, str], figures: str = "") -> list[str]:
    header = ["Model", "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = row["reference"] if figures else row["model"]
        # a seed the reference lacks (or it this model's): the tests are over fewer pairs than the model has runs
        runs = f"{row['runs']} ({row['paired runs']} paired)" if row.get("paired runs", row["runs"]) < row["runs"] else str(row["runs"])
        lines.append("| " + " | ".join([label, runs, *(_cell(row, title, figures) for title in metrics)]) + " |")
    return lines


def markdown_table(rows: list[dict], baseline: str, inc: bool = False, metrics: dict[str, str] | None = None,
                   caption: str = "Test-set figures", protocol: str | None = None) -> str:
    """The table; with ``inc`` a second one under it, mining's gain per model: the Inc. rows give the figures
    after mining, whose difference to the row before is what mining is judged by, and whose spread over seeds
    neither row's std gives (the seeds are paired). ``protocol``: the split protocol in words (``split_protocol``),
    in the caption."""
    metrics = METRICS if metrics is None else metrics
    lines = _table_lines(rows, metrics)
    against = "the same model before mask mining (Inc.: after)" if inc else baseline
    over = f"mean ± std over seeds, {protocol}" if protocol else "mean ± std over seeds"
    lines.append(f"\n{caption}, {over}; p: paired t-test (t) and Wilcoxon signed-rank (W), runs paired by seed, against {against}.")
    mined = [row for row in rows if "reference" in row]
    if inc and mined:
        lines += ["", *_table_lines(mined, metrics, "difference ")]
        lines.append("\nMining's gain: after (Inc.) minus before, per seed, mean ± std over the paired seeds; "
                     "p: paired t-test (t) and Wilcoxon signed-rank (W) of after against before.")
    return "\n".join(lines)


def write_tables(folder: Path, rows: list[dict], baseline: str, inc: bool = False, metrics: dict[str, str] | None = None,
                 caption: str = "Test-set figures", protocol: str | None = None) -> str:
    """``results.md``, ``results.csv`` and ``results.json`` in ``folder``, replaced together (a kill leaves the old three or
    the new three); the markdown table."""
    table = markdown_table(rows, baseline, inc, metrics, caption, protocol)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)

    replace_together([(folder / "results.md", lambda tmp: tmp.write_text(table + "\n")),
                      (folder / "results.csv", write_csv),
                      (folder / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=2) + "\n"))])
    return table


COUNT_PARTS = ("intersection_voxels", "pred_voxels", "truth_voxels")


def with_lesion_counts(figures: dict, stage_folder: Path, split: str = "val") -> dict:
    """``figures`` with the lesion voxel counts ``<split>/lesion/{intersection,pred,truth}_voxels`` and their
    ``<split>/before/lesion/...``, read from the mask-mining stage's error report (``<split>_lesion_error_types.csv``,
    its ``total`` row) where the figures lack them."""
    keys = [f"{split}/{when}lesion/{k}" for when in ("", "before/") for k in COUNT_PARTS]
    report = stage_folder / f"{split}_lesion_error_types.csv"
    if all(k in figures for k in keys) or not report.is_file():
        return figures
    with open(report, newline="") as handle:
        total = next((row for row in csv.DictReader(handle) if row["volume"] == "total"), None)
    if total is None:
        return figures
    added = {}
    for when, column in (("", "after"), ("before/", "before")):
        tp, fp, fn = (int(total[f"{t}_{column}"]) for t in ("tp", "fp", "fn"))
        added |= {f"{split}/{when}lesion/intersection_voxels": tp, f"{split}/{when}lesion/pred_voxels": tp + fp,
                  f"{split}/{when}lesion/truth_voxels": tp + fn}
    return added | figures


def lesion_error_counts(results: dict[str, dict[int, dict]], split: str = "val") -> dict[str, dict[str, dict[str, int]]]:
    """Per model, lesion FP / FN / TP voxels before and after mining summed over its seeds:
    ``{label: {"before": {"fp": .., "fn": .., "tp": ..}, "after": {...}}}``; models whose runs lack the counts are left out."""
    counts = {}
    for label, runs in results.items():
        summed = {when: dict.fromkeys(ERROR_TYPES, 0) for when in ("before", "after")}
        try:
            for figures in runs.values():
                for when, prefix in (("before", f"{split}/before/lesion/"), ("after", f"{split}/lesion/")):
                    tp, pred, truth = (int(figures[prefix + k]) for k in COUNT_PARTS)
                    for t, value in zip(ERROR_TYPES, (pred - tp, truth - tp, tp)):
                        summed[when][t] += value
        except KeyError:
            continue
        if runs:
            counts[label] = summed
    return counts
