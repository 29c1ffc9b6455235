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

Outputs, in ``--out`` (default ``<pred>/evaluation``), written only once every case has been evaluated:

* ``per_case.csv``: one row per case, ``id``, then ``liver_<figure>`` and ``lesion_<figure>``
  (``rvd`` is ``nan`` where the truth is empty and the prediction is not);
* ``summary.json``: ``summarize_cases`` of the liver and of the lesions, keys ``liver/<name>`` and
  ``lesion/<name>`` (an undefined mean RVD is ``null``);
* ``summary.md``: the table that is also printed.

Every bad input is a one-line ``DataError`` (``lits: error: ...``, exit status 2), raised before anything
is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import uuid
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from datamodules import DataError
from datamodules.io.nifti import check_labels, natural_key, open_nifti, read_voxels, strip_nifti_suffix
from lightning_modules.metrics.lits import CASE_KEYS, DETECTION_KEYS, evaluate_case, summarize_cases

PRED_PREFIXES = ("test-segmentation-", "segmentation-")  # longest first: both end in "segmentation-"
STRUCTURES = ("liver", "lesion")
SHOW_IDS = 5  # ids named in an error message
# Worker processes are spawned, not forked: forking a process whose torch / OpenMP threads have run can
# deadlock the child. (The tests fork, to skip each worker's seconds of imports.)
START_METHOD = "spawn"


@dataclass(frozen=True)
class Case:
    case_id: str
    pred: Path
    truth: Path


# -- finding the files -----------------------------------------------------------------------------
def _nifti_under(folder: Path, recursive: bool, skip: Path | None = None) -> list[tuple[str, Path]]:
    """``(name without suffix, path)`` of the NIfTI files in ``folder``; macOS ``._*`` files and anything
    under ``skip`` (the prediction folder, when it lies inside the truth folder) left out."""
    found = []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is None or path.name.startswith("._") or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append((stem, path))
    return found


def _by_id(pairs: list[tuple[str, Path]], folder_word: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for case_id, path in pairs:
        if case_id in files:
            raise DataError(f"{path}: same case id {case_id!r} as {files[case_id]}; keep one {folder_word} file per case")
        files[case_id] = path
    return files


def find_predictions(folder: str | Path) -> dict[str, Path]:
    """``{id: path}`` of the label maps at the top level of ``folder`` (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"prediction folder {folder} does not exist; pass --pred the folder of predicted label maps")
    pairs = []
    for stem, path in _nifti_under(folder, recursive=False):
        if stem.endswith("_probability"):
            continue
        for prefix in PRED_PREFIXES:
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        pairs.append((stem, path))
    if not pairs:
        raise DataError(f"prediction folder {folder} holds no label map (segmentation-<id>.nii[.gz] or <id>.nii[.gz]); pass --pred the folder lits predict wrote")
    return _by_id(pairs, "prediction")


def find_truth(folder: str | Path, skip: Path | None = None) -> dict[str, Path]:
    """``{id: path}`` of the ground-truth label maps of a LiTS or MSD folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"truth folder {folder} does not exist; pass --truth a LiTS folder (segmentation-<id>.nii[.gz]) or an MSD folder (labelsTr/)")
    if (folder / "labelsTr").is_dir():
        pairs = _nifti_under(folder / "labelsTr", recursive=False, skip=skip)
    else:
        pairs = [(stem[len("segmentation-"):], path) for stem, path in _nifti_under(folder, recursive=True, skip=skip)
                 if stem.startswith("segmentation-")]
    if not pairs:
        raise DataError(f"truth folder {folder} holds no segmentation-<id>.nii[.gz] and no labelsTr/<id>.nii.gz; pass --truth a LiTS or MSD folder")
    return _by_id(pairs, "ground-truth")


def _some(ids: list[str]) -> str:
    ids = sorted(ids, key=natural_key)
    return ", ".join(ids[:SHOW_IDS]) + (f" and {len(ids) - SHOW_IDS} more" if len(ids) > SHOW_IDS else "")


def match_cases(pred: dict[str, Path], truth: dict[str, Path], pred_dir: Path, truth_dir: Path, subset: bool = False) -> list[Case]:
    """Cases paired by id, sorted naturally; DataError naming the ids missing on either side."""
    no_truth = [i for i in pred if i not in truth]
    no_pred = [] if subset else [i for i in truth if i not in pred]
    if no_truth or no_pred:
        problems = []
        if no_truth:
            problems.append(f"{len(no_truth)} prediction(s) in {pred_dir} have no truth in {truth_dir} (ids {_some(no_truth)})")
        if no_pred:
            problems.append(f"{len(no_pred)} truth case(s) in {truth_dir} have no prediction in {pred_dir} (ids {_some(no_pred)})")
        remedy = "name predictions segmentation-<id>.nii[.gz] or <id>.nii[.gz] after their truth"
        raise DataError("; ".join(problems) + f"; {remedy}" + ("" if subset else ", or pass --subset to evaluate only the predicted cases"))
    return [Case(i, pred[i], truth[i]) for i in sorted(pred, key=natural_key)]


