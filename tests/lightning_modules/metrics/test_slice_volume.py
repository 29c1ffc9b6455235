"""Tests of lightning_modules.metrics.slice_volume against hand-computed values (not re-derived with the same MONAI calls)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.metrics.slice_volume import (
    SLICE_KEYS,
    largest_connected_component,
    slice_dice_hausdorff,
    slice_figures,
    split_slice_figures,
    summarize_slices,
    volume_dice_hausdorff,
)
from lightning_modules.metrics.slice_records import RECORD_KEYS, SliceRecords
from lightning_modules.metrics.volume_records import gather_volume_rows, volume_share
from lightning_modules.metrics.volume_scoring import record_volumes, volume_figures

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
