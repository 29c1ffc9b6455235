"""``lits evaluate --pred DIR --truth DIR``: the LiTS benchmark's metrics of a folder of label maps.

The predictions may come from ``lits predict`` or any other tool. Files:

* predictions (top level of ``--pred`` only): ``segmentation-<id>.nii[.gz]`` or
  ``test-segmentation-<id>.nii[.gz]`` (LiTS submission names), or any ``<id>.nii[.gz]`` (MSD names).
  Probability maps ``*_probability.nii[.gz]`` (``lits predict --probabilities``) are ignored.
* ground truth: a LiTS folder (``segmentation-<id>.nii[.gz]`` in any sub-folder; ``volume-*`` files
  are ignored) or an MSD folder (``labelsTr/<id>.nii.gz``).

Cases are matched by id; every truth case needs a prediction (``--subset``: only the predicted ones are
evaluated) and every prediction a truth. Both label maps are read in nibabel's closest-canonical
orientation, so a prediction stored in another orientation than its truth (flipped or permuted axes with
the matching affine) is compared voxel for voxel with the right truth voxel. Arrays are then (X, Y, Z)
with spacing (sx, sy, sz) mm from the truth's header; the metrics (``lightning_modules.metrics.lits``)
do not depend on the axis order. Labels must be 0 background, 1 liver, 2 lesion: liver is ``>= 1``,
lesion ``== 2``.

Outputs, in ``--out`` (default ``<pred>/evaluation``), written only once every case has been evaluated, and replaced
together (``datamodules.io.atomic.replace_together``): a kill or a full disk leaves the three old files or the three
new ones, never a summary of one evaluation beside the cases of another:

* ``per_case.csv``: one row per case, ``id``, then ``liver_<figure>`` and ``lesion_<figure>``
  (``rvd`` is ``nan`` where the truth is empty and the prediction is not);
* ``summary.json``: ``summarize_cases`` of the liver and of the lesions, keys ``liver/<name>`` and
  ``lesion/<name>`` (an undefined mean RVD is ``null``);
* ``summary.md``: the table that is also printed.

Every bad input is a one-line error (``lits: error: ...``, exit status 2), raised before anything is written: a
``DataError`` for the files (``experiments/commands/evaluate_cases.py`` finds, pairs and reads them), a
``ConfigError`` for an ``--out`` that cannot be written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from datamodules.errors import ConfigError
from datamodules.io.atomic import replace_together
from experiments.commands.evaluate_cases import Case, check_cases, find_predictions, find_truth, match_cases, read_labels, some_ids
from lightning_modules.metrics.lits import CASE_KEYS, DETECTION_KEYS, evaluate_case, summarize_cases

STRUCTURES = ("liver", "lesion")
# Worker processes are spawned, not forked: forking a process whose torch / OpenMP threads have run can
# deadlock the child. (The tests fork, to skip each worker's seconds of imports.)
START_METHOD = "spawn"


# -- scoring ---------------------------------------------------------------------------------------
def evaluate_pair(case: Case, spacing: tuple[float, float, float], lesions: bool = True) -> tuple[str, dict[str, dict[str, float]]]:
    """Read one case's two label maps and compute its figures (runs in a worker process with --workers)."""
    pred, truth = read_labels(case.pred), read_labels(case.truth)
    return case.case_id, evaluate_case(pred, truth, spacing, lesions=lesions)


def _evaluate_all(cases: list[Case], spacings: dict, lesions: bool, workers: int) -> dict[str, dict[str, dict[str, float]]]:
    progress = tqdm(total=len(cases), desc="evaluate", unit="case", disable=None)
    results = {}
    try:
        if workers <= 1:
            for case in cases:
                case_id, figures = evaluate_pair(case, spacings[case.case_id], lesions)
                results[case_id] = figures
                progress.update()
        else:
            context = multiprocessing.get_context(START_METHOD)
            with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=context) as pool:
                pending = {pool.submit(evaluate_pair, case, spacings[case.case_id], lesions) for case in cases}
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in done:
                            case_id, figures = future.result()  # re-raises a worker's DataError here
                            results[case_id] = figures
                            progress.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # the first error ends the run: drop queued cases
                    raise
    finally:
        progress.close()
    return {case.case_id: results[case.case_id] for case in cases}  # in case order, not completion order


def _number(value: float) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "nan" if math.isnan(value) else repr(float(value))


# -- writing ---------------------------------------------------------------------------------------
def per_case_csv(per_case: dict[str, dict[str, dict[str, float]]], lesions: bool) -> str:
    columns = [f"liver_{k}" for k in CASE_KEYS]
    if lesions:
        columns += [f"lesion_{k}" for k in CASE_KEYS + DETECTION_KEYS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *columns])
    for case_id, figures in per_case.items():
        flat = {f"{structure}_{k}": v for structure, part in figures.items() for k, v in part.items()}
        writer.writerow([case_id, *(_number(flat[c]) for c in columns)])
    return buffer.getvalue()


