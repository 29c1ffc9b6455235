"""Tests of lightning_modules.metrics.surface_distance: MONAI's edges and symmetric surface distances to the last bit, on
both of its ways to answer far queries (the KD-tree and the distance transform), and its bounding box."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics.utils import get_edge_surface_distance, get_mask_edges
from scipy import ndimage

import lightning_modules.metrics.surface_distance as surface_distance
from lightning_modules.metrics.surface_distance import joint_box, mask_edges, surface_distances


def _monai_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecated argument, passed internally
        _, distances, _ = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(truth), spacing=list(spacing), symmetric=True, warn_empty=False
        )
    return distances


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1


def _cases():
    """(pred, truth, spacing): near surfaces, specks, a far blob, a mask filling the whole array (the worst case
    of the KD-tree: the other surface far inside it), 2D and 3D, anisotropic spacing."""
    rng = np.random.default_rng(7)
    shape3, spacing3 = (18, 40, 36), (2.5, 0.8, 0.7)
    liver = _ellipsoid(shape3, (9, 20, 16), (6, 12, 10))
    shifted = np.roll(liver, 2, axis=2)
    blob = _ellipsoid(shape3, (9, 20, 32), (3, 4, 3))
    yield "near", shifted, liver, spacing3
    yield "specks", shifted | (rng.random(shape3) > 0.995), liver, spacing3
    yield "far blob", shifted | blob, liver, spacing3
    yield "everywhere", np.ones(shape3, dtype=bool), liver, spacing3
    yield "disjoint corners", _ellipsoid(shape3, (2, 3, 3), (2, 3, 3)), _ellipsoid(shape3, (15, 36, 32), (2, 3, 3)), spacing3
    shape2 = (48, 40)
    disc = _ellipsoid(shape2, (20, 18), (12, 10))
    yield "2D random", rng.random(shape2) > 0.6, disc, (1.0, 1.0)
    yield "2D everywhere", np.ones(shape2, dtype=bool), disc, (0.7, 0.9)


CASES = list(_cases())


@pytest.mark.parametrize("shape", [(5,), (6, 7), (1, 9), (4, 5, 6), (1, 4, 4), (3, 1, 8)])
def test_mask_edges_equal_monai_shape_table(shape):
    rng = np.random.default_rng(len(shape))
    for density in (0.3, 0.7, 1.0):
        mask = rng.random(shape) < density
        edges = mask_edges(mask)
        assert edges.shape == mask.shape and edges.dtype == bool
        np.testing.assert_array_equal(edges, mask ^ ndimage.binary_erosion(mask))  # MONAI's definition
    if len(shape) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai_edges = get_mask_edges(torch.from_numpy(mask), torch.from_numpy(mask), crop=False)[0]
        np.testing.assert_array_equal(edges, monai_edges.numpy())


@pytest.mark.parametrize("way", ["kd-tree", "transform"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_distances_equal_monai_to_the_last_bit(case, way, monkeypatch):
    _, pred, truth, spacing = case
    # Force the far queries' way; time the probe on only 4 of them so that most go the forced way.
    monkeypatch.setattr(surface_distance, "_PROBE_QUERIES", 4)
    monkeypatch.setattr(surface_distance, "_TRANSFORM_S_PER_VOXEL", float("inf") if way == "kd-tree" else -1.0)
    transforms = []
    real_transform = surface_distance._nearest_edge_voxels
    monkeypatch.setattr(surface_distance, "_nearest_edge_voxels", lambda *a: transforms.append(1) or real_transform(*a))
    ours = surface_distances(pred, truth, spacing)
    theirs = _monai_distances(pred, truth, spacing)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)  # same values in the same (C) order: means and quantiles agree to the bit
    if way == "kd-tree":
        assert not transforms
    elif ours[0].max() > 2 * max(spacing) or ours[1].max() > 2 * max(spacing):
        assert transforms  # some query lay beyond the near radius: the transform answered it


def test_the_automatic_choice_gives_the_same_values_on_either_side_of_it():
    _, pred, truth, spacing = CASES[3]  # "everywhere": thousands of far queries
    theirs = _monai_distances(pred, truth, spacing)
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ours = surface_distances(pred, truth, spacing)
        finally:
            torch.set_num_threads(previous)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_distances_in_a_larger_volume_are_those_of_the_crop():
    _, pred, truth, spacing = CASES[2]
    big = [np.zeros((30, 64, 60), dtype=bool) for _ in range(2)]
    for small, whole in zip((pred, truth), big):
        whole[5:23, 10:50, 12:48] = small
    assert all(torch.equal(a, b) for a, b in zip(surface_distances(*big, spacing), _monai_distances(*big, spacing)))


def test_hand_computed_distances():
    # Two single voxels, 3 slices (2 mm each) and 4 columns (0.5 mm) apart: each is its own edge, 5 mm from the other.
    a, b = np.zeros((5, 2, 6), dtype=bool), np.zeros((5, 2, 6), dtype=bool)
    a[0, 1, 0] = b[3, 1, 4] = True
    to_b, to_a = surface_distances(a, b, (2.0, 1.0, 0.5))
    assert to_b.tolist() == [pytest.approx(float(np.hypot(6.0, 2.0)))] and to_a.tolist() == to_b.tolist()


def test_empty_or_ill_typed_masks_are_refused():
    mask = np.zeros((3, 4, 4), dtype=bool)
    mask[1, 1, 1] = True
    with pytest.raises(ValueError, match="foreground"):
        surface_distances(mask, np.zeros_like(mask), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="bool masks"):  # a label map would be read as its bits
        surface_distances(mask.astype(np.uint8), mask.astype(np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="one shape"):
        surface_distances(mask, mask[:, :, :3], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="one spacing per axis"):
        surface_distances(mask, mask, (1.0, 1.0))


def test_joint_box_hand_computed():
    a = np.zeros((10, 12, 14), dtype=bool)
    b = np.zeros_like(a)
    a[2, 7, 3] = a[4, 1, 3] = True  # extents z 2..4, y 1..7, x 3
    b[6, 5, 0] = b[3, 5, 9] = True  # z 3..6, y 5, x 0..9
    assert joint_box(a, b) == (slice(2, 7), slice(1, 8), slice(0, 10))
    assert joint_box(a, b, margin=1) == (slice(1, 8), slice(0, 9), slice(0, 11))  # clipped at x = 0
    assert joint_box(a, np.zeros_like(a), margin=2) == (slice(0, 7), slice(0, 10), slice(1, 6))
    assert joint_box(np.zeros_like(a), np.zeros_like(a)) is None
