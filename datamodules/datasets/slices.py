"""Axial-slice dataset over cached volumes, and what every 2D dataset shares: target channels, context slices, sample provenance."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.augment.sample import augment
from datamodules.io.cache import CachedVolume

# Target name -> label map (..., H, W) in {0, 1, 2} -> bool channels (C, ..., H, W).
# LiTS lesions lie inside the liver, so liver = labels 1 and 2.
TARGETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "liver": lambda labels: (labels >= 1)[None],
    "lesion": lambda labels: (labels == 2)[None],
    "both": lambda labels: np.stack([labels >= 1, labels == 2]),
}
_CLASS_LABELS = (torch.tensor(0.0), torch.tensor(1.0))  # shared, collate copies them into the batch


def target_channels(labels: np.ndarray, target: str) -> np.ndarray:
    """Label map (..., H, W) in {0, 1, 2} -> bool target mask (C, ..., H, W) for ``target``."""
    return TARGETS[target](labels)


def context_indices(z: int, context: int, num_slices: int) -> np.ndarray:
    """Slice ``z`` and ``context`` neighbours on each side; beyond the volume's ends the edge slice repeats."""
    return np.clip(np.arange(z - context, z + context + 1), 0, num_slices - 1)


def finish_sample(sample: dict, transform: Callable | None, volume_index: int, slice_index: int, volume_id: str) -> dict:
    """Augment a training sample (``transform``) and add its class label and provenance.

    The label is computed after augmentation, so that ``label == mask.any()`` always.
    """
    if transform is not None:
        sample = augment(transform, sample)
    sample["label"] = _CLASS_LABELS[bool((sample["mask"] > 0.5).any())]
    sample["volume_index"] = volume_index
    sample["slice_index"] = slice_index
    sample["volume"] = volume_id
    return sample


class SliceDataset(Dataset):
    """One sample per (volume, axial slice).

    Each sample is a dict:

    ================  ====================  ===============================================
    key               value                 meaning
    ================  ====================  ===============================================
    ``image``         float32 (K, S, S)     the slice and ``context_slices`` on each side
    ``mask``          float32 (C, S, S)     target mask(s), 0/1
    ``label``         float32 ()            slice class: 1 if the mask has foreground
    ``volume_index``  int64 ()              index of the volume in the data module
    ``slice_index``   int64 ()              axial index in the volume
    ``volume``        str                   volume id
    ================  ====================  ===============================================

    K = 2 * context_slices + 1; neighbours beyond the volume's ends repeat the edge slice. With ``crop_size`` each
    sample is a random ``crop_size`` x ``crop_size`` window of its slice (uniform over the positions inside it, drawn
    anew at every read), S being ``crop_size``.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        volume_indices: Sequence[int],
        slices: Sequence[np.ndarray],
        target: str = "liver",
        context_slices: int = 0,
        transform: Callable | None = None,
        crop_size: int | None = None,
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
        self.crop_size = crop_size
        self.volumes = list(volumes)
        self.volume_indices = list(volume_indices)
        self.index = np.concatenate(
            [np.stack([np.full(len(s), position), np.asarray(s)], 1) for position, s in enumerate(slices)] or [np.zeros((0, 2))]
        ).astype(np.int64)
        self.target = target
        self.context_slices = context_slices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def slice_labels(self) -> np.ndarray:
        """Class label of every sample before augmentation (for balanced sampling), without reading images."""
        return np.array(
            [bool(target_channels(self.volumes[p].label[z], self.target).any()) for p, z in self.index], dtype=bool
        )

    def crop_window(self, size: Sequence[int]) -> tuple[slice, slice]:
        """(rows, columns) of a random ``crop_size`` window of a slice of ``size``, or the whole slice."""
        if self.crop_size is None:
            return slice(None), slice(None)
        # torch's generator: the DataLoader seeds it in every worker, so workers draw different windows
        y0, x0 = (int(torch.randint(0, n - self.crop_size + 1, ())) for n in size)
        return slice(y0, y0 + self.crop_size), slice(x0, x0 + self.crop_size)

    def __getitem__(self, i: int) -> dict:
        position, z = self.index[i]
        volume = self.volumes[position]
        window = self.crop_window(volume.image.shape[-2:])
        chosen = context_indices(z, self.context_slices, volume.num_slices) if self.context_slices else slice(z, z + 1)
        image = volume.image[chosen, window[0], window[1]]
        labels = np.array(volume.label[z][window])
        mask = target_channels(labels, self.target)
        sample = {
            # float16 -> float32 in torch, bool -> float32 in numpy: the fast side of each conversion
            "image": torch.from_numpy(np.array(image)).float(),
            "mask": torch.from_numpy(mask.astype(np.float32)),
        }
        sample = finish_sample(sample, self.transform, self.volume_indices[position], int(z), volume.volume_id)
        return sample
