"""The error-type report's voxel counts (mask mining's Fig. 4) against hand-counted masks, at every step from the
masks to the files: the per-volume counts of the slice path (``volume_mask_figures``) and of the cascade path
(``case_figures`` -> ``part_error_counts``), their totals, and the report's table and CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from lightning_modules.inference.cascade_evaluation import case_figures, part_error_counts
from lightning_modules.losses.error_masks import error_class_counts
from lightning_modules.metrics.slice_records import SliceRecords
from lightning_modules.metrics.slice_volume import volume_mask_figures
from lightning_modules.metrics.volume_scoring import summarize_volumes
from lightning_modules.reports import error_report
from lightning_modules.reports.error_report import error_table, total_counts, write_error_report

SPACING = (2.0, 0.5, 0.75)


def box(shape, *ranges) -> np.ndarray:
    """A bool array of ``shape`` that is True on the half-open ``(start, stop)`` ranges, one per axis."""
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(a, b) for a, b in ranges)] = True
    return out


def counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) of one-channel (Z, H, W) masks as the slice path's per-volume figures give them."""
    figures = volume_mask_figures(pred[None], truth[None], SPACING)
    return figures["tp_voxels"], figures["fp_voxels"], figures["fn_voxels"]


# -- the slice path's per-volume counts --------------------------------------------------------------
def test_a_prediction_strictly_containing_the_truth_has_no_false_negative():
    truth = box((4, 6, 6), (1, 3), (2, 4), (2, 4))  # 2x2x2 = 8 voxels
    pred = box((4, 6, 6), (1, 3), (1, 4), (1, 4))  # 2x3x3 = 18 voxels, the truth inside
    assert counts(pred, truth) == (8, 10, 0)
    assert volume_mask_figures(pred[None], truth[None], SPACING)["dice_volume"] == pytest.approx(16 / 26)
    # the error classes mining trains on count the same: 144 voxels - 18 predicted = 126 TN
    classes = error_class_counts(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None])
    assert classes == {"TN": 126, "FP": 10, "FN": 0, "TP": 8}


def test_a_prediction_strictly_inside_the_truth_has_no_false_positive():
    pred = box((4, 6, 6), (1, 3), (2, 4), (2, 4))
    truth = box((4, 6, 6), (1, 3), (1, 4), (1, 4))
    assert counts(pred, truth) == (8, 0, 10)
    classes = error_class_counts(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None])
    assert classes == {"TN": 126, "FP": 0, "FN": 10, "TP": 8}


def test_disjoint_masks_count_every_voxel_as_an_error():
    pred = box((3, 8, 8), (0, 1), (0, 1), (0, 3))  # 3 voxels
    truth = box((3, 8, 8), (2, 3), (6, 7), (3, 8))  # 5 voxels, far away
    assert counts(pred, truth) == (0, 3, 5)
    assert counts(np.zeros_like(truth), truth) == (0, 0, 5)
    assert counts(pred, np.zeros_like(pred)) == (0, 3, 0)
    assert counts(np.zeros_like(pred), np.zeros_like(pred)) == (0, 0, 0)


def test_tiny_masks_counted_by_hand():
    pred = np.array([[[1, 1, 0], [0, 1, 0]]], dtype=bool)
    truth = np.array([[[1, 0, 0], [1, 1, 1]]], dtype=bool)
    # TP: (0,0) (1,1); FP: (0,1); FN: (1,0) (1,2)
    assert counts(pred, truth) == (2, 1, 2)
    assert counts(truth, pred) == (2, 2, 1)  # swapping the roles swaps FP and FN


