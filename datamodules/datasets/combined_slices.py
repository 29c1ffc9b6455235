"""The combined model's training samples (``sampling: combined``): one whole resized slice for its liver network and a
full-resolution crop of the same slice in the liver region for its lesion network.

The liver network must see at training what it segments at evaluation (``cascade_2d.predict_volume``): every
``image_size`` slice of the cache's resized stack (``image.npy``), liver-free slices included. The lesion network
sees the CT at full in-plane resolution around the liver, with the liver network's probability at the same pixels
(``lightning_modules.inference.liver_guided``), so each sample carries its crop's origin in the full-resolution slice.

Augmentation draws one affine map per sample (flips, rotation, zoom about the slice's centre, in coordinates
normalised to [-1, 1] across the slice) and applies it to the resized slice and, through the same normalised
coordinates, to the full-resolution slice the crop is cut from: the crop stays exactly the pixels of the augmented
slice at its origin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.datasets.liver_region import LiverCropDataset
from datamodules.datasets.slices import SliceDataset, context_indices, target_channels
from datamodules.io.cache import CachedVolume
from datamodules.settings import Augmentation


def draw_affine(augmentation: Augmentation) -> torch.Tensor | None:
    """A random (2, 3) ``affine_grid`` matrix (output -> input normalised coordinates), None when nothing was drawn.

    The distributions are ``Augmentation``'s: a flip along each axis with ``flip_prob``, a rotation within
    +-``rotate_degrees`` and a zoom in ``zoom_range`` (a zoom above 1 magnifies), each with ``prob``.
    """
    a = augmentation
    u = torch.rand(6, dtype=torch.float64).tolist()  # torch's generator, seeded in every DataLoader worker
    flips = [-1.0 if u[i] < a.flip_prob else 1.0 for i in (0, 1)]
    angle = math.radians((2 * u[3] - 1) * a.rotate_degrees) if u[2] < a.prob else 0.0
    zoom = a.zoom_range[0] + u[5] * (a.zoom_range[1] - a.zoom_range[0]) if u[4] < a.prob else 1.0
    if flips == [1.0, 1.0] and angle == 0.0 and zoom == 1.0:
        return None
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    return torch.tensor([[flips[1] * cos, -flips[1] * sin, 0.0], [flips[0] * sin, flips[0] * cos, 0.0]], dtype=torch.float32)


def warp(image: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """(C, H, W) resampled through ``theta`` over the whole slice (zeros outside it)."""
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def warp_crop(full: torch.Tensor, theta: torch.Tensor, origin: Sequence[int], size: int, mode: str) -> torch.Tensor:
    """The ``size`` x ``size`` pixels at ``origin`` of the (C, H, W) slice ``full`` resampled through ``theta``; 0 beyond
    the slice, as ``warp`` (the liver network's probability is 0 there too)."""
    height, width = full.shape[-2:]
    rows, cols = origin[0] + torch.arange(size, dtype=torch.float64), origin[1] + torch.arange(size, dtype=torch.float64)
    y, x = torch.meshgrid((2 * rows + 1) / height - 1, (2 * cols + 1) / width - 1, indexing="ij")
    points = torch.stack([x, y, torch.ones_like(x)], dim=-1) @ theta.double().T
    crop = F.grid_sample(full[None], points[None].float(), mode=mode, padding_mode="zeros", align_corners=False)[0]
    inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None]
    return crop * inside


def moved_origin(origin: Sequence[int], size: int, full_size: Sequence[int], theta: torch.Tensor) -> tuple[int, int]:
    """Origin of the ``size`` window of the augmented slice whose centre shows what the centre of the window at
    ``origin`` of the original slice showed (a flip moves the liver to the other side)."""
    edge = torch.tensor([origin[1] + size / 2, origin[0] + size / 2], dtype=torch.float64)  # (x, y), pixel edges
    extent = torch.tensor([full_size[1], full_size[0]], dtype=torch.float64)
    moved = torch.linalg.solve(theta[:, :2].double(), 2 * edge / extent - 1)
    x0, y0 = ((moved + 1) * extent / 2 - size / 2).round().long().tolist()
    return y0, x0