def summary_table(summary: dict[str, float], lesions: bool) -> str:
    """Markdown table of ``summary.json``'s figures, one row per structure."""
    def ratio(key):
        value = summary.get(key)
        return "–" if value is None else ("n/a" if math.isnan(value) else f"{value:.4f}")

    def mm(key):
        return f"{summary[key]:.2f}"

    header = ["", "cases", "Dice per case", "Dice global", "VOE", "RVD", "ASSD (mm)", "MSSD (mm)", "HD95 (mm)", "lesion recall", "lesion precision"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for structure in STRUCTURES[: 2 if lesions else 1]:
        s = f"{structure}/"
        cells = [structure, str(int(summary[s + "cases"])), ratio(s + "dice"), ratio(s + "dice_global"), ratio(s + "voe"), ratio(s + "rvd"),
                 mm(s + "assd_mm"), mm(s + "mssd_mm"), mm(s + "hd95_mm"), ratio(s + "lesion_recall"), ratio(s + "lesion_precision")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for structure in STRUCTURES[: 2 if lesions else 1]:
        s = f"{structure}/"
        if summary[s + "rvd_cases"] < summary[s + "cases"]:
            notes.append(f"{structure} RVD: mean over the {int(summary[s + 'rvd_cases'])} of {int(summary[s + 'cases'])} cases with a non-empty truth.")
    if lesions:
        notes.append(
            f"Lesions (3D components, IoU > 0.5): {int(summary['lesion/detected_lesions'])} of {int(summary['lesion/truth_lesions'])} detected; "
            f"{int(summary['lesion/matched_pred_lesions'])} of {int(summary['lesion/pred_lesions'])} predicted components matched."
        )
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _text_writer(text: str):
    return lambda path: path.write_text(text)


def evaluate_folders(
    pred: str | Path, truth: str | Path, out: str | Path | None = None, workers: int = 1, lesions: bool = True, subset: bool = False
) -> dict[str, float]:
    """Evaluate every prediction in ``pred`` against ``truth`` and write the outputs into ``out``.

    Returns the summary (``summary.json``'s content, NaN where it holds null).
    """
    pred_dir, truth_dir = Path(pred).expanduser(), Path(truth).expanduser()
    out_dir = pred_dir / "evaluation" if out is None else Path(out).expanduser()
    predictions = find_predictions(pred_dir)
    truths = find_truth(truth_dir, skip=pred_dir.resolve() if pred_dir.resolve() != truth_dir.resolve() else None)
    cases = match_cases(predictions, truths, pred_dir, truth_dir, subset)
    spacings, misplaced = check_cases(cases)
    if misplaced:
        warnings.warn(
            f"{len(misplaced)} prediction(s) have an affine different from their truth's (ids {some_ids(misplaced)}): they are compared "
            "voxel by voxel in canonical orientation; check that they were saved on the truth volume's grid",
            stacklevel=2,
        )
    per_case = _evaluate_all(cases, spacings, lesions, workers)
    summary = {}
    for structure in STRUCTURES[: 2 if lesions else 1]:
        summary |= {f"{structure}/{k}": v for k, v in summarize_cases({i: f[structure] for i, f in per_case.items()}).items()}
    # Everything computed: only now touch the output folder.
    json_safe = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    table = summary_table(summary, lesions)
    outputs = {
        "per_case.csv": per_case_csv(per_case, lesions),
        "summary.json": json.dumps(json_safe, indent=2) + "\n",
        "summary.md": f"# LiTS evaluation\n\npredictions: `{pred_dir}`  \nground truth: `{truth_dir}`\n\n{table}",
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        replace_together([(out_dir / name, _text_writer(text)) for name, text in outputs.items()])
    except OSError as error:
        raise ConfigError(f"--out {out_dir} cannot be written ({error.strerror or error}); pass a writable folder") from None
    print(table, end="")
    print(f"{len(cases)} case(s) evaluated -> {out_dir}/ (per_case.csv, summary.json, summary.md)")
    return summary


def evaluate_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lits evaluate",
        description="The LiTS benchmark's metrics (Dice, VOE, RVD, ASSD, MSSD, HD95, lesion detection) of a folder of predicted "
        "label maps against the ground truth; writes per_case.csv, summary.json and summary.md.",
    )
    parser.add_argument("--pred", required=True, help="folder of predicted label maps (segmentation-<id>, test-segmentation-<id> or <id> .nii[.gz])")
    parser.add_argument("--truth", required=True, help="ground truth: a LiTS folder (segmentation-<id>.nii[.gz]) or an MSD folder (labelsTr/)")
    parser.add_argument("--out", default=None, help="output folder (default: <pred>/evaluation)")
    parser.add_argument("--workers", type=int, default=1, help="cases evaluated in parallel processes (default 1)")
    parser.add_argument("--no-lesions", dest="lesions", action="store_false", help="liver figures only (e.g. a liver-only network's 0/1 maps)")
    parser.add_argument("--subset", action="store_true", help="evaluate only the truth cases that have a prediction")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    evaluate_folders(args.pred, args.truth, args.out, args.workers, args.lesions, args.subset)