def test_counts_are_summed_over_target_channels():
    liver_truth = box((2, 5, 5), (0, 2), (0, 3), (0, 3))  # 18
    liver_pred = box((2, 5, 5), (0, 2), (0, 3), (0, 4))  # 24: 6 FP
    lesion_truth = box((2, 5, 5), (1, 2), (1, 2), (1, 3))  # 2
    lesion_pred = box((2, 5, 5), (1, 2), (1, 2), (2, 3))  # 1: 1 TP, 1 FN
    figures = volume_mask_figures(np.stack([liver_pred, lesion_pred]), np.stack([liver_truth, lesion_truth]), SPACING)
    assert (figures["tp_voxels"], figures["fp_voxels"], figures["fn_voxels"]) == (18 + 1, 6 + 0, 0 + 1)


def test_slice_path_counts_the_final_masks_at_the_original_resolution():
    # Training resolution 8x8, original 16x16 (each low-res pixel a 2x2 block; bilinear x2 then >= 0.5 gives the
    # blocks back exactly). Two slices, each predicting a 2x2 low-res block = 16 voxels at full resolution (32 in
    # all) inside a truth of 4x6 = 24 voxels per slice (48): TP 32, FP 0, FN 16. A one-pixel island on slice 0 is
    # 4 more voxels, false positives unless the largest-component step removes them.
    low = np.zeros((2, 1, 8, 8), dtype=np.float32)
    low[:, 0, 2:4, 2:4] = 1.0
    low[0, 0, 7, 0] = 1.0  # the island
    truth = np.zeros((1, 2, 16, 16), dtype=bool)
    truth[0, :, 4:8, 4:10] = True
    records = SliceRecords()
    for z in range(2):
        records.update(torch.from_numpy(low[z : z + 1]), torch.from_numpy(low[z : z + 1] > 0.5), torch.tensor([0]), torch.tensor([z]))
    records = records.compute()
    load = lambda v: (truth, (2.0, 0.5, 0.5))  # noqa: E731
    for channels, fp in (((0,), 0), ((), 4)):
        _, per_volume = summarize_volumes(records, load, channels, return_per_volume=True)
        figures = per_volume[0]
        assert (figures["tp_voxels"], figures["fp_voxels"], figures["fn_voxels"]) == (32, fp, 16)
        assert figures["dice_volume"] == pytest.approx(64 / (32 + fp + 48))


# -- the cascade path: LiTS rows -> error counts per part ------------------------------------------------
def test_cascade_rows_give_each_parts_counts_by_hand():
    truth = np.zeros((2, 6, 6), dtype=np.uint8)
    truth[:, 1:5, 1:5] = 1  # liver: 32 voxels (lesion included)
    truth[1, 2:4, 2:4] = 2  # lesion: 4 voxels
    pred = np.zeros_like(truth)
    pred[:, 1:5, 1:6] = 1  # liver: 40 voxels, the truth inside: 8 FP, 0 FN
    pred[1, 2:3, 2:4] = 2  # lesion: 2 voxels inside the truth's 4: 0 FP, 2 FN
    pred[0, 5, 0] = 2  # a lesion voxel outside the liver truth: 1 lesion FP, 1 more liver FP
    row = case_figures(pred, truth, SPACING)
    liver, lesion = part_error_counts({7: row}, "liver")[7], part_error_counts({7: row}, "lesion")[7]
    assert (liver["tp_voxels"], liver["fp_voxels"], liver["fn_voxels"]) == (32, 9, 0)
    assert (lesion["tp_voxels"], lesion["fp_voxels"], lesion["fn_voxels"]) == (2, 1, 2)
    assert liver["dice_volume"] == pytest.approx(64 / 73) and lesion["dice_volume"] == pytest.approx(4 / 7)


# -- the report ---------------------------------------------------------------------------------------------
BEFORE = {
    0: {"tp_voxels": 8, "fp_voxels": 10, "fn_voxels": 0, "dice_volume": 16 / 26},
    2: {"tp_voxels": 0, "fp_voxels": 3, "fn_voxels": 5, "dice_volume": 0.0},
}
AFTER = {
    0: {"tp_voxels": 8, "fp_voxels": 2, "fn_voxels": 0, "dice_volume": 0.8},
    2: {"tp_voxels": 4, "fp_voxels": 0, "fn_voxels": 1, "dice_volume": 8 / 9},
}
IDS = ["case-a", "unused", "case-c"]


