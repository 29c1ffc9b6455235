"""The cases of ``lits evaluate``: prediction and truth files found, paired by id and checked, and label maps read.

Which files count, how ids are matched and in which orientation the arrays come: see
``experiments/commands/evaluate.py``. Every problem is a one-line ``DataError`` naming the file(s), raised
before any voxel is scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.errors import DataError
from datamodules.io.atomic import is_temporary
from datamodules.io.nifti import check_labels, natural_key, open_nifti, read_voxels, strip_nifti_suffix

PRED_PREFIXES = ("test-segmentation-", "segmentation-")  # longest first: both end in "segmentation-"
SHOW_IDS = 5  # ids named in an error message


@dataclass(frozen=True)
class Case:
    case_id: str
    pred: Path
    truth: Path


# -- finding the files -----------------------------------------------------------------------------
def _nifti_under(folder: Path, recursive: bool, skip: Path | None = None) -> list[tuple[str, Path]]:
    """``(name without suffix, path)`` of the NIfTI files in ``folder``; macOS ``._*`` files, the suite's temporary
    files (``.tmp-*``, left by a killed ``lits predict``) and anything under ``skip`` (the prediction folder, when it
    lies inside the truth folder) left out."""
    found = []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is None or path.name.startswith("._") or is_temporary(path) or not path.is_file():
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


def some_ids(ids: list[str]) -> str:
    """The first ids, naturally sorted, and how many more: for a message."""
    ids = sorted(ids, key=natural_key)
    return ", ".join(ids[:SHOW_IDS]) + (f" and {len(ids) - SHOW_IDS} more" if len(ids) > SHOW_IDS else "")


def match_cases(pred: dict[str, Path], truth: dict[str, Path], pred_dir: Path, truth_dir: Path, subset: bool = False) -> list[Case]:
    """Cases paired by id, sorted naturally; DataError naming the ids missing on either side."""
    no_truth = [i for i in pred if i not in truth]
    no_pred = [] if subset else [i for i in truth if i not in pred]
    if no_truth or no_pred:
        problems = []
        if no_truth:
            problems.append(f"{len(no_truth)} prediction(s) in {pred_dir} have no truth in {truth_dir} (ids {some_ids(no_truth)})")
        if no_pred:
            problems.append(f"{len(no_pred)} truth case(s) in {truth_dir} have no prediction in {pred_dir} (ids {some_ids(no_pred)})")
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
