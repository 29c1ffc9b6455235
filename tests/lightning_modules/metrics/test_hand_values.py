"""Hand-computed cases for the outputs of the metric and bookkeeping functions that no other test pins by hand:
lesion detection at its IoU boundary, the per-case and pooled summaries, the slice and volume averages and the
classification figures. Every expected value below is counted or computed by hand in the comment beside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.inference.cascade_evaluation import case_figures, summarize_cascade_volumes
from lightning_modules.metrics.classification import classification_metrics, compute_classification, update_classification
from lightning_modules.metrics.lits import DETECTION_IOU, case_metrics, lesion_detection, summarize_cases
from lightning_modules.metrics.slice_volume import slice_dice_hausdorff, split_slice_figures, summarize_slices, volume_mask_figures
from lightning_modules.metrics.slice_records import _pack_bits, unpack_bits
from lightning_modules.metrics.volume_records import VolumeRecords, gather_volume_rows, volume_share
from lightning_modules.metrics.volume_scoring import mean_volume_figures


def line(shape, z, y, x0, x1) -> np.ndarray:
    """A bool array of ``shape`` that is True on the row segment ``[z, y, x0:x1]``."""
    out = np.zeros(shape, dtype=bool)
    out[z, y, x0:x1] = True
    return out


# -- lesion detection: IoU exactly 0.5 is not a detection (LiTS: IoU > 0.5, docs/metrics.md) ----------------------
@pytest.mark.parametrize(
    "truth_span, pred_span, detected",
    [
        ((0, 4), (0, 2), False),  # 2 inside 4: IoU 2 / 4 = 0.5 exactly
        ((0, 3), (1, 4), False),  # 3 and 3 overlapping by 2: IoU 2 / 4 = 0.5
        ((0, 6), (3, 9), False),  # 6 and 6 overlapping by 3: IoU 3 / 9 < 0.5
        ((0, 6), (2, 8), False),  # 6 and 6 overlapping by 4: IoU 4 / 8 = 0.5
        ((0, 1000), (0, 500), False),  # 500 inside 1000: 0.5
        ((0, 1000), (0, 501), True),  # 501 / 1000 > 0.5
        ((0, 5), (0, 3), True),  # 3 / 5 = 0.6
        ((0, 6), (0, 2), False),  # 2 / 6
        ((0, 4), (0, 3), True),  # 3 / 4
    ],
)
def test_detection_needs_an_iou_strictly_above_one_half(truth_span, pred_span, detected):
    shape = (2, 3, 1001)
    truth, pred = line(shape, 1, 1, *truth_span), line(shape, 1, 1, *pred_span)
    d = lesion_detection(pred, truth)
    assert (d["truth_lesions"], d["pred_lesions"]) == (1, 1)
    assert (d["detected_lesions"], d["matched_pred_lesions"]) == (int(detected), int(detected))
    assert (d["lesion_recall"], d["lesion_precision"]) == (float(detected), float(detected))
    assert DETECTION_IOU == 0.5


def test_detection_at_the_boundary_counted_over_several_lesions():
    # Three lesions in one case: IoU 0.5 (2 of 4), 0.6 (3 of 5) and 0.5 (a 4-voxel component over 2 lesion voxels
    # and 2 background voxels); one false-positive component. Detected: the 0.6 one only.
    shape = (1, 9, 20)
    truth = line(shape, 0, 0, 0, 4) | line(shape, 0, 4, 0, 5) | line(shape, 0, 8, 0, 2)
    pred = line(shape, 0, 0, 0, 2) | line(shape, 0, 4, 0, 3) | line(shape, 0, 8, 0, 4) | line(shape, 0, 8, 10, 12)
    d = lesion_detection(pred, truth)
    assert d == {"truth_lesions": 3, "detected_lesions": 1, "pred_lesions": 4, "matched_pred_lesions": 1,
                 "lesion_recall": 1 / 3, "lesion_precision": 1 / 4}


# -- per-case means against pooled figures ----------------------------------------------------------------------
def test_per_case_dice_and_global_dice_differ_as_computed_by_hand():
    # Case a: a 1x1x2 prediction inside a 1x1x4 truth: Dice 2*2/(2+4) = 2/3, VOE 1 - 2/4 = 1/2, RVD (2-4)/4 = -1/2.
    # Case b: a 100-voxel truth predicted exactly: Dice 1, VOE 0, RVD 0.
    # Per case: Dice (2/3 + 1)/2 = 5/6, VOE 1/4, RVD -1/4; pooled: 2*(2+100)/((2+100)+(4+100)) = 204/206.
    a = case_metrics(line((1, 2, 100), 0, 0, 0, 2), line((1, 2, 100), 0, 0, 0, 4), (1.0, 1.0, 1.0))
    b = case_metrics(line((1, 2, 100), 0, 1, 0, 100), line((1, 2, 100), 0, 1, 0, 100), (1.0, 1.0, 1.0))
    assert (a["dice"], a["voe"], a["rvd"]) == pytest.approx((2 / 3, 1 / 2, -1 / 2))
    assert (b["dice"], b["voe"], b["rvd"], b["assd_mm"], b["mssd_mm"], b["hd95_mm"]) == (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    s = summarize_cases({"a": a, "b": b})
    assert s["dice"] == pytest.approx(5 / 6) and s["dice_global"] == pytest.approx(204 / 206)
    assert (s["voe"], s["rvd"], s["rvd_cases"], s["cases"]) == pytest.approx((1 / 4, -1 / 4, 2, 2))
    # Case a's distances: the prediction's 2 voxels lie on the truth's surface (0), the truth's 2 others lie 1 and 2 mm
    # from the prediction: ASSD (0+0 + 0+0+1+2)/6 = 1/2, MSSD 2; HD95 = max(q95 [0, 0], q95 [0, 0, 1, 2]) = 1 + 0.85.
    assert (a["assd_mm"], a["mssd_mm"], a["hd95_mm"]) == pytest.approx((0.5, 2.0, 1.85))
    assert (s["assd_mm"], s["mssd_mm"], s["hd95_mm"]) == pytest.approx((0.25, 1.0, 0.925))


def test_cascade_summary_averages_each_part_and_pools_the_lesions():
    # Volume 0: liver 8 voxels predicted exactly, one 2-voxel lesion predicted exactly. Volume 1: liver 8 voxels, 4 of
    # them predicted (Dice 2*4/12 = 2/3); its 2-voxel lesion missed, a 1-voxel false lesion elsewhere in the liver.
    # Liver: Dice (1 + 2/3)/2 = 5/6, pooled 2*(8+4)/((8+4)+(8+8)) = 24/28. Lesion: Dice (1 + 0)/2; pooled
    # 2*2/((2+1)+(2+2)) = 4/7; recall 1 of 2 lesions, precision 1 of 2 components.
    truth = np.zeros((2, 2, 2, 4), dtype=np.uint8)
    truth[:, :, :, :2] = 1
    truth[:, 0, 0, 0:2] = 2
    pred = truth.copy()
    pred[1, :, 1, :2] = 0  # half of volume 1's liver
    pred[1, 0, 0, 0:2] = 1  # its lesion missed (still liver)
    pred[1, 1, 0, 1] = 2  # a false lesion
    rows = {v: case_figures(pred[v], truth[v], (1.0, 1.0, 1.0)) for v in range(2)}
    figures = summarize_cascade_volumes(rows)
    assert (figures["liver/dice"], figures["liver/dice_global"]) == pytest.approx((5 / 6, 24 / 28))
    assert (figures["lesion/dice"], figures["lesion/dice_global"]) == pytest.approx((0.5, 4 / 7))
    assert (figures["lesion/lesion_recall"], figures["lesion/lesion_precision"], figures["lesion/truth_lesions"]) == (0.5, 0.5, 2)
    assert figures["liver/cases"] == figures["lesion/cases"] == 2 and "liver/lesion_recall" not in figures


# -- slice and volume averages ----------------------------------------------------------------------------------
def test_slice_dice_is_averaged_over_channels_then_over_slices():
    # Slice 0: channel 0 perfect (1), channel 1 a 1-pixel prediction against a 3-pixel truth: 2/4; mean 3/4.
    # Slice 1: channel 0 empty in both (1), channel 1 missed (0); mean 1/2. Over the slices: 5/8.
    pred, target = torch.zeros(2, 2, 4, 4, dtype=torch.bool), torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pred[0, 0, :2, :2] = target[0, 0, :2, :2] = True
    pred[0, 1, 3, 0] = True
    target[0, 1, 3, :3] = True
    target[1, 1, 0, 3] = True
    dice, hd = slice_dice_hausdorff(pred, target)
    assert dice.tolist() == [0.75, 0.5]
    # Hausdorff: slice 0 channel 1: the truth's pixel (3, 2) is 2 px from the prediction: (0 + 2)/2 = 1; slice 1:
    # channel 0 both empty (0), channel 1 one empty (the diagonal sqrt(32)): sqrt(32)/2.
    assert hd.tolist() == pytest.approx([1.0, math.sqrt(32) / 2])
    records = {"volume_index": torch.tensor([0, 0])}
    figures = {"dice": dice, "hausdorff_px": hd}
    assert summarize_slices(records, figures) == pytest.approx({"dice_slice": 0.625, "hd_slice_px": (1 + math.sqrt(32) / 2) / 2})


def test_split_slice_figures_keeps_the_records_volume_order():
    rows = {3: {"dice_volume": 0.5, "slice_dice": (0.25,), "slice_hd_px": (4.0,)},
            1: {"dice_volume": 0.75, "slice_dice": (1.0, 0.5), "slice_hd_px": (0.0, 2.0)}}
    plain, figures = split_slice_figures(rows)
    assert plain == {3: {"dice_volume": 0.5}, 1: {"dice_volume": 0.75}}
    assert figures["dice"].tolist() == [1.0, 0.5, 0.25] and figures["hausdorff_px"].tolist() == [0.0, 2.0, 4.0]


def test_volume_figures_are_averaged_over_channels_and_volumes():
    # Channel 0: an exact 2-voxel match (Dice 1, distances 0); channel 1: 1 predicted voxel of a 2-voxel truth
    # (Dice 2/3, the missed voxel 1 mm away along x: hd 1, hd95 0.95). Channel means: Dice 5/6, hd 1/2, hd95 0.475.
    pred, target = np.zeros((2, 1, 3, 4), dtype=bool), np.zeros((2, 1, 3, 4), dtype=bool)
    pred[0, 0, 1, 1:3] = target[0, 0, 1, 1:3] = True
    pred[1, 0, 2, 0] = True
    target[1, 0, 2, 0:2] = True
    figures = volume_mask_figures(pred, target, (3.0, 2.0, 1.0))
    assert figures["dice_volume"] == pytest.approx(5 / 6)
    assert (figures["hd_volume_mm"], figures["hd95_volume_mm"]) == pytest.approx((0.5, 0.475))
    assert (figures["tp_voxels"], figures["fp_voxels"], figures["fn_voxels"]) == (3, 0, 1)
    means = mean_volume_figures({0: figures, 5: {"dice_volume": 0.5, "hd95_volume_mm": 1.0, "hd_volume_mm": 3.0}})
    assert means == pytest.approx({"dice_volume": (5 / 6 + 0.5) / 2, "hd95_volume_mm": 0.7375, "hd_volume_mm": 1.75})


def test_bit_packing_by_hand():
    mask = torch.tensor([[True, False, True, True, False, False, False, False, True, True]])
    packed = _pack_bits(mask)
    assert packed.tolist() == [[0b10110000, 0b11000000]]  # first pixel in the highest bit, zeros past the width
    assert unpack_bits(packed, 10).tolist() == mask.tolist()


def test_volume_records_keep_the_first_row_of_a_repeated_volume_and_shares_cover_every_volume():
    records = VolumeRecords(["dice", "fp_voxels"])
    records.update(4, {"dice": 0.5, "fp_voxels": 7})
    records.update(2, {"dice": 0.25, "fp_voxels": 1, "ignored": 9.0})
    records.update(4, {"dice": 0.9, "fp_voxels": 0})  # DistributedSampler's padding repeats a volume
    assert records.compute() == {2: {"dice": 0.25, "fp_voxels": 1.0}, 4: {"dice": 0.5, "fp_voxels": 7.0}}
    with pytest.raises(ValueError, match="lack"):
        records.update(1, {"dice": 1.0})
    shares = [volume_share(range(7), rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(gather_volume_rows({5: {"dice": 0.1}, 1: {"dice": 0.2}})) == [1, 5]  # one process: sorted


# -- slice classification ---------------------------------------------------------------------------------------
def test_classification_figures_by_hand():
    # Logits -> probabilities thresholded at 0.5: predicted [1, 1, 0, 0, 1, 0] against labels [1, 0, 0, 1, 1, 0]:
    # TP 2, FP 1, FN 1, TN 2. Accuracy 4/6; F1 2*2/(2*2+1+1) = 2/3. AUROC from the scores' order: positives score
    # 3, -1, 2; negatives 0.5, -2, -3: of the 9 (positive, negative) pairs the positive scores higher in 8 (3 and 2
    # beat all three, -1 beats -2 and -3): 8/9.
    metrics = classification_metrics("val")
    logits = torch.tensor([[3.0], [0.5], [-2.0], [-1.0], [2.0], [-3.0]])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    update_classification(metrics, logits[:3], {"label": labels[:3].float()})
    update_classification(metrics, logits[3:], {"label": labels[3:].float()})
    figures = compute_classification(metrics)
    assert figures == pytest.approx({"val/accuracy": 4 / 6, "val/f1": 2 / 3, "val/auroc": 8 / 9})
    assert compute_classification(metrics) == {}  # reset after computing: nothing seen since
