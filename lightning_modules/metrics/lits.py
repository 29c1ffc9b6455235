"""The LiTS benchmark's per-case metrics, on whole volumes at their original resolution.

Everything here is a pure function of numpy bool masks of one volume, shape (Z, H, W), with voxel
spacing ``(sz, sy, sx)`` in mm (axis ``i`` has spacing ``spacing[i]``; any axis order works as long as
spacing follows it, every figure is invariant to permuting or flipping axes). ``P`` is the predicted
mask, ``T`` the ground truth, ``|.|`` a voxel count.

Overlap and volume (Bilic et al., "The Liver Tumor Segmentation Benchmark (LiTS)", 2023):

* ``dice = 2|P & T| / (|P| + |T|)``
* ``voe  = 1 - |P & T| / |P | T|`` (volume overlap error, 1 - Jaccard)
* ``rvd  = (|P| - |T|) / |T|`` (relative volume difference, signed: > 0 means over-segmentation)
* ``pred_voxels, truth_voxels, intersection_voxels``: ``|P|, |T|, |P & T|``, kept per case so that the
  pooled "Dice global" ``2 sum|P & T| / (sum|P| + sum|T|)`` over a data set can be formed.

Surface distances, in mm:

* The surface of a mask is MONAI's: ``mask XOR binary_erosion(mask)`` (scipy's default 6-neighbour
  cross; outside the array counts as background), so a voxel is on the surface when one of its 6 face
  neighbours is background. (The LiTS organisers' reference code erodes with the 18-neighbourhood,
  which puts a few more voxels on curved surfaces; the figures can differ slightly from theirs.)
* ``d(P->T)`` is the list of euclidean distances from every surface voxel of ``P`` to the nearest
  surface voxel of ``T`` (and ``d(T->P)`` the other way), computed once per case: MONAI's
  ``get_edge_surface_distance(..., spacing, symmetric=True)``, the machinery behind its
  ``compute_hausdorff_distance`` and ``compute_average_surface_distance``, to the last bit, by
  ``surface_distance.surface_distances`` (faster; see there).
* ``assd_mm``: average symmetric surface distance, the mean over the union of both lists,
  ``(sum d(P->T) + sum d(T->P)) / (|S(P)| + |S(T)|)``. This is LiTS' definition (the organisers' code
  divides the two sums by the total number of surface voxels) and exactly MONAI's
  ``compute_average_surface_distance(symmetric=True)``, which averages the concatenated lists; it is
  NOT medpy's ``assd``, the mean of the two directed averages, which weighs a small surface as much as
  a large one.
* ``mssd_mm``: maximum symmetric surface distance, ``max(max d(P->T), max d(T->P))``: the Hausdorff
  distance, MONAI's ``compute_hausdorff_distance``.
* ``hd95_mm``: MONAI's convention, ``max(q95 d(P->T), q95 d(T->P))`` with ``q95`` the 95th percentile of
  one direction's list (``torch.quantile``, linear interpolation); not the 95th percentile of the
  pooled list.
* Speed: both masks are first cropped to the bounding box of ``P | T`` grown by 1 voxel (clipped to the
  volume), as MONAI's own ``get_mask_edges`` does, but with numpy slicing, before any copy or tensor
  conversion of the 512x512x450 volume. Every voxel outside the box is background in both masks, and
  the erosion at the box's border sees background beyond it (the 1-voxel rim; scipy's erosion also
  counts outside the array as background), so the surfaces, and hence every distance, are identical
  to MONAI's on the full volume.

Empty masks (no NaN or inf ever, except the one ``rvd`` case below):

* ``P`` and ``T`` both empty: ``dice 1, voe 0, rvd 0``, every distance 0 (a perfect answer).
* exactly one empty: ``dice 0, voe 1``, every distance the diagonal of the field of view
  ``sqrt((Z*sz)^2 + (H*sy)^2 + (W*sx)^2)``, the worst distance possible inside the volume (the
  suite's convention, as in ``metrics.py``). ``rvd = -1`` when only ``P`` is empty.
* ``T`` empty and ``P`` not: ``rvd`` is undefined and is NaN, the only NaN this module returns;
  ``summarize_cases`` leaves such cases out of the mean of ``rvd`` and reports how many entered it
  (``rvd_cases``).

Lesion detection (``lesion_detection``): lesions are the 3D connected components of a mask,
26-connectivity (``scipy.ndimage.label`` with a full 3x3x3 structure, like ``metrics.py``). A truth lesion
is *detected* when some predicted component overlaps it with IoU > 0.5 (the LiTS paper's criterion; with
IoU > 0.5 a lesion can match at most one component and vice versa, so "some" is unambiguous). A predicted
component is *matched* when it has IoU > 0.5 with some truth lesion. A component merging two lesions
matches at most one of them (the one making up more than half of it, if any), usually neither: merged
lesions are not detections. Per case ``lesion_recall = detected / truth_lesions`` (1.0 when there is no truth
lesion: nothing was missed) and ``lesion_precision = matched / pred_lesions`` (1.0 when nothing was
predicted: nothing false was claimed).

Summaries (``summarize_cases``): per-case means, except ``dice_global`` (pooled voxel counts, 1.0 when
no case has any foreground) and the detection rates, pooled over all lesions of the data set
(``sum detected / sum truth_lesions``, ``sum matched / sum pred_lesions``; 1.0 when the denominator is 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from lightning_modules.metrics.surface_distance import joint_box, surface_distances

CASE_KEYS = ("dice", "voe", "rvd", "assd_mm", "mssd_mm", "hd95_mm", "pred_voxels", "truth_voxels", "intersection_voxels")
DETECTION_KEYS = ("truth_lesions", "detected_lesions", "pred_lesions", "matched_pred_lesions", "lesion_recall", "lesion_precision")
MEAN_KEYS = ("dice", "voe", "rvd", "assd_mm", "mssd_mm", "hd95_mm")  # averaged over cases by summarize_cases
DETECTION_IOU = 0.5  # LiTS: a lesion is detected by a component overlapping it with IoU above this
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity in 3D


# -- helpers ---------------------------------------------------------------------------------------
def _check_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.dtype != bool or truth.dtype != bool:
        # Label maps would silently merge liver and lesion; callers say which label they mean.
        raise ValueError(f"expected bool masks, got {pred.dtype} and {truth.dtype} (use e.g. labels == 2)")
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"expected pred and truth of the same 3-D shape, got {pred.shape} and {truth.shape}")
    return pred, truth


def _check_spacing(spacing: Sequence[float]) -> list[float]:
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm sizes, one per axis, got {spacing}")
    return spacing


# -- per case --------------------------------------------------------------------------------------
def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, VOE, RVD, ASSD, MSSD, HD95 (mm) and voxel counts of one case; see the module docstring.

    Args:
        pred, truth: bool (Z, H, W) masks at the volume's original resolution.
        spacing: ``(sz, sy, sx)`` mm, one size per array axis.
    Returns:
        ``{dice, voe, rvd, assd_mm, mssd_mm, hd95_mm, pred_voxels, truth_voxels, intersection_voxels}``
        (counts as ints); only ``rvd`` can be NaN (empty truth, non-empty prediction).
    """
    pred, truth = _check_masks(pred, truth)
    spacing = _check_spacing(spacing)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
    # The 1-voxel rim (MONAI's margin): the erosion at the box's border sees the background it sees in the full volume.
    box = joint_box(pred, truth, margin=1)
    if box is None:  # both empty: a perfect answer
        return {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd_mm": 0.0, "mssd_mm": 0.0, "hd95_mm": 0.0,
                "pred_voxels": 0, "truth_voxels": 0, "intersection_voxels": 0}
    pred, truth = pred[box], truth[box]  # all the foreground of both; every count below is exact
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    n_both = int(np.count_nonzero(pred & truth))
    figures = {
        "dice": 2 * n_both / (n_pred + n_truth),
        "voe": 1 - n_both / (n_pred + n_truth - n_both),
        "rvd": (n_pred - n_truth) / n_truth if n_truth else float("nan"),
    }
    if n_pred == 0 or n_truth == 0:  # one surface missing: the worst distance inside the volume
        figures |= {"assd_mm": diagonal, "mssd_mm": diagonal, "hd95_mm": diagonal}
    else:
        to_truth, to_pred = surface_distances(pred, truth, spacing)
        figures |= {
            # The same float32 reductions as MONAI's compute_* functions, so the figures agree to the bit.
            "assd_mm": float(torch.cat([to_truth, to_pred]).mean()),
            "mssd_mm": float(torch.max(to_truth.max(), to_pred.max())),
            "hd95_mm": float(torch.max(torch.quantile(to_truth, 0.95), torch.quantile(to_pred, 0.95))),
        }
    return figures | {"pred_voxels": n_pred, "truth_voxels": n_truth, "intersection_voxels": n_both}


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """LiTS lesion detection of one case: components matched at IoU > 0.5; see the module docstring.

    Args:
        pred, truth: bool (Z, H, W) lesion masks.
    Returns:
        ``{truth_lesions, detected_lesions, pred_lesions, matched_pred_lesions}`` (ints) and
        ``{lesion_recall, lesion_precision}`` (1.0 when their denominator is 0).
    """
    pred, truth = _check_masks(pred, truth)
    box = joint_box(pred, truth)  # components never leave the box, so labelling it labels the volume
    if box is None:
        n_truth = n_pred = detected = matched = 0
    else:
        truth_labels, n_truth = ndimage.label(truth[box], structure=_FULL_CONNECTIVITY)
        pred_labels, n_pred = ndimage.label(pred[box], structure=_FULL_CONNECTIVITY)
        truth_sizes = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)[1:]
        pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
        # Joint histogram of the two label images over the voxels where they overlap: one code per
        # (truth lesion, predicted component) pair, counted. Sparse (np.unique) rather than a dense
        # (n_truth+1) x (n_pred+1) bincount, which a noisy prediction with 10^5 specks would blow up.
        overlap = (truth_labels > 0) & (pred_labels > 0)
        codes = truth_labels[overlap].astype(np.int64) * (n_pred + 1) + pred_labels[overlap]
        pairs, intersection = np.unique(codes, return_counts=True)
        t, p = pairs // (n_pred + 1) - 1, pairs % (n_pred + 1) - 1  # 0-based lesion / component indices
        iou = intersection / (truth_sizes[t] + pred_sizes[p] - intersection)
        hit = iou > DETECTION_IOU
        detected, matched = len(np.unique(t[hit])), len(np.unique(p[hit]))
    return {
        "truth_lesions": int(n_truth),
        "detected_lesions": int(detected),
        "pred_lesions": int(n_pred),
        "matched_pred_lesions": int(matched),
        "lesion_recall": detected / n_truth if n_truth else 1.0,
        "lesion_precision": matched / n_pred if n_pred else 1.0,
    }


