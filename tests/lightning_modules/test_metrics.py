"""Tests of lightning_modules.metrics against hand-computed values (not re-derived with the same MONAI calls)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_modules import BaselineUNet
from lightning_modules import metrics
from lightning_modules.classification import CheckpointError
from lightning_modules.metrics import (
    SLICE_KEYS,
    largest_connected_component,
    slice_dice_hausdorff,
    slice_figures,
    split_slice_figures,
    summarize_slices,
    mean_volume_figures,
    metric_workers,
    record_volumes,
    share_voxels,
    summarize_volumes,
    volume_dice_hausdorff,
    volume_figures,
)
from lightning_modules.slice_records import RECORD_KEYS, SliceRecords
from lightning_modules.volume_records import gather_volume_rows, volume_share

H = W = 16


def slices(*masks: np.ndarray) -> torch.Tensor:
    """(C, H, W) masks -> bool (B, C, H, W)."""
    return torch.from_numpy(np.stack(masks)).bool()


def square(top: int, left: int, size: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros((1, *shape), dtype=bool)
    mask[0, top : top + size, left : left + size] = True
    return mask


def pixel(y: int, x: int) -> np.ndarray:
    mask = np.zeros((1, H, W), dtype=bool)
    mask[0, y, x] = True
    return mask


EMPTY = np.zeros((1, H, W), dtype=bool)


# -- slices ------------------------------------------------------------------------------------------
def test_slice_dice_hand_computed():
    pred = slices(square(4, 4, 4), EMPTY, EMPTY, square(4, 4, 4))
    target = slices(square(4, 5, 4), EMPTY, square(4, 4, 4), EMPTY)
    dice, _ = slice_dice_hausdorff(pred, target)
    # 4x4 squares shifted by 1 px: intersection 12 -> 2*12/(16+16); both empty -> 1; one empty -> 0.
    assert dice.dtype == torch.float32 and dice.shape == (4,)
    assert dice.tolist() == pytest.approx([0.75, 1.0, 0.0, 0.0])


def test_slice_hausdorff_hand_computed():
    pred = slices(pixel(5, 5), pixel(2, 2), square(4, 4, 5), EMPTY, EMPTY, square(4, 4, 5))
    target = slices(pixel(5, 8), pixel(5, 6), square(4, 6, 5), EMPTY, square(4, 4, 5), EMPTY)
    _, hd = slice_dice_hausdorff(pred, target)
    diagonal = math.sqrt(H**2 + W**2)
    # 3 px apart; (3, 4) offset -> 5; square shifted 2 px along x -> 2; both empty -> 0; one empty -> diagonal.
    assert hd.tolist() == pytest.approx([3.0, 5.0, 2.0, 0.0, diagonal, diagonal])


def test_slice_multichannel_average():
    # channel 0 identical (dice 1, hd 0), channel 1 pixels 3 px apart (dice 0, hd 3).
    pred = slices(np.concatenate([square(2, 2, 4), pixel(5, 5)]))
    target = slices(np.concatenate([square(2, 2, 4), pixel(5, 8)]))
    dice, hd = slice_dice_hausdorff(pred, target)
    assert dice.item() == pytest.approx(0.5) and hd.item() == pytest.approx(1.5)


# -- volumes -----------------------------------------------------------------------------------------
def cube(offset=(0, 0, 0), size=4, shape=(10, 12, 12)) -> np.ndarray:
    mask = np.zeros((1, *shape), dtype=bool)
    z, y, x = (2 + o for o in offset)
    mask[0, z : z + size, y : y + size, x : x + size] = True
    return mask


SPACING = (2.0, 0.5, 0.7)


@pytest.mark.parametrize(
    "offset, dice, hd",
    [
        ((2, 0, 0), 2 * 32 / 128, 2 * 2.0),  # shifted 2 slices: intersection 4*4*2, HD = 2 sz
        ((0, 0, 1), 2 * 48 / 128, 1 * 0.7),  # shifted 1 column: intersection 4*4*3, HD = sx
        ((0, 3, 0), 2 * 16 / 128, 3 * 0.5),  # shifted 3 rows: intersection 4*4*1, HD = 3 sy
    ],
)
def test_volume_shifted_cube_anisotropic(offset, dice, hd):
    result = volume_dice_hausdorff(cube(offset), cube(), SPACING)
    assert set(result) == {"dice_volume", "hd95_volume_mm", "hd_volume_mm"}
    assert result["dice_volume"] == pytest.approx(dice)
    assert result["hd_volume_mm"] == pytest.approx(hd)
    assert result["hd95_volume_mm"] <= result["hd_volume_mm"] + 1e-6


def test_volume_hd95_ignores_single_outlier():
    # An identical 6-cube plus one far voxel: HD is the outlier's distance, hd95 is 0 (outlier < 5% of edges).
    target = cube(size=6, shape=(10, 20, 20))
    pred = target.copy()
    pred[0, 4, 18, 18] = True  # nearest target edge voxel: (4, 7, 7) -> 11 rows and 11 columns away
    result = volume_dice_hausdorff(torch.from_numpy(pred), torch.from_numpy(target), SPACING)
    assert result["hd_volume_mm"] == pytest.approx(math.hypot(11 * 0.5, 11 * 0.7))
    assert result["hd95_volume_mm"] == pytest.approx(0.0)
    assert result["dice_volume"] == pytest.approx(2 * 216 / (217 + 216))


def test_volume_hausdorff_equals_monai_on_irregular_masks():
    """Both distances come from one surface-distance computation; each must equal MONAI's own call."""
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 0.7)
    for _ in range(3):
        pred, target = (ndimage.gaussian_filter(rng.random((1, 12, 40, 36)), 2) > 0.5 for _ in range(2))
        assert pred.any() and target.any() and (pred != target).any()
        figures = volume_dice_hausdorff(pred, target, spacing)
        for key, percentile in (("hd95_volume_mm", 95), ("hd_volume_mm", None)):
            expected = compute_hausdorff_distance(torch.from_numpy(pred)[None].float(), torch.from_numpy(target)[None].float(),
                                                  include_background=True, percentile=percentile, spacing=list(spacing))
            assert figures[key] == pytest.approx(float(expected), rel=1e-6), key
        assert figures["hd95_volume_mm"] < figures["hd_volume_mm"]


