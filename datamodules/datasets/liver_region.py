"""The lesion network's data: full-resolution crops in and around the liver, and whole volumes for evaluation.

A cascade's lesion network sees the CT at its original in-plane resolution (lesions are small),
restricted to the liver's neighbourhood: the cache keeps that region (``roi_image.npy``) and
``CachedVolume.read_image`` / ``read_labels`` read any box of it in full-resolution display
coordinates.

* ``LiverCropDataset``: training, one sample per slice with liver; each access draws a
  ``crop_size`` x ``crop_size`` window around a random centre in the liver's bounding box.
* ``VolumeDataset``: evaluation, one unbatched sample per volume (the resized stack for the liver
  network and the full-resolution region for the lesion network); the model assembles the
  prediction and compares it with ``LiTSDataModule.eval_target``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.io.cache import CachedVolume
from datamodules.datasets.slices import TARGETS, context_indices, finish_sample, target_channels


def crop_start(centre: int, size: int, start: int, stop: int) -> int:
    """Start of a ``size`` window around ``centre`` on an axis where the cached region is ``[start, stop)``.

    A region at least ``size`` long holds the whole window (shifted inward, still containing
    ``centre`` when ``centre`` is in the region); a shorter one is centred in it (zero padding).
    """
    if stop - start >= size:
        return min(max(centre - size // 2, start), stop - size)
    return start - (size - (stop - start)) // 2


class LiverCropDataset(Dataset):
    """Full-resolution crops in and around the liver, one sample per training slice that contains liver.

    Each access draws the crop centre uniformly (torch's global RNG, so DataLoader workers seeded by
    torch / Lightning's ``seed_everything`` reproduce a run) in the volume's liver bounding box
    (in-plane) grown by ``crop_margin`` pixels and clipped to the cached region ``roi_box``; the
    ``crop_size`` window around it is shifted to lie inside the cached region where that region is
    wide enough, and otherwise centred on it with zeros (the window's lower bound) outside.

    Each sample is a dict:

    ================  ====================  =====================================================
    key               value                 meaning
    ================  ====================  =====================================================
    ``image``         float32 (K, c, c)     the slice and ``context_slices`` on each side, windowed
                                            to [0, 1] at full resolution (c = ``crop_size``)
    ``mask``          float32 (C, c, c)     target mask(s), 0/1
    ``label``         float32 ()            1 if the mask has foreground (after augmentation)
    ``volume_index``  int64 ()              index of the volume in the data module
    ``slice_index``   int64 ()              axial index in the volume
    ``volume``        str                   volume id
    ``crop_origin``   int64 (2,)            (y0, x0) of the crop in full-resolution display
                                            coordinates (before augmentation)
    ================  ====================  =====================================================

    K = 2 * context_slices + 1; neighbours beyond the volume's ends repeat the edge slice, as in
    ``SliceDataset``; neighbours beyond the cached region (more than ``roi_margin_slices`` past the
    liver) are 0.

    ``liver_boxes`` (one ``[[z0, z1], [y0, y1], [x0, x1]]`` or None per volume) replaces the ground-truth
    liver by another liver's box, e.g. the liver network's prediction (``liver_roi.roi_from: prediction``): the
    samples are then that box's slices and the centres are drawn in its in-plane extent.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        volume_indices: Sequence[int],
        target: str = "lesion",
        context_slices: int = 0,
        crop_size: int = 256,
        crop_margin: int = 16,
        transform: Callable | None = None,
        liver_boxes: Sequence | None = None,
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
        self.volumes = list(volumes)
        self.volume_indices = list(volume_indices)
        self.target = target
        self.context_slices = context_slices
        self.crop_size = crop_size
        self.crop_margin = crop_margin
        self.transform = transform
        index = []
        self._centres, self._regions = [], []  # per volume: (y0, y1, x0, x1) of the centre draw and of roi_box
        for position, volume in enumerate(self.volumes):
            (z0, _), (ly0, ly1), (lx0, lx1) = volume.liver_box
            _, (ry0, ry1), (rx0, rx1) = volume.roi_box
            if liver_boxes is not None:  # liver_roi.roi_from: prediction, the liver network's box (None: no liver found)
                box = liver_boxes[position]
                (z0, z1), (ly0, ly1), (lx0, lx1) = box if box is not None else ((0, 0), (ly0, ly1), (lx0, lx1))
            self._regions.append((ry0, ry1, rx0, rx1))
            self._centres.append(
                (max(ly0 - crop_margin, ry0), min(ly1 + crop_margin, ry1), max(lx0 - crop_margin, rx0), min(lx1 + crop_margin, rx1))
            )
            if liver_boxes is not None:
                liver_slices = np.arange(z0, z1)
            else:
                liver_slices = np.flatnonzero((np.asarray(volume.label_box) >= 1).any(axis=(1, 2))) + z0
            index.append(np.stack([np.full(len(liver_slices), position), liver_slices], 1))
        self.index = np.concatenate(index or [np.zeros((0, 2))]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def slice_labels(self) -> np.ndarray:
        """Whether each sample's whole slice has target foreground (for balanced sampling; a crop may miss it)."""
        labels = np.zeros(len(self.index), dtype=bool)
        for position, volume in enumerate(self.volumes):
            chosen = np.flatnonzero(self.index[:, 0] == position)
            if chosen.size:
                present = target_channels(np.asarray(volume.label_box), self.target).any(axis=(0, 2, 3))
                labels[chosen] = present[self.index[chosen, 1] - volume.liver_box[0][0]]
        return labels

    def draw_crop(self, position: int) -> tuple[int, int, int, int]:
        """(centre_y, centre_x, y0, x0) of a random crop of volume ``position``."""
        cy0, cy1, cx0, cx1 = self._centres[position]
        ry0, ry1, rx0, rx1 = self._regions[position]
        u = torch.rand(2, dtype=torch.float64).tolist()
        cy = cy0 + min(int(u[0] * (cy1 - cy0)), cy1 - cy0 - 1)
        cx = cx0 + min(int(u[1] * (cx1 - cx0)), cx1 - cx0 - 1)
        return cy, cx, crop_start(cy, self.crop_size, ry0, ry1), crop_start(cx, self.crop_size, rx0, rx1)

    def __getitem__(self, i: int) -> dict:
        position, z = (int(v) for v in self.index[i])
        volume = self.volumes[position]
        _, _, y0, x0 = self.draw_crop(position)
        rows, cols = (y0, y0 + self.crop_size), (x0, x0 + self.crop_size)
        if self.context_slices:
            neighbours = context_indices(z, self.context_slices, volume.num_slices)
            image = volume.read_image(((neighbours[0], neighbours[-1] + 1), rows, cols))
            if len(image) != len(neighbours):  # clipped at an end of the volume: repeat the edge slice
                image = image[neighbours - neighbours[0]]
        else:
            image = volume.read_image(((z, z + 1), rows, cols))
        mask = target_channels(volume.read_labels(((z, z + 1), rows, cols))[0], self.target)
        sample = {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask.astype(np.float32))}
        sample = finish_sample(sample, self.transform, self.volume_indices[position], z, volume.volume_id)
        sample["crop_origin"] = torch.tensor((y0, x0), dtype=torch.int64)
        return sample


class VolumeDataset(Dataset):
    """One unbatched sample per volume, for a cascade's evaluation (load it with ``batch_size=None``).

    ================  ======================  ==================================================
    key               value                   meaning
    ================  ======================  ==================================================
    ``image``         float32 (Z, S, S)       the whole resized, windowed stack (``image.npy``)
    ``roi_image``     float32 (Zr, Hr, Wr)    the windowed full-resolution region ``roi_box``
    ``roi_box``       int64 (3, 2)            [[z0, z1], [y0, y1], [x0, x1]] of ``roi_image`` in
                                              full-resolution display coordinates (all 0 and a
                                              (0, 0, 0) ``roi_image`` for a volume without liver)
    ``full_shape``    int64 (3,)              (Z, H, W) at the original resolution
    ``spacing``       float64 (3,)            (sz, sy, sx) in mm
    ``volume_index``  int                     index of the volume in the data module
    ``volume``        str                     volume id
    ================  ======================  ==================================================

    Context slices are stacked by the model.
    """

    def __init__(self, volumes: Sequence[CachedVolume], volume_indices: Sequence[int]):
        self.volumes = list(volumes)
        self.volume_indices = list(volume_indices)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict:
        volume = self.volumes[i]
        return {
            "image": torch.from_numpy(np.array(volume.image)).float(),
            "roi_image": torch.from_numpy(np.array(volume.roi_image)).float(),
            "roi_box": torch.tensor(volume.roi_box, dtype=torch.int64).reshape(3, 2),
            "full_shape": torch.tensor(volume.full_shape, dtype=torch.int64),
            "spacing": torch.tensor(volume.spacing, dtype=torch.float64),
            "volume_index": self.volume_indices[i],
            "volume": volume.volume_id,
        }
