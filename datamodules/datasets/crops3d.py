"""3D datasets of the z-resampled volumes (``datamodules.io.volume3d``): random training crops (augmented by
``datamodules.augment.sample.InPlaneAugmentation``), and whole volumes for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai import transforms as mt
from torch.utils.data import Dataset

from datamodules.augment.sample import augment
from datamodules.datasets.liver_region import crop_start
from datamodules.datasets.slices import TARGETS, target_channels
from datamodules.io.cache import CachedVolume
from datamodules.errors import ConfigError
from datamodules.io.preprocess import grow_box
from datamodules.io.volume3d import DEFAULT_SLICE_SPACING_MM, NETWORK_DIVISOR, resample_volume

# What padding adds: air (any HU at or below the window's lower bound is 0 after windowing, the value MONAI's
# sliding window pads with at evaluation and prediction too) and background labels.
AIR = 0.0
BACKGROUND = 0


# -- crops --------------------------------------------------------------------------------------
def check_crop_size(crop_size: Sequence[int]) -> tuple[int, int, int]:
    """``crop_size`` as (D, H, W) ints; a one-line ConfigError unless three positive multiples of 16."""
    size = tuple(int(v) for v in crop_size)
    if len(size) != 3 or any(v <= 0 or v % NETWORK_DIVISOR for v in size):
        raise ConfigError(
            f"crop_size {tuple(crop_size)} (D, H, W) must be positive and divisible by {NETWORK_DIVISOR} on every axis "
            f"(the 3D U-Net halves each axis four times); use e.g. (64, 128, 128)"
        )
    return size


def read_inside(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The part of ``array[start:start + size]`` (per axis) that lies inside ``array``: a numpy copy, ``array``'s dtype."""
    return np.array(array[tuple(slice(max(0, s), min(n, s + k)) for n, s, k in zip(array.shape, start, size))])


def crop_padding(crop_size: Sequence[int]) -> Callable[[dict], dict]:
    """MONAI's ``SpatialPadd`` of a sample's ``image`` with ``AIR`` and its ``mask`` with background, up to ``crop_size``.

    Symmetric, as ``crop_start`` centres a crop on an axis shorter than it (and as MONAI's sliding window pads).
    """
    size = tuple(int(v) for v in crop_size)
    return mt.Compose([mt.SpatialPadd("image", size, method="symmetric", value=AIR),
                       mt.SpatialPadd("mask", size, method="symmetric", value=BACKGROUND)])