def test_volume_empty_conventions_and_channel_average():
    shape = (10, 12, 12)
    diagonal = math.sqrt((10 * 2.0) ** 2 + (12 * 0.5) ** 2 + (12 * 0.7) ** 2)
    empty = np.zeros((1, *shape), dtype=bool)
    one_empty = volume_dice_hausdorff(empty, cube(), SPACING)
    assert one_empty == pytest.approx({"dice_volume": 0.0, "hd95_volume_mm": diagonal, "hd_volume_mm": diagonal})
    both_empty = volume_dice_hausdorff(empty, empty, SPACING)
    assert both_empty == pytest.approx({"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0})
    # C=2: channel 0 shifted by 2 slices (dice 0.5, HD 4 mm), channel 1 both empty (dice 1, HD 0).
    two = volume_dice_hausdorff(np.concatenate([cube((2, 0, 0)), empty]), np.concatenate([cube(), empty]), SPACING)
    assert two["dice_volume"] == pytest.approx(0.75) and two["hd_volume_mm"] == pytest.approx(2.0)


def test_largest_connected_component():
    mask = np.zeros((3, 6, 8, 8), dtype=bool)
    mask[0, 0:3, 0:3, 0:3] = True  # 27 voxels
    mask[0, 3, 3, 3] = True  # touches the big blob by a corner only: connected under 26-connectivity
    mask[0, 5, 7, 7] = True  # isolated voxel: removed
    mask[1, 0, 0, 0] = mask[1, 5, 7, 7] = True  # channel 1 not listed: untouched
    out = largest_connected_component(mask, channels=[0, 2])
    assert isinstance(out, np.ndarray) and out.dtype == bool
    expected = mask.copy()
    expected[0, 5, 7, 7] = False
    np.testing.assert_array_equal(out, expected)
    assert not out[2].any()  # empty channel stays empty
    tensor_out = largest_connected_component(torch.from_numpy(mask), channels=(0,))
    assert isinstance(tensor_out, torch.Tensor)
    np.testing.assert_array_equal(tensor_out.numpy(), expected)


# -- SliceRecords ------------------------------------------------------------------------------------
def batch(volume_slices: list[tuple[int, int]], size: int = 8):
    """Probabilities/targets whose content encodes (volume, slice): a square of side 2 + slice at row volume."""
    probs = torch.zeros(len(volume_slices), 1, size, size)
    target = torch.zeros_like(probs, dtype=torch.bool)
    for i, (v, s) in enumerate(volume_slices):
        target[i, 0, v : v + 2, 0 : 2 + s] = True
        probs[i, 0, v : v + 2, 0 : 1 + s] = 0.9  # one column short: dice 2(1+s)/(2+s + 1+s)
    index = torch.tensor(volume_slices).T
    return probs, target, index[0], index[1]


def test_slice_records_dedup_and_sort():
    metric = SliceRecords()
    metric.update(*batch([(1, 2), (0, 1), (1, 1)]))
    metric.update(*batch([(0, 0), (1, 2)]))  # (1, 2) again: DistributedSampler padding
    records = metric.compute()
    assert set(records) == set(RECORD_KEYS)
    assert records["volume_index"].tolist() == [0, 0, 1, 1]
    assert records["slice_index"].tolist() == [0, 1, 1, 2]  # (0, 1) and (1, 1) are distinct slices
    expected_dice = [2 * (1 + s) / (3 + 2 * s) for s in [0, 1, 1, 2]]
    figures = slice_figures(records)  # computed after the epoch from the records' masks
    assert figures["dice"].tolist() == pytest.approx(expected_dice)
    assert figures["hausdorff_px"].tolist() == pytest.approx([1.0] * 4)
    assert records["probs_u8"].shape == (4, 1, 8, 8) and records["probs_u8"].dtype == torch.uint8
    assert records["probs_u8"].max().item() == round(0.9 * 255)
    assert summarize_slices(records) == pytest.approx({"dice_slice": np.mean(expected_dice), "hd_slice_px": 1.0})


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_slice_records_empty():
    records = SliceRecords().compute()
    assert all(len(records[key]) == 0 for key in RECORD_KEYS)
    with pytest.raises(ValueError):
        summarize_slices(records)


def test_slice_records_rejects_logits_and_label_maps():
    probs, target, v, s = batch([(0, 0)])
    with pytest.raises(ValueError):
        SliceRecords().update(probs * 4 - 2, target, v, s)
    with pytest.raises(ValueError):
        SliceRecords().update(probs, target.long() * 2, v, s)


def test_slice_threshold_is_inclusive():
    probs = torch.full((1, 1, 4, 4), 0.5)
    metric = SliceRecords()
    metric.update(probs, torch.ones(1, 1, 4, 4), torch.tensor([0]), torch.tensor([0]), threshold=0.5)
    assert slice_figures(metric.compute())["dice"].item() == pytest.approx(1.0)


def test_quantisation_keeps_threshold_side():
    metric = SliceRecords()
    probs = torch.tensor([0.4999, 0.5, 0.5001, 0.498]).reshape(1, 1, 2, 2)
    metric.update(probs, probs >= 0.5, torch.tensor([0]), torch.tensor([0]))
    restored = metric.compute()["probs_u8"].float() / 255
    assert ((restored >= 0.5) == (probs >= 0.5)).all()


# -- per-slice figures after the epoch: MONAI's values to the last bit ---------------------------------
def monai_slice_reference(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-slice Dice and Hausdorff (px) as ``SliceRecords.update`` computed them in the loop before they were
    deferred: MONAI's compute_dice and get_edge_surface_distance per slice and channel, the module's empty-mask
    conventions, float32 channel means. bool (B, C, H, W) -> float32 (B,), (B,)."""
    import warnings

    from monai.metrics import compute_dice
    from monai.metrics.utils import get_edge_surface_distance

    batch, channels, height, width = pred.shape
    dice = compute_dice(pred, target, include_background=True, ignore_empty=False).float().mean(dim=1)
    hd = []
    for b in range(batch):
        for c in range(channels):
            p, t = pred[b, c], target[b, c]
            if not p.any() and not t.any():
                hd.append(0.0)
            elif bool(p.any()) != bool(t.any()):
                hd.append(math.hypot(height, width))
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                    _, distances, _ = get_edge_surface_distance(p.float(), t.float(), symmetric=True, warn_empty=False)
                hd.append(float(max(d.max() for d in distances)))
    return dice, torch.tensor(hd, dtype=torch.float32).reshape(batch, channels).mean(dim=1)


def random_masks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bool (N, C, H, W) masks of every kind the conventions care about: empty, full, single pixels, noise, blobs,
    rectangles touching the border."""
    from scipy import ndimage

    masks = np.zeros(shape, dtype=bool)
    height, width = shape[-2:]
    for mask in masks.reshape(-1, height, width):
        kind = rng.integers(0, 6)
        if kind == 1:
            mask[:] = rng.random((height, width)) < rng.random()
        elif kind == 2:
            mask[:] = ndimage.gaussian_filter(rng.random((height, width)), 1.5) > 0.5
        elif kind == 3:
            mask[rng.integers(height), rng.integers(width)] = True
        elif kind == 4:
            mask[:] = True
        elif kind == 5:
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y : y + rng.integers(1, height), x : x + rng.integers(1, width)] = True
    return masks


@pytest.mark.parametrize("channels", [1, 3])
def test_slice_dice_hausdorff_equals_monai_reference(channels):
    rng = np.random.default_rng(channels)
    pred = random_masks(rng, (24, channels, 17, 21))
    target = random_masks(rng, pred.shape)
    target[::4], target[1::4] = pred[::4], np.roll(pred[1::4], 1, axis=-1)  # identical and near-identical slices
    pred, target = torch.from_numpy(pred), torch.from_numpy(target)
    expected = monai_slice_reference(pred, target)
    for value, reference in zip(slice_dice_hausdorff(pred, target), expected):
        assert torch.equal(value, reference)  # to the last bit


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_deferred_slice_figures_equal_the_loops_monai_figures():
    """The per-slice figures, computed after the epoch from the records (in-process, per volume in a simulated rank's
    share, in worker processes), are the float32 values the loop's MONAI computation gave, record for record, and
    their means the same floats. At threshold 0.31 the uint8 records would flip pixels: the stored bits must not."""
    rng = np.random.default_rng(11)
    threshold, channels, size = 0.31, 2, (19, 21)
    pred, target, probs = {}, {}, {}
    for v, depth in enumerate((7, 5, 9)):
        pred[v] = random_masks(rng, (depth, channels, *size))
        target[v] = random_masks(rng, pred[v].shape)
        target[v][::3] = np.roll(pred[v][::3], 1, axis=-2)
        low = rng.uniform(0, threshold, pred[v].shape)
        high = np.where(rng.random(pred[v].shape) < 0.3, 0.3105, rng.uniform(threshold, 1, pred[v].shape))
        probs[v] = torch.from_numpy(np.where(pred[v], high, low).astype(np.float32))
        pred[v] = probs[v].numpy() >= threshold  # the float32 thresholding the loop did
    samples = [(v, s) for v in pred for s in range(len(pred[v]))]
    order = rng.permutation(len(samples)).tolist() + [0]  # shuffled, one sample repeated (DistributedSampler padding)
    metric = SliceRecords()
    for start in range(0, len(order), 6):
        batch_samples = [samples[i] for i in order[start : start + 6]]
        metric.update(torch.stack([probs[v][s] for v, s in batch_samples]),
                      torch.from_numpy(np.stack([target[v][s] for v, s in batch_samples])),
                      torch.tensor([v for v, _ in batch_samples]), torch.tensor([s for _, s in batch_samples]), threshold)
    records = metric.compute()
    assert ((records["probs_u8"].float() / 255 >= threshold).numpy() != np.concatenate(list(pred.values()))).any()
    dice, hd = monai_slice_reference(torch.from_numpy(np.concatenate(list(pred.values()))),
                                      torch.from_numpy(np.concatenate(list(target.values()))))
    assert 0 < float(dice.mean()) < 1 and float(hd.max()) > 0
    expected = {"dice_slice": float(dice.double().mean()), "hd_slice_px": float(hd.double().mean())}  # the old means

    in_process = slice_figures(records, chunk=4)
    assert torch.equal(in_process["dice"], dice) and torch.equal(in_process["hausdorff_px"], hd)
    assert summarize_slices(records) == expected  # exact floats, not approx

    load = lambda v: (target[v].transpose(1, 0, 2, 3), (2.0, 0.8, 0.8))  # noqa: E731  the training-resolution target
    volumes_only = volume_figures(records, load, (0,), threshold)
    rows = {}
    for rank in range(2):  # each simulated rank scores its share of the volumes, then the rows are gathered
        rows |= volume_figures(records, load, (0,), threshold, volume_share(record_volumes(records), rank, 2), with_slices=True)
    gathered = gather_volume_rows(rows)
    assert all(len(gathered[v][key]) == len(pred[v]) for v in pred for key in SLICE_KEYS)
    per_volume, figures = split_slice_figures(gathered)
    assert per_volume == volumes_only  # the volume rows are untouched
    assert torch.equal(figures["dice"], dice) and torch.equal(figures["hausdorff_px"], hd)
    assert summarize_slices(records, figures) == expected
    assert volume_figures(records, load, (0,), threshold, workers=2, with_slices=True) == gathered
    with pytest.raises(ValueError, match="per-slice figures"):
        summarize_slices(records, {key: value[:-1] for key, value in figures.items()})


# -- summarize_volumes -------------------------------------------------------------------------------
def make_volumes(seed: int = 0):
    """Targets at 64x64 made of 2x2 blocks, and their exact 32x32 training-resolution probabilities.

    Bilinear x2 upsampling puts weight >= 0.75 * 0.75 on each pixel's own block, so thresholding at 0.5
    reproduces the blocks exactly."""
    rng = np.random.default_rng(seed)
    low, full = {}, {}
    for v, depth in [(0, 6), (1, 5)]:
        coarse = np.zeros((1, depth, 32, 32), dtype=bool)
        coarse[0, :, 6:20, 8 + v : 26] = True
        coarse[0, :, 6:10, 8:12] = rng.random((depth, 4, 4)) > 0.5  # irregular border
        low[v] = coarse
        full[v] = coarse.repeat(2, axis=2).repeat(2, axis=3)
    return low, full


SPACINGS = {0: (2.5, 0.8, 0.8), 1: (1.0, 0.6, 0.7)}


def records_for(low, pairs, rank_metric=None):
    metric = rank_metric or SliceRecords()
    for v, s in pairs:
        probs = torch.from_numpy(low[v][:, s]).float()[None]
        metric.update(probs, probs > 0.5, torch.tensor([v]), torch.tensor([s]))
    return metric


def test_summarize_volumes_exact_reassembly_at_original_resolution():
    low, full = make_volumes()
    # Slice 0 of volume 0 is never evaluated and differs from the prediction: it must be ignored.
    full[0][0, 0] = ~full[0][0, 0]
    pairs = [(v, s) for v in low for s in range(low[v].shape[1]) if (v, s) != (0, 0)]
    records = records_for(low, pairs).compute()
    means, per_volume = summarize_volumes(records, lambda v: (full[v], SPACINGS[v]), return_per_volume=True)
    assert means == pytest.approx({"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0})
    assert sorted(per_volume) == [0, 1]


def test_summarize_volumes_largest_component_removes_islands():
    low, full = make_volumes()
    noisy = {v: m.copy() for v, m in low.items()}
    noisy[1][0, 2, 28:30, 28:30] = True  # island far from the liver in one slice
    records = records_for(noisy, [(1, s) for s in range(5)]).compute()
    load = lambda v: (full[v], SPACINGS[v])  # noqa: E731
    assert summarize_volumes(records, load, (0,)) == pytest.approx(
        {"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0}
    )
    kept = summarize_volumes(records, load, largest_component_channels=())
    assert kept["dice_volume"] < 1.0 and kept["hd_volume_mm"] > 10 * 0.6


def test_summarize_volumes_pixel_alignment_and_inclusive_threshold():
    # A full-height band of low-res columns 1..2 (of 16) covers exactly columns 4..11 (of 64) once upsampled:
    # pixel areas correspond (align_corners=False; align_corners=True would give columns 3..12).
    low = np.zeros((1, 3, 16, 16), dtype=bool)
    low[0, :, :, 1:3] = True
    full = low.repeat(4, axis=2).repeat(4, axis=3)
    records = records_for({0: low}, [(0, s) for s in range(3)]).compute()
    assert summarize_volumes(records, lambda v: (full, SPACINGS[0]))["dice_volume"] == 1.0
    # Without resizing, probabilities of exactly 1.0 are foreground at threshold 1.0 (the threshold is inclusive).
    assert summarize_volumes(records, lambda v: (low, SPACINGS[0]), threshold=1.0)["dice_volume"] == 1.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the hand-gathered metric never saw update()
def test_summarize_volumes_same_result_across_simulated_ranks():
    low, full = make_volumes()
    # Predictions shifted by one block along x: imperfect, so the comparison is not trivially 1/0.
    shifted = {v: np.roll(m, 1, axis=3) for v, m in low.items()}
    pairs = [(v, s) for v in low for s in range(low[v].shape[1])]
    single = records_for(shifted, pairs[::-1]).compute()  # one device, reverse order
    rank0 = records_for(shifted, pairs[0::2])
    rank1 = records_for(shifted, pairs[1::2] + [pairs[0]])  # padding repeats a sample
    gathered = SliceRecords()  # state after torchmetrics' sync: per-rank lists concatenated in rank order
    for key in RECORD_KEYS:
        setattr(gathered, key, torch.cat([torch.cat(getattr(rank1, key)), torch.cat(getattr(rank0, key))]))
    rank0.merge_state(rank1)  # torchmetrics' public merge of a second state
    load = lambda v: (full[v], SPACINGS[v])  # noqa: E731
    expected = summarize_volumes(single, load, return_per_volume=True)
    for merged in (gathered.compute(), rank0.compute()):
        assert all(torch.equal(merged[k].cpu(), single[k].cpu()) for k in RECORD_KEYS)
        assert summarize_volumes(merged, load, return_per_volume=True) == expected
    # Shift by 2 px at full resolution along x: HD = 2 * sx, per volume.
    assert expected[1][0]["hd_volume_mm"] == pytest.approx(2 * 0.8)
    assert expected[1][1]["hd_volume_mm"] == pytest.approx(2 * 0.7)
    # Sharded per-volume work: each simulated rank scores its share, the merged rows are one process's rows.
    shares = [volume_share(record_volumes(single), rank, 2) for rank in range(2)]
    assert shares == [[0], [1]]
    rows = [volume_figures(single, load, (0,), 0.5, share) for share in shares]
    assert gather_volume_rows(rows[1] | rows[0]) == expected[1]
    assert list(gather_volume_rows(rows[1] | rows[0])) == [0, 1]
    assert mean_volume_figures(expected[1]) == expected[0]
    assert 0 < expected[0]["dice_volume"] < 1


def test_summarize_volumes_empty_prediction_is_finite():
    _, full = make_volumes()
    metric = SliceRecords()
    for s in range(full[1].shape[1]):
        metric.update(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), torch.tensor([1]), torch.tensor([s]))
    records = metric.compute()
    means = summarize_volumes(records, lambda v: (full[v], SPACINGS[v]))
    diagonal = math.sqrt((5 * 1.0) ** 2 + (64 * 0.6) ** 2 + (64 * 0.7) ** 2)
    assert means == pytest.approx({"dice_volume": 0.0, "hd95_volume_mm": diagonal, "hd_volume_mm": diagonal})
    assert summarize_slices(records) == pytest.approx({"dice_slice": 1.0, "hd_slice_px": 0.0})
    with pytest.raises(ValueError):
        summarize_volumes({key: value[:0] for key, value in records.items()}, lambda v: (full[v], SPACINGS[v]))


# -- per-volume figures in worker processes ---------------------------------------------------------
def noisy_volumes(count: int = 4):
    """Two-channel volumes of 5-8 slices: training-resolution (32x32) soft probabilities whose upsampled threshold
    differs from the 64x64 targets here and there (islands, ragged borders), so every figure is a non-trivial float."""
    rng = np.random.default_rng(7)
    probs, full = {}, {}
    for v in range(count):
        depth = 5 + v
        liver = np.zeros((depth, 64, 64), dtype=bool)
        liver[:, 10 + v : 50, 12 : 52 - v] = True
        lesion = np.zeros_like(liver)
        lesion[1:-1, 20:30, 25 + v : 35] = True
        full[v] = np.stack([liver, lesion])
        coarse = full[v][:, :, ::2, ::2].astype(np.float32) * 0.7 + rng.random((2, depth, 32, 32), dtype=np.float32) * 0.3
        coarse[0, depth // 2, 2:5, 2:5] = 0.9  # an island the largest component removes
        probs[v] = torch.from_numpy(coarse)
    metric = SliceRecords()
    for v, p in probs.items():
        batch = p.permute(1, 0, 2, 3)  # (Z, C, h, w)
        metric.update(batch, batch >= 0.5, torch.full((len(batch),), v), torch.arange(len(batch)))
    return metric.compute(), full


class RecordingLoad:
    """``load_target`` that leaves a file per call naming the process that made it (a forked worker's calls
    cannot be seen otherwise)."""

    def __init__(self, full: dict, spacing: tuple, folder):
        self.full, self.spacing, self.folder = full, spacing, folder

    def __call__(self, v: int):
        (self.folder / f"{v}-{os.getpid()}").touch()
        return self.full[v], self.spacing

    def processes(self) -> set[int]:
        return {int(path.name.split("-")[1]) for path in self.folder.iterdir()}


def test_volume_figures_in_worker_processes_equal_the_in_process_figures(tmp_path):
    records, full = noisy_volumes()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = RecordingLoad(full, (2.5, 0.8, 0.7), tmp_path / "one"), RecordingLoad(full, (2.5, 0.8, 0.7), tmp_path / "two")
    in_process = volume_figures(records, one, (0,), 0.5, workers=1)
    in_workers = volume_figures(records, two, (0,), 0.5, workers=2)
    assert in_workers == in_process  # every float to the last bit, and the volumes in the same order
    assert list(in_workers) == [0, 1, 2, 3]
    assert all(0 < figures["dice_volume"] < 1 and figures["hd_volume_mm"] > 0 for figures in in_process.values())
    assert one.processes() == {os.getpid()}
    assert len(two.processes()) == 2 and os.getpid() not in two.processes()  # two forked workers did the work
    # A share of the volumes, in workers, gives the same rows as in-process.
    assert volume_figures(records, two, (0,), 0.5, volumes=[3, 1], workers=2) == {3: in_process[3], 1: in_process[1]}


def test_reassembly_in_chunks_equals_the_whole_stack():
    probs = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (11, 2, 24, 24), dtype=np.uint8))
    whole = metrics._reassemble(probs, (61, 50), 0.5, chunk=len(probs))
    assert whole.shape == (2, 11, 61, 50) and whole.any() and not whole.all()
    assert torch.equal(metrics._reassemble(probs, (61, 50), 0.5, chunk=4), whole)


def test_metric_workers_automatic_count(monkeypatch):
    monkeypatch.setattr(metrics, "_usable_cpus", lambda: 16)
    big = metrics.PARALLEL_MIN_VOXELS
    assert metric_workers(20, big) == 16  # the cores, capped...
    assert metric_workers(5, big) == 5  # ...by the volumes
    assert metric_workers(20, big, local_processes=4) == 4  # a node's ranks share its cores
    assert metric_workers(20, big, local_processes=32) == 1
    # No pool for a single volume or a small share: unit tests and smoke runs fork nothing.
    assert metric_workers(1, 100 * big) == 1
    assert metric_workers(20, big - 1) == 1
    records, _ = noisy_volumes()
    assert share_voxels(records, [0, 2]) == (5 + 7) * 2 * 32 * 32
    assert share_voxels(records, []) == 0
    assert metric_workers(4, share_voxels(records, range(4))) == 1
    # An explicit count overrides the rule, capped by the volumes.
    assert metric_workers(4, 10, requested=3) == 3
    assert metric_workers(4, big, requested=9) == 4
    assert metric_workers(1, big, requested=9) == 1
    with pytest.raises(ValueError):
        metric_workers(4, big, requested=0)
    monkeypatch.setattr(metrics.sys, "platform", "darwin")  # workers are forked: Linux only
    assert metric_workers(20, big) == 1 and metric_workers(20, big, requested=4) == 1


def test_summarize_records_scores_in_the_requested_workers(tmp_path):
    records, full = noisy_volumes(3)
    rows = {}
    for count in (1, 2):
        (tmp_path / str(count)).mkdir()
        load = RecordingLoad(full, (1.0, 0.7, 0.7), tmp_path / str(count))
        module = BaselineUNet(base_channels=4, out_channels=2, metric_workers=count)
        module._trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams=SimpleNamespace(target="both"), eval_target=load),
                                          world_size=1, num_devices=1, global_rank=0)
        figures, rows[count] = module.summarize_records(records)
        assert (os.getpid() in load.processes()) == (count == 1)
        assert module.hparams.metric_workers == count
    assert rows[2] == rows[1] and sorted(rows[1]) == [0, 1, 2]
    with pytest.raises(CheckpointError, match="metric_workers"):
        BaselineUNet(metric_workers=0)
