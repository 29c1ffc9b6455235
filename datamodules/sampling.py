"""The datasets of the train/val/test splits, per sampling mode of the LiTS DataModule.

=============  ==========================================  ===========================================
mode           train                                       val and test
=============  ==========================================  ===========================================
``slices``     ``SliceDataset``: the slices of the         ``SliceDataset``: every slice
               training volumes (``foreground_margin``)
``liver_roi``  ``LiverCropDataset``: crops in and around   ``VolumeDataset``: one unbatched sample per
               the liver at full resolution                volume (the cascade's input)
``combined``   ``CombinedSliceDataset``: whole slices,     ``VolumeDataset``, as ``liver_roi``
               each with a full-resolution liver crop
3D             ``Crop3DDataset``: random crops of the      ``WholeVolume3DDataset``: one whole
               resampled volumes                           resampled volume per step
=============  ==========================================  ===========================================

The test datasets hold the volumes of ``test_split``, evaluated like a test split whatever it names.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from datamodules.augment.sample import InPlaneAugmentation, training_augmentation
from datamodules.datasets.combined_slices import CombinedSliceDataset
from datamodules.datasets.crops3d import Crop3DDataset, WholeVolume3DDataset
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset
from datamodules.datasets.slices import SliceDataset, target_channels
from datamodules.io.cache import CachedVolume
from datamodules.errors import DataError
from datamodules.splits import SPLIT_NAMES


def split_datasets(data, volumes: list[CachedVolume], splits: dict[str, list[str]]) -> dict[str, Dataset]:
    """One dataset per split name for ``data`` (a ``LiTSDataModule``: its ``hparams`` and setting groups)."""
    position = {v.volume_id: i for i, v in enumerate(volumes)}
    datasets = {}
    for name in SPLIT_NAMES:
        indices = [position[i] for i in splits[data.hparams.test_split if name == "test" else name]]
        chosen = [volumes[i] for i in indices]
        if data.hparams.spatial_dims == 3:
            datasets[name] = volume_3d_dataset(data, name, chosen, indices)
        elif data.hparams.sampling == "liver_roi":
            datasets[name] = liver_roi_dataset(data, name, chosen, indices)
        elif data.hparams.sampling == "combined":
            datasets[name] = combined_dataset(data, name, chosen, indices)
        else:
            datasets[name] = slice_dataset(data, name, chosen, indices)
    return datasets


def sample_augmentation(data):
    """The workers' augmentation of 2D training samples (``augmentation.applied_to: sample``), or None."""
    a = data.augmentation
    if not a.enabled or a.applied_to != "sample":
        return None
    return training_augmentation(a.flip_prob, a.rotate_degrees, a.zoom_range, a.prob, a.intensity_shift, a.intensity_scale)


def slice_dataset(data, name: str, chosen: list[CachedVolume], indices: list[int]) -> SliceDataset:
    """``sampling: slices``: every whole slice, but for training only those ``foreground_margin`` allows, cropped to
    ``random_crop`` if set."""
    h = data.hparams
    if name != "train":
        return SliceDataset(chosen, indices, [np.arange(v.num_slices) for v in chosen], h.target, h.context_slices)
    slices = [training_slices(v, h.target, h.foreground_margin) for v in chosen]
    return SliceDataset(chosen, indices, slices, h.target, h.context_slices, sample_augmentation(data), h.get("random_crop"))


def training_slices(volume: CachedVolume, target: str, margin: int | None) -> np.ndarray:
    """The slices within ``margin`` slices of one with ``target`` foreground (every slice when ``margin`` is None)."""
    if margin is None:
        return np.arange(volume.num_slices)
    positive = np.flatnonzero(target_channels(np.asarray(volume.label), target).any(axis=(0, 2, 3)))
    keep = np.zeros(volume.num_slices, dtype=bool)
    for z in positive:
        keep[max(0, z - margin) : z + margin + 1] = True
    return np.flatnonzero(keep)


def liver_roi_dataset(data, name: str, chosen: list[CachedVolume], indices: list[int]) -> Dataset:
    """``sampling: liver_roi``: crops around the liver for training, whole volumes otherwise."""
    if name != "train":
        return VolumeDataset(chosen, indices)
    h, roi = data.hparams, data.liver_roi
    dataset = LiverCropDataset(chosen, indices, h.target, h.context_slices, roi.crop_size, roi.crop_margin, sample_augmentation(data))
    if chosen and not len(dataset):
        raise DataError(
            f"--data.sampling=liver_roi but the {len(chosen)} training volume(s) of {data.data_root} have no liver "
            "slice (label >= 1); use LiTS labels (0 background, 1 liver, 2 lesion) or --data.sampling=slices"
        )
    return dataset


def combined_dataset(data, name: str, chosen: list[CachedVolume], indices: list[int]) -> Dataset:
    """``sampling: combined``: each training slice whole (those ``foreground_margin`` allows, liver-free ones included) with
    a full-resolution crop of it in the liver region; whole volumes otherwise, as ``liver_roi``."""
    if name != "train":
        return VolumeDataset(chosen, indices)
    h, roi, a = data.hparams, data.liver_roi, data.augmentation
    slices = [training_slices(v, "liver", h.foreground_margin) for v in chosen]
    dataset = CombinedSliceDataset(chosen, indices, slices, h.context_slices, roi.crop_size, roi.crop_margin, a if a.enabled else None)
    if chosen and not dataset.liver_slices:
        raise DataError(f"--data.sampling=combined but the {len(chosen)} training volume(s) of {data.data_root} have no liver "
                        "slice (label >= 1); use LiTS labels (0 background, 1 liver, 2 lesion)")
    return dataset


def volume_3d_dataset(data, name: str, chosen: list[CachedVolume], indices: list[int]) -> Dataset:
    """``spatial_dims: 3``: random crops for training (padded where a volume is shorter than the crop), whole resampled
    volumes otherwise."""
    h, crops, a = data.hparams, data.volume_3d, data.augmentation
    if name != "train":
        return WholeVolume3DDataset(chosen, indices, h.target, h.slice_spacing_mm)
    transform = InPlaneAugmentation(a.flip_prob, a.rotate_degrees, a.zoom_range, a.prob, a.intensity_shift, a.intensity_scale) if a.enabled else None
    positive = 0.5 if h.positive_fraction is None else h.positive_fraction
    return Crop3DDataset(chosen, indices, crops.crop_size, h.target, positive, samples_per_volume=crops.crops_per_volume,
                         transform=transform, slice_spacing_mm=h.slice_spacing_mm, crop_margin=crops.crop_margin)