class Crop3DDataset(Dataset):
    """Random (D, H, W) crops of cached volumes resampled to ``slice_spacing_mm``, for 3D training.

    ``samples_per_volume`` samples per volume (sample i belongs to volume i // samples_per_volume);
    each access draws a new crop from torch's global RNG (four float64 uniforms per sample, so
    ``seed_everything`` and DataLoader workers, reseeded by torch, reproduce a run):

    * with probability ``positive_fraction`` the crop is centred on a voxel drawn uniformly among
      the target's foreground voxels (``target="liver"`` or ``"both"``: labels >= 1; ``"lesion"``:
      label 2), as MONAI's ``RandCropByPosNegLabeld`` does;
    * otherwise the centre is uniform in the volume's region: the whole volume for ``"liver"`` and
      ``"both"`` (unlike MONAI's negatives, which sit on background voxels: "anywhere" keeps the
      liver's edges in the negatives' view), and for ``"lesion"`` the liver's bounding box grown by
      ``crop_margin`` voxels per axis and clipped to the volume, as ``LiverCropDataset`` in 2D;
    * a volume without foreground of the target draws every centre in its region; a volume
      without liver has the whole volume as its ``"lesion"`` region.

    The crop is placed as in ``LiverCropDataset`` (``crop_start``): on an axis at least as long as
    the crop it is shifted inside the volume and still contains the centre; on a shorter axis (a thin
    slab: 17 slices at 2.5 mm against a 64-slice crop) it is centred on the volume and padded as
    nnU-Net and MONAI's ``SpatialPad`` do (``crop_padding``): the image with air (``AIR``, 0), the
    labels with background.
    MONAI's ``generate_pos_neg_label_crop_centers`` is not used: it needs every foreground voxel's
    index in memory (megabytes per volume) and draws from NumPy's RNG; here a foreground draw
    picks a slice from per-slice counts and reads that one slice.

    Each sample is a dict:

    ================  ======================  ==================================================
    key               value                   meaning
    ================  ======================  ==================================================
    ``image``         float32 (1, D, H, W)    windowed image in [0, 1] (``crop_size`` = (D, H, W))
    ``mask``          float32 (C, D, H, W)    target mask(s) 0/1, C as in ``target_channels``
                                              (1 for liver/lesion, 2 for both)
    ``label``         float32 ()              1 if the mask has foreground (after augmentation)
    ``volume_index``  int                     index of the volume in the data module
    ``volume``        str                     volume id
    ``crop_origin``   int64 (3,)              (z0, y0, x0) of the crop in the resampled grid,
                                              before augmentation (negative where padded)
    ================  ======================  ==================================================

    ``transform`` (e.g. ``InPlaneAugmentation()``) is applied to ``{"image", "mask"}`` with MONAI's
    metadata tracking off. The volumes are resampled (``resample_volume``) in the constructor.
    Raises ``ConfigError`` (one line) unless every ``crop_size`` axis is divisible by 16.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        volume_indices: Sequence[int],
        crop_size: Sequence[int] = (64, 128, 128),
        target: str = "liver",
        positive_fraction: float = 0.5,
        samples_per_volume: int = 1,
        transform: Callable | None = None,
        slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
        crop_margin: int | Sequence[int] = 8,
    ):
        self.crop_size = check_crop_size(crop_size)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        if samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be at least 1, got {samples_per_volume}")
        self.volumes = [resample_volume(v, slice_spacing_mm) for v in volumes]
        self.volume_indices = list(volume_indices)
        self.target = target
        self.positive_fraction = float(positive_fraction)
        self.samples_per_volume = int(samples_per_volume)
        self.transform = transform
        self.padding = crop_padding(self.crop_size)
        margins = (crop_margin,) * 3 if isinstance(crop_margin, int) else tuple(crop_margin)
        foreground = "lesion" if target == "lesion" else "liver"
        self._cumulative, self._regions = [], []
        for volume in self.volumes:
            self._cumulative.append(np.cumsum(volume.slice_voxels[foreground]))
            region = [[0, n] for n in volume.shape]
            if target == "lesion" and volume.slice_voxels["liver"].any():
                region = grow_box([list(axis) for axis in volume.liver_box], margins, volume.shape)
            self._regions.append(region)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def draw_crop(self, position: int) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
        """(centre, origin, positive) of a random crop of volume ``position``: voxel (z, y, x) and crop start (z0, y0, x0)."""
        volume = self.volumes[position]
        u = torch.rand(4, dtype=torch.float64).tolist()
        cumulative = self._cumulative[position]
        total = int(cumulative[-1])
        positive = u[0] < self.positive_fraction and total > 0
        if positive:
            rank = min(int(u[1] * total), total - 1)
            z = int(np.searchsorted(cumulative, rank, side="right"))
            before = int(cumulative[z - 1]) if z else 0
            labels = np.asarray(volume.label[z])
            present = labels == 2 if self.target == "lesion" else labels >= 1
            flat = int(np.flatnonzero(present)[rank - before])
            centre = (z, *divmod(flat, labels.shape[1]))
        else:
            centre = tuple(start + min(int(v * (stop - start)), stop - start - 1) for v, (start, stop) in zip(u[1:], self._regions[position]))
        origin = tuple(crop_start(c, k, 0, n) for c, k, n in zip(centre, self.crop_size, volume.shape))
        return centre, origin, positive

    def __getitem__(self, i: int) -> dict:
        position = i // self.samples_per_volume
        volume = self.volumes[position]
        _, origin, _ = self.draw_crop(position)
        image, labels = read_inside(volume.image, origin, self.crop_size), read_inside(volume.label, origin, self.crop_size)
        sample = {
            "image": torch.from_numpy(image)[None].float(),  # float16 -> float32 in torch, the fast side
            "mask": torch.from_numpy(target_channels(labels, self.target).astype(np.float32)),
        }
        if image.shape != self.crop_size:  # a volume shorter than the crop on some axis
            sample = augment(self.padding, sample)
        if self.transform is not None:
            sample = augment(self.transform, sample)
        sample["label"] = torch.tensor(float((sample["mask"] > 0.5).any()))
        sample["volume_index"] = self.volume_indices[position]
        sample["volume"] = volume.volume.volume_id
        sample["crop_origin"] = torch.tensor(origin, dtype=torch.int64)
        return sample


class WholeVolume3DDataset(Dataset):
    """One sample per whole volume resampled along z to ``slice_spacing_mm`` (``resample_volume``): 3D evaluation.

    ================  ======================  ==================================================
    key               value                   meaning
    ================  ======================  ==================================================
    ``image``         float32 (1, Z', S, S)   windowed image in [0, 1] on the resampled grid
    ``mask``          float32 (C, Z', S, S)   target mask(s) 0/1 on the resampled grid
    ``volume_index``  int                     index of the volume in the data module
    ``volume``        str                     volume id
    ================  ======================  ==================================================

    Volumes differ in Z': the loader batches one volume at a time.
    """

    def __init__(self, volumes: list[CachedVolume], volume_indices: list[int], target: str, slice_spacing_mm: float):
        self.volumes = [resample_volume(v, slice_spacing_mm) for v in volumes]
        self.volume_indices = list(volume_indices)
        self.target = target

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict:
        volume = self.volumes[i]
        return {
            # a writable float32 copy: the cached image is a read-only memory map (torch warns on sharing one)
            "image": torch.from_numpy(np.array(volume.image, dtype=np.float32))[None],
            "mask": torch.from_numpy(target_channels(np.asarray(volume.label), self.target).astype(np.float32)),
            "volume_index": self.volume_indices[i],
            "volume": volume.volume.volume_id,
        }