class CombinedSliceDataset(Dataset):
    """One sample per training slice (liver-free ones included), target ``both``.

    ================  ====================  ======================================================
    key               value                 meaning
    ================  ====================  ======================================================
    ``image``         float32 (K, S, S)     the resized slice and its context (``SliceDataset``)
    ``mask``          float32 (2, S, S)     liver, lesion at the resized scale
    ``crop_image``    float32 (K, c, c)     the same slice at full resolution in the liver region
    ``crop_mask``     float32 (2, c, c)     liver, lesion of the crop
    ``crop_origin``   int64 (2,)            (y0, x0) of the crop in the full-resolution slice
    ``crop_valid``    float32 ()            1 on slices with liver; 0: no crop (all zeros)
    ``full_size``     int64 (2,)            (H, W) of the full-resolution slice
    ================  ====================  ======================================================

    plus ``SliceDataset``'s ``label`` (liver on the slice), ``volume_index``, ``slice_index`` and ``volume``. Crops
    are drawn as ``LiverCropDataset`` draws them (``crop_size``, ``crop_margin``) on slices with ground-truth liver.
    """

    def __init__(self, volumes: Sequence[CachedVolume], volume_indices: Sequence[int], slices: Sequence[np.ndarray],
                 context_slices: int = 0, crop_size: int = 256, crop_margin: int = 16, augmentation: Augmentation | None = None):
        self.whole = SliceDataset(volumes, volume_indices, slices, "both", context_slices)
        self.crops = LiverCropDataset(volumes, volume_indices, "both", context_slices, crop_size, crop_margin)
        self.liver_slices = {(int(p), int(z)) for p, z in self.crops.index}
        self.crop_size, self.augmentation = crop_size, augmentation

    def __len__(self) -> int:
        return len(self.whole)

    @property
    def index(self) -> np.ndarray:
        return self.whole.index

    def slice_labels(self) -> np.ndarray:
        """Whether each sample's slice has liver (for balanced sampling)."""
        return self.whole.slice_labels()

    def read_full(self, volume: CachedVolume, z: int, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CT (K, h, w), target (2, h, w)) of slice ``z`` at full resolution in ``rows`` x ``cols``."""
        neighbours = context_indices(z, self.whole.context_slices, volume.num_slices)
        image = volume.read_image(((neighbours[0], neighbours[-1] + 1), rows, cols))[neighbours - neighbours[0]]
        mask = target_channels(volume.read_labels(((z, z + 1), rows, cols))[0], "both")
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(mask.astype(np.float32))

    def __getitem__(self, i: int) -> dict:
        sample = self.whole[i]
        position, z = (int(v) for v in self.whole.index[i])
        volume, c = self.whole.volumes[position], self.crop_size
        full_size = tuple(int(n) for n in volume.full_shape[1:])
        valid = (position, z) in self.liver_slices
        origin = self.crops.draw_crop(position)[2:] if valid else (0, 0)
        theta = draw_affine(self.augmentation) if self.augmentation is not None else None
        if theta is None and valid:
            crop, crop_mask = self.read_full(volume, z, (origin[0], origin[0] + c), (origin[1], origin[1] + c))
        elif valid:
            full, full_mask = self.read_full(volume, z, (0, full_size[0]), (0, full_size[1]))
            origin = moved_origin(origin, c, full_size, theta)
            crop, crop_mask = warp_crop(full, theta, origin, c, "bilinear"), warp_crop(full_mask, theta, origin, c, "nearest")
        else:
            crop, crop_mask = torch.zeros(len(sample["image"]), c, c), torch.zeros(2, c, c)
        if theta is not None:
            sample["image"], sample["mask"] = warp(sample["image"], theta, "bilinear"), warp(sample["mask"], theta, "nearest")
            sample["label"] = torch.tensor(float((sample["mask"] > 0.5).any()))
        sample.update(crop_image=crop, crop_mask=crop_mask, crop_origin=torch.tensor(origin, dtype=torch.int64),
                      crop_valid=torch.tensor(float(valid)), full_size=torch.tensor(full_size, dtype=torch.int64))
        return sample
