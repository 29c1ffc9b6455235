"""Tests of lightning_modules.metrics.lits against hand-computed values, and of the bounding-box crop against
MONAI on the uncropped volume."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from lightning_modules.metrics.lits import (
    case_metrics,
    evaluate_case,
    lesion_detection,
    summarize_cases,
)


def box(shape, *ranges) -> np.ndarray:
    """Bool array of `shape`, True on the box given as (start, stop) per axis."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


# -- case_metrics, by hand -----------------------------------------------------------------------
def test_cubes_offset_by_one_slice_hand_computed():
    # Two 3x3x3 cubes, the second one slice further along z; spacing (2, 1, 1) mm.
    # Overlap: 2 of 3 slices, 18 voxels; union 36.
    # Surfaces (6-neighbour erosion): each cube loses only its centre, 26 surface voxels.
    # A -> B: A's first slice (9 voxels) lies one slice (2 mm) from B's first slice; A's last slice centre is
    # B's centre (not on B's surface), 1 mm in-plane from B's surface; the 16 others lie on B's surface (0).
    # B -> A is the mirror image. ASSD = (9*2 + 1) * 2 / 52; MSSD = 2; per direction the 95th percentile
    # falls among the nine 2's (sorted position 23.75 of 0..25), so HD95 = 2.
    shape = (8, 6, 6)
    a = box(shape, (2, 5), (2, 5), (2, 5))
    b = box(shape, (3, 6), (2, 5), (2, 5))
    m = case_metrics(a, b, (2.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["voe"] == pytest.approx(0.5)
    assert m["rvd"] == 0.0
    assert m["assd_mm"] == pytest.approx(38 / 52, rel=1e-6)
    assert m["mssd_mm"] == pytest.approx(2.0)
    assert m["hd95_mm"] == pytest.approx(2.0)
    assert (m["pred_voxels"], m["truth_voxels"], m["intersection_voxels"]) == (27, 27, 18)
    # Offset along y instead, 1 mm: the nine 2 mm distances become 1 mm; the centre's nearest surface voxel is
    # still 1 mm away (along x or y). ASSD = (9*1 + 1) * 2 / 52, MSSD = 1.
    c = box(shape, (2, 5), (3, 6), (2, 5))
    m = case_metrics(a, c, (2.0, 1.0, 1.0))
    assert m["assd_mm"] == pytest.approx(20 / 52, rel=1e-6)
    assert m["mssd_mm"] == pytest.approx(1.0)


def test_single_voxels_hd95_interpolates_and_assd_is_lits_not_medpy():
    # P = {a}, T = {b, c}, all surfaces. Spacing (2, 1, 1): |a-b| = 3 voxels along x = 3 mm,
    # |a-c| = 2 slices = 4 mm. d(P->T) = [3], d(T->P) = [3, 4].
    shape = (5, 5, 5)
    pred = np.zeros(shape, dtype=bool)
    truth = np.zeros(shape, dtype=bool)
    pred[0, 0, 0] = True
    truth[0, 0, 3] = truth[2, 0, 0] = True
    m = case_metrics(pred, truth, (2.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["voe"] == 1.0
    assert m["rvd"] == pytest.approx(-0.5)  # (1 - 2) / 2
    assert m["mssd_mm"] == pytest.approx(4.0)
    assert m["hd95_mm"] == pytest.approx(3.95)  # max(3, 3 + 0.95 * (4 - 3)), linear interpolation
    # LiTS: (3 + 3 + 4) / 3 surface voxels; medpy's mean of directed means would give (3 + 3.5) / 2 = 3.25.
    assert m["assd_mm"] == pytest.approx(10 / 3, rel=1e-6)
    assert (m["pred_voxels"], m["truth_voxels"], m["intersection_voxels"]) == (1, 2, 0)


def test_rvd_sign_and_voe():
    # Truth 2x2x2 = 8 voxels, prediction 2x2x3 = 12 containing it: rvd +0.5, voe 1 - 8/12, dice 16/20.
    truth = box((4, 4, 4), (0, 2), (0, 2), (0, 2))
    pred = box((4, 4, 4), (0, 2), (0, 2), (0, 3))
    m = case_metrics(pred, truth, (1, 1, 1))
    assert (m["rvd"], m["voe"], m["dice"]) == pytest.approx((0.5, 1 / 3, 0.8))
    assert case_metrics(truth, pred, (1, 1, 1))["rvd"] == pytest.approx(-1 / 3)


# -- empty masks ---------------------------------------------------------------------------------
SHAPE, SPACING = (4, 5, 6), (2.0, 1.0, 0.5)
DIAGONAL = math.sqrt((4 * 2.0) ** 2 + (5 * 1.0) ** 2 + (6 * 0.5) ** 2)  # sqrt(98)
EMPTY = np.zeros(SHAPE, dtype=bool)
BLOB = box(SHAPE, (1, 3), (1, 3), (1, 3))


def test_both_empty_is_perfect():
    m = case_metrics(EMPTY, EMPTY, SPACING)
    assert m == {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd_mm": 0.0, "mssd_mm": 0.0, "hd95_mm": 0.0,
                 "pred_voxels": 0, "truth_voxels": 0, "intersection_voxels": 0}


def test_empty_prediction_gets_the_diagonal():
    m = case_metrics(EMPTY, BLOB, SPACING)
    assert DIAGONAL == pytest.approx(math.sqrt(98))
    assert (m["dice"], m["voe"], m["rvd"]) == (0.0, 1.0, -1.0)
    assert (m["assd_mm"], m["mssd_mm"], m["hd95_mm"]) == pytest.approx((DIAGONAL,) * 3)
    assert (m["pred_voxels"], m["truth_voxels"], m["intersection_voxels"]) == (0, 8, 0)


def test_empty_truth_rvd_is_the_only_nan():
    m = case_metrics(BLOB, EMPTY, SPACING)
    assert math.isnan(m["rvd"])
    assert all(math.isfinite(v) for k, v in m.items() if k != "rvd")
    assert (m["dice"], m["voe"]) == (0.0, 1.0)
    assert (m["assd_mm"], m["mssd_mm"], m["hd95_mm"]) == pytest.approx((DIAGONAL,) * 3)


def test_refuses_label_maps_and_bad_shapes():
    with pytest.raises(ValueError, match="bool"):
        case_metrics(BLOB.astype(np.uint8), BLOB, SPACING)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(BLOB, BLOB[:-1], SPACING)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(BLOB, BLOB, (1.0, 0.0, 1.0))


# -- the crop is exact ---------------------------------------------------------------------------
def _monai_full_volume(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float, float]:
    p, t = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, t, include_background=True, spacing=list(spacing))
        hd95 = compute_hausdorff_distance(p, t, include_background=True, spacing=list(spacing), percentile=95)
        assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=list(spacing))
    return float(assd), float(hd), float(hd95)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_distances_equal_monai_on_the_full_volume(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (14, 24, 20), (2.5, 0.8, 1.3)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    truth = ((z - 5) / 3.5) ** 2 + ((y - 14) / 6) ** 2 + ((x - 8) / 5) ** 2 < 1  # off-centre ellipsoid
    pred = ((z - 6) / 3) ** 2 + ((y - 13) / 7) ** 2 + ((x - 9) / 4.5) ** 2 < 1
    pred |= rng.random(shape) > 0.997  # scattered specks: far surface voxels, a wider box
    if seed == 1:
        pred[-1, :, -1] = True  # touches two faces of the volume: the grown box is clipped there
        truth[:, 0, 0] = True
    m = case_metrics(pred, truth, spacing)
    assd, hd, hd95 = _monai_full_volume(pred, truth, spacing)
    assert m["assd_mm"] == pytest.approx(assd, rel=1e-6)
    assert m["mssd_mm"] == pytest.approx(hd, rel=1e-6)
    assert m["hd95_mm"] == pytest.approx(hd95, rel=1e-6)
    assert m["mssd_mm"] > m["hd95_mm"] > m["assd_mm"] > 0  # a non-trivial case
    assert m["dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


# -- lesion detection ----------------------------------------------------------------------------
def test_lesion_detection_hand_made():
    shape = (3, 12, 40)
    truth = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    # Found: a 10-voxel lesion, the prediction covers 6 of them: IoU 6/10 = 0.6.
    truth[1, 0, 0:10] = True
    pred[1, 0, 0:6] = True
    # Missed: a 10-voxel lesion, the prediction covers 4 of them: IoU 0.4 (and the component is unmatched).
    truth[1, 0, 20:30] = True
    pred[1, 0, 20:24] = True
    # Two 4-voxel lesions (2 voxels apart: separate even at 26-connectivity) merged by one 10-voxel component:
    # IoU 4/10 with each, neither detected, the component unmatched.
    truth[1, 5, 0:4] = truth[1, 5, 6:10] = True
    pred[1, 5, 0:10] = True
    # A perfect match, and a lesion of two voxels touching only by a corner (one lesion at 26-connectivity).
    truth[1, 10, 0:3] = pred[1, 10, 0:3] = True
    truth[0, 8, 20] = truth[1, 9, 21] = pred[0, 8, 20] = pred[1, 9, 21] = True
    # False positives: two blobs far from any lesion.
    pred[1, 10, 30:33] = pred[2, 10, 36:39] = True
    d = lesion_detection(pred, truth)
    assert d == {
        "truth_lesions": 6,  # found, missed, 2 merged, perfect, corner-touching
        "detected_lesions": 3,  # found, perfect, corner-touching
        "pred_lesions": 7,  # 6 voxels, 4 voxels, merged, perfect, corner-touching, 2 false positives
        "matched_pred_lesions": 3,
        "lesion_recall": pytest.approx(3 / 6),
        "lesion_precision": pytest.approx(3 / 7),
    }


def test_merged_component_matches_the_lesion_that_dominates_it():
    # Lesions of 10 and 1 voxels, one 13-voxel component covering both (and the gap): IoU 10/13 > 0.5 with
    # the large one, 1/13 with the small one.
    truth = np.zeros((1, 3, 20), dtype=bool)
    truth[0, 1, 0:10] = truth[0, 1, 12] = True
    pred = np.zeros_like(truth)
    pred[0, 1, 0:13] = True
    d = lesion_detection(pred, truth)
    assert (d["truth_lesions"], d["detected_lesions"], d["pred_lesions"], d["matched_pred_lesions"]) == (2, 1, 1, 1)
    assert (d["lesion_recall"], d["lesion_precision"]) == (0.5, 1.0)


def test_lesion_detection_empty_conventions():
    none = lesion_detection(EMPTY, EMPTY)
    assert none == {"truth_lesions": 0, "detected_lesions": 0, "pred_lesions": 0, "matched_pred_lesions": 0,
                    "lesion_recall": 1.0, "lesion_precision": 1.0}
    missed = lesion_detection(EMPTY, BLOB)
    assert (missed["truth_lesions"], missed["lesion_recall"], missed["lesion_precision"]) == (1, 0.0, 1.0)
    false_alarm = lesion_detection(BLOB, EMPTY)
    assert (false_alarm["pred_lesions"], false_alarm["lesion_recall"], false_alarm["lesion_precision"]) == (1, 1.0, 0.0)


# -- evaluate_case -------------------------------------------------------------------------------
def test_evaluate_case_splits_liver_and_lesion():
    # Truth: a 3x3x3 liver whose centre voxel is a lesion; prediction: the liver one slice further, no lesion.
    truth = box((8, 6, 6), (2, 5), (2, 5), (2, 5)).astype(np.uint8)
    truth[3, 3, 3] = 2
    pred = box((8, 6, 6), (3, 6), (2, 5), (2, 5)).astype(np.uint8)
    spacing = (2.0, 1.0, 1.0)
    result = evaluate_case(pred, truth, spacing)
    assert set(result) == {"liver", "lesion"}
    liver, lesion = result["liver"], result["lesion"]
    # Liver is labels >= 1 (the lesion included): the hand-computed cube case above.
    assert (liver["dice"], liver["voe"], liver["mssd_mm"]) == pytest.approx((2 / 3, 0.5, 2.0))
    assert liver["assd_mm"] == pytest.approx(38 / 52, rel=1e-6)
    # Lesion missed entirely.
    diagonal = math.sqrt(16**2 + 6**2 + 6**2)
    assert (lesion["dice"], lesion["voe"], lesion["rvd"]) == (0.0, 1.0, -1.0)
    assert lesion["hd95_mm"] == pytest.approx(diagonal)
    assert (lesion["truth_lesions"], lesion["detected_lesions"], lesion["lesion_recall"], lesion["lesion_precision"]) == (1, 0, 0.0, 1.0)
    assert set(evaluate_case(pred, truth, spacing, lesions=False)) == {"liver"}
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(pred, truth[:-1], spacing)


# -- summaries -----------------------------------------------------------------------------------
def _case(dice, rvd, assd, counts, detection=None):
    figures = {"dice": dice, "voe": 1 - dice / (2 - dice), "rvd": rvd, "assd_mm": assd, "mssd_mm": 2 * assd, "hd95_mm": 1.5 * assd,
               "pred_voxels": counts[0], "truth_voxels": counts[1], "intersection_voxels": counts[2]}
    if detection is not None:
        t, d, p, m = detection
        figures |= {"truth_lesions": t, "detected_lesions": d, "pred_lesions": p, "matched_pred_lesions": m,
                    "lesion_recall": d / t if t else 1.0, "lesion_precision": m / p if p else 1.0}
    return figures


def test_summarize_cases_pools_by_hand():
    per_case = {
        "a": _case(0.8, 0.5, 1.0, (60, 40, 40), (4, 3, 5, 2)),
        "b": _case(0.0, float("nan"), 10.0, (10, 0, 0), (0, 0, 2, 0)),  # truth empty: rvd left out
        "c": _case(1.0, 0.0, 0.0, (0, 0, 0), (0, 0, 0, 0)),  # both empty
        "d": _case(0.5, -0.25, 3.0, (30, 50, 20), (2, 0, 1, 0)),
    }
    s = summarize_cases(per_case)
    assert s["cases"] == 4
    assert s["dice"] == pytest.approx((0.8 + 0.0 + 1.0 + 0.5) / 4)
    assert s["rvd"] == pytest.approx((0.5 + 0.0 - 0.25) / 3) and s["rvd_cases"] == 3
    assert s["assd_mm"] == pytest.approx(14 / 4)
    assert s["mssd_mm"] == pytest.approx(28 / 4) and s["hd95_mm"] == pytest.approx(21 / 4)
    # Global Dice: 2 * (40 + 20) / ((60 + 10 + 30) + (40 + 50)) = 120 / 190.
    assert s["dice_global"] == pytest.approx(120 / 190)
    # Pooled detection: 3 of 6 lesions found, 2 of 8 components matched (not the mean of per-case rates).
    assert (s["truth_lesions"], s["detected_lesions"], s["pred_lesions"], s["matched_pred_lesions"]) == (6, 3, 8, 2)
    assert s["lesion_recall"] == pytest.approx(0.5) and s["lesion_precision"] == pytest.approx(0.25)
    assert all(math.isfinite(v) for v in s.values())


def test_summarize_cases_conventions():
    empty = summarize_cases({"a": _case(1.0, 0.0, 0.0, (0, 0, 0), (0, 0, 0, 0))})
    assert (empty["dice_global"], empty["lesion_recall"], empty["lesion_precision"]) == (1.0, 1.0, 1.0)
    liver_only = summarize_cases({"a": _case(0.8, 0.5, 1.0, (60, 40, 40))})
    assert "lesion_recall" not in liver_only and liver_only["dice_global"] == pytest.approx(0.8)
    no_rvd = summarize_cases({"a": _case(0.0, float("nan"), 5.0, (3, 0, 0))})
    assert no_rvd["rvd_cases"] == 0 and math.isnan(no_rvd["rvd"])
    with pytest.raises(ValueError):
        summarize_cases({})