# -- reading label maps ----------------------------------------------------------------------------
def _canonical_geometry(image: nib.Nifti1Image) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray]:
    """From the header alone: the shape, zooms and affine the array will have once reoriented to closest
    canonical (RAS+), what ``nib.as_closest_canonical`` gives, without reading the data."""
    ornt = nib.orientations.io_orientation(image.affine)
    shape, zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):  # stored axis `axis` becomes canonical axis `target`
        shape[int(target)] = int(image.shape[axis])
        zooms[int(target)] = float(image.header.get_zooms()[axis])
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return tuple(shape), tuple(zooms), affine


def read_labels(path: Path) -> np.ndarray:
    """uint8 label map (X, Y, Z) in closest-canonical orientation, values checked to be in {0, 1, 2}.

    The data are read before they are reoriented, so a truncated file is a DataError rather than a
    traceback from inside nibabel.
    """
    image = open_nifti(path)
    labels = read_voxels(image, path)
    check_labels(labels, path)
    ornt = nib.orientations.io_orientation(image.affine)
    return nib.orientations.apply_orientation(labels, ornt).astype(np.uint8, copy=False)


def check_cases(cases: list[Case]) -> tuple[dict[str, tuple[float, float, float]], list[str]]:
    """Header-level checks of every case before any data is read: both readable NIfTI, the same shape once
    in canonical orientation. Returns each case's truth spacing (sx, sy, sz) mm and the ids whose two
    files place the grid differently in space (canonical affines differ)."""
    spacings, misplaced = {}, []
    for case in cases:
        pred, truth = open_nifti(case.pred), open_nifti(case.truth)
        pred_shape, _, pred_affine = _canonical_geometry(pred)
        truth_shape, truth_zooms, truth_affine = _canonical_geometry(truth)
        if pred_shape != truth_shape:
            raise DataError(
                f"{case.pred}: prediction shape {pred_shape} differs from the shape {truth_shape} of its truth {case.truth} "
                "(both in canonical orientation); predict on the truth volume's grid"
            )
        if not all(math.isfinite(s) and s > 0 for s in truth_zooms):
            raise DataError(f"{case.truth}: voxel sizes {truth_zooms} in the header are not positive; fix the header's pixdim")
        scale = max(1.0, float(np.abs(truth_affine).max()))
        if not np.allclose(pred_affine, truth_affine, atol=1e-3 * scale, rtol=0):
            misplaced.append(case.case_id)
        spacings[case.case_id] = truth_zooms
    return spacings, misplaced


def evaluate_pair(case: Case, spacing: tuple[float, float, float], lesions: bool = True) -> tuple[str, dict[str, dict[str, float]]]:
    """Read one case's two label maps and compute its figures (runs in a worker process with --workers)."""
    pred, truth = read_labels(case.pred), read_labels(case.truth)
    return case.case_id, evaluate_case(pred, truth, spacing, lesions=lesions)


# -- running ---------------------------------------------------------------------------------------
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


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
            f"{len(misplaced)} prediction(s) have an affine different from their truth's (ids {_some(misplaced)}): they are compared "
            "voxel by voxel in canonical orientation; check that they were saved on the truth volume's grid",
            stacklevel=2,
        )
    per_case = _evaluate_all(cases, spacings, lesions, workers)
    summary = {}
    for structure in STRUCTURES[: 2 if lesions else 1]:
        summary |= {f"{structure}/{k}": v for k, v in summarize_cases({i: f[structure] for i, f in per_case.items()}).items()}
    # Everything computed: only now touch the output folder.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(out_dir / "per_case.csv", per_case_csv(per_case, lesions))
        json_safe = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        _write_atomically(out_dir / "summary.json", json.dumps(json_safe, indent=2) + "\n")
        table = summary_table(summary, lesions)
        _write_atomically(out_dir / "summary.md", f"# LiTS evaluation\n\npredictions: `{pred_dir}`  \nground truth: `{truth_dir}`\n\n{table}")
    except OSError as error:
        raise DataError(f"--out {out_dir} cannot be written ({error.strerror or error}); pass a writable folder") from None
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
