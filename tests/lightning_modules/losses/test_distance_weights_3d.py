"""The U-Net distance weight maps of 3D crops (the mask-mining paper's liver pwce for its 3D networks), by brute force
over every pair of voxels, and the 3D networks that train with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lightning_modules import BaselineUNet
from lightning_modules.losses.error_masks import PixelWeightedCrossEntropy, error_mask
from lightning_modules.losses.segmentation import PixelWeightedBCE, distance_weight_maps, unet_weight_map


def brute_force(target: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """``1 + w0 exp(-(d1 + d2)^2 / 2 sigma^2)`` of a 3D crop of two or more objects, every voxel against every object voxel."""
    labels, n = ndimage.label(target, structure=np.ones((3, 3, 3)))
    assert n >= 2
    grid = np.argwhere(np.ones(target.shape, dtype=bool))
    distances = np.stack([np.sqrt(((grid[:, None] - np.argwhere(labels == k)[None]) ** 2).sum(-1)).min(1) for k in range(1, n + 1)])
    d = np.sort(distances, axis=0)
    return (1 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))).reshape(target.shape)


def stacked_objects() -> np.ndarray:
    """Two 2x3x3 blocks one above the other, 2 slices apart: no slice holds both."""
    target = np.zeros((8, 7, 9), dtype=bool)
    target[1:3, 2:5, 3:6] = True
    target[5:7, 2:5, 3:6] = True
    return target


def test_a_3d_crop_is_weighted_as_a_whole_by_hand():
    target = stacked_objects()
    maps = unet_weight_map(target, w0=10.0, sigma=2.0)
    assert maps.shape == target.shape and maps.dtype == np.float32
    assert np.allclose(maps, brute_force(target, 10.0, 2.0), atol=1e-5)
    # a voxel of the gap, on neither object's slices: 1 slice to the lower object (slice 2), 2 to the upper (slice 5)
    assert maps[3, 3, 4] == pytest.approx(1 + 10 * np.exp(-(1 + 2) ** 2 / 8), rel=1e-6)
    per_slice = np.stack([unet_weight_map(s, 10.0, 2.0) for s in target])
    assert per_slice[3, 3, 4] == 1.0 and maps[3, 3, 4] > 1.1  # slice by slice the gap weighs nothing


def test_one_object_in_3d_peaks_on_its_boundary_voxels():
    target = np.zeros((7, 9, 9), dtype=bool)
    target[2:5, 2:7, 2:7] = True
    maps = unet_weight_map(target, w0=5.0, sigma=1.5)
    boundary = target & ~ndimage.binary_erosion(target, border_value=1)  # 6-neighbour boundary: the centre is inside
    assert maps[boundary] == pytest.approx(6.0) and maps[3, 4, 4] == pytest.approx(1 + 5 * np.exp(-1 / (2 * 1.5**2)))
    assert maps[0, 0, 0] == pytest.approx(1 + 5 * np.exp(-(2**2 + 2**2 + 2**2) / (2 * 1.5**2)))


def test_distant_objects_are_exact_where_their_boxes_end():
    # two lesions much farther apart than the distance at which a weight still shows in float32
    target = np.zeros((6, 12, 70), dtype=bool)
    target[2:4, 4:7, 2:5] = True
    target[2:4, 4:7, 64:67] = True
    assert np.allclose(unet_weight_map(target, 10.0, 3.0), brute_force(target, 10.0, 3.0), atol=1e-6)


def test_distance_weight_maps_of_a_batch_of_3d_crops():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 5, 6, 7, generator=generator) > 0.8
    maps = distance_weight_maps(target, 4.0, 2.0)
    assert maps.shape == target.shape
    for b in range(2):
        assert np.array_equal(maps[b, 0].numpy(), unet_weight_map(target[b, 0].numpy(), 4.0, 2.0))


def test_3d_pwce_with_distance_weights_by_hand():
    target_np = stacked_objects()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, *target_np.shape, generator=generator, dtype=torch.float64)
    p = torch.sigmoid(logits)[0, 0].numpy()
    bce = -(target_np * np.log(p) + (1 - target_np) * np.log(1 - p))
    weights = brute_force(target_np, 10.0, 5.0)
    loss = PixelWeightedBCE(distance_weights=True)(logits, torch.from_numpy(target_np)[None, None].double())
    assert float(loss) == pytest.approx((weights * bce).sum() / weights.sum(), rel=1e-5)
    # mask mining's 4-class pwce weights a 3D crop by the same map
    errors = error_mask(torch.from_numpy(target_np)[None, None], torch.from_numpy(target_np)[None, None])
    four = torch.randn(1, 4, *target_np.shape, generator=generator)
    mined = PixelWeightedCrossEntropy(distance_weights=True)(four, errors, torch.from_numpy(target_np)[None, None].float())
    ce = torch.nn.functional.cross_entropy(four, errors, reduction="none")[0].double().numpy()
    assert float(mined) == pytest.approx((weights * ce).sum() / weights.sum(), rel=1e-5)


def test_a_3d_network_takes_the_distance_weighted_pwce():
    module = BaselineUNet(spatial_dims=3, norm="batch", base_channels=4, seg_loss="pwce", distance_weights=True)
    mask = torch.from_numpy(stacked_objects())[None, None].float()
    logits = torch.randn(1, 1, *mask.shape[2:], generator=torch.Generator().manual_seed(2))
    loss = module.compute_losses({"seg": logits}, {"mask": mask})["loss"]
    assert float(loss) == pytest.approx(float(PixelWeightedBCE(distance_weights=True)(logits, mask)), rel=1e-6)
    assert float(loss) != pytest.approx(float(PixelWeightedBCE()(logits, mask)), rel=1e-3)