def evaluate_case(
    pred_labels: np.ndarray, truth_labels: np.ndarray, spacing: Sequence[float], lesions: bool = True
) -> dict[str, dict[str, float]]:
    """All LiTS figures of one case from label maps (0 background, 1 liver, 2 lesion).

    Liver is ``labels >= 1`` (the lesions lie inside the liver), lesion is ``labels == 2``.
    Returns ``{"liver": case_metrics(...), "lesion": case_metrics(...) | lesion_detection(...)}``, the
    lesion part only with ``lesions``.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from truth shape {truth_labels.shape}")
    result = {"liver": case_metrics(pred_labels >= 1, truth_labels >= 1, spacing)}
    if lesions:
        pred_lesion, truth_lesion = pred_labels == 2, truth_labels == 2
        result["lesion"] = case_metrics(pred_lesion, truth_lesion, spacing) | lesion_detection(pred_lesion, truth_lesion)
    return result


# -- over cases ------------------------------------------------------------------------------------
def summarize_cases(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Data-set figures from ``{case id: case_metrics(...) [| lesion_detection(...)]}``.

    Returns the per-case means of ``MEAN_KEYS`` (``rvd`` over its non-NaN cases only, counted in
    ``rvd_cases``; NaN if there is none), ``dice_global`` from the pooled voxel counts, ``cases``, and, when
    every case has the detection keys, pooled ``lesion_recall`` and ``lesion_precision`` with the totals
    ``truth_lesions``, ``detected_lesions``, ``pred_lesions``, ``matched_pred_lesions``.
    """
    cases = list(per_case.values())
    if not cases:
        raise ValueError("no cases to summarise")
    summary: dict[str, float] = {}
    for key in MEAN_KEYS:
        values = np.array([float(case[key]) for case in cases], dtype=np.float64)
        if key == "rvd":
            values = values[~np.isnan(values)]
            summary["rvd_cases"] = int(values.size)
        summary[key] = float(values.mean()) if values.size else float("nan")
    totals = {key: sum(int(case[key]) for case in cases) for key in ("pred_voxels", "truth_voxels", "intersection_voxels")}
    volume = totals["pred_voxels"] + totals["truth_voxels"]
    summary["dice_global"] = 2 * totals["intersection_voxels"] / volume if volume else 1.0
    if all(key in case for case in cases for key in DETECTION_KEYS):
        counts = {key: sum(int(case[key]) for case in cases) for key in DETECTION_KEYS[:4]}
        summary |= counts | {
            "lesion_recall": counts["detected_lesions"] / counts["truth_lesions"] if counts["truth_lesions"] else 1.0,
            "lesion_precision": counts["matched_pred_lesions"] / counts["pred_lesions"] if counts["pred_lesions"] else 1.0,
        }
    summary["cases"] = len(cases)
    return summary