def test_totals_sum_each_error_type_over_volumes():
    assert total_counts(BEFORE) == {"fp": 13, "fn": 5, "tp": 8}
    assert total_counts(AFTER) == {"fp": 2, "fn": 1, "tp": 12}


def test_the_table_prints_the_counts_and_their_change():
    table = error_table({"fp": 13, "fn": 5, "tp": 8}, {"fp": 2, "fn": 1, "tp": 12}, [("a", 0.5, 0.75)])
    assert "| false positives | 13 | 2 | -84.6% |" in table  # 100 * (2 - 13) / 13 = -84.62
    assert "| false negatives | 5 | 1 | -80.0% |" in table
    assert "| true positives | 8 | 12 | +50.0% |" in table
    assert "| a | 0.5000 | 0.7500 | +0.2500 |" in table
    assert "| mean | 0.5000 | 0.7500 | +0.2500 |" in table
    assert "| false positives | 0 | 4 | n/a |" in error_table({"fp": 0, "fn": 0, "tp": 0}, {"fp": 4, "fn": 0, "tp": 0}, [])


def test_the_report_files_hold_the_hand_counts(tmp_path):
    returned = write_error_report(tmp_path, "test", BEFORE, AFTER, IDS)
    assert returned == {"before/fp_voxels": 13, "before/fn_voxels": 5, "before/tp_voxels": 8,
                        "fp_voxels": 2, "fn_voxels": 1, "tp_voxels": 12}
    with open(tmp_path / "test_error_types.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["volume", "fp_before", "fp_after", "fn_before", "fn_after", "tp_before", "tp_after", "dice_before", "dice_after"]
    assert rows[1] == ["case-a", "10", "2", "0", "0", "8", "8", "0.615385", "0.8"]
    assert rows[2] == ["case-c", "3", "0", "5", "1", "0", "4", "0", "0.888889"]
    assert rows[3] == ["total", "13", "2", "5", "1", "8", "12", "", ""]
    table = (tmp_path / "test_error_types.md").read_text()
    assert "| false positives | 13 | 2 |" in table and "| case-c | 0.0000 | 0.8889 | +0.8889 |" in table
    assert (tmp_path / "test_error_types.png").stat().st_size > 0


def test_the_parts_report_holds_each_parts_hand_counts(tmp_path, monkeypatch):
    saved = []
    # the PNG is not read here: closed unsaved
    monkeypatch.setattr(error_report, "save_figure", lambda figure, path, *args: saved.append(path) or error_report.plt.close(figure))
    lesion_before = {0: {"tp_voxels": 1, "fp_voxels": 4, "fn_voxels": 2, "dice_volume": 0.25}}
    lesion_after = {0: {"tp_voxels": 2, "fp_voxels": 4, "fn_voxels": 1, "dice_volume": 0.4}}
    returned = error_report.write_parts_report(tmp_path, "test", {"liver": (BEFORE, AFTER), "lesion": (lesion_before, lesion_after)})
    assert returned["liver"] == {"before/fp_voxels": 13, "before/fn_voxels": 5, "before/tp_voxels": 8,
                                 "fp_voxels": 2, "fn_voxels": 1, "tp_voxels": 12}
    assert returned["lesion"] == {"before/fp_voxels": 4, "before/fn_voxels": 2, "before/tp_voxels": 1,
                                  "fp_voxels": 4, "fn_voxels": 1, "tp_voxels": 2}
    assert saved == [tmp_path / "test_error_types.png"]
    table = (tmp_path / "test_error_types.md").read_text()
    for row in ("| liver | false positives | 13 | 2 | -84.6% |", "| liver | true positives | 8 | 12 | +50.0% |",
                "| lesion | false positives | 4 | 4 | +0.0% |", "| lesion | false negatives | 2 | 1 | -50.0% |",
                "| lesion | true positives | 1 | 2 | +100.0% |"):
        assert row in table
