"""The training augmentation applied to each sample on the CPU, in the DataLoader workers: MONAI's transforms.

``training_augmentation`` augments a 2D sample (slices, liver-region crops), ``InPlaneAugmentation`` a 3D
crop slice by slice with the same transforms; ``augment`` applies either to a sample. The other way,
the whole batch on its device, is ``datamodules.augment.batch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import get_track_meta, set_track_meta


def training_augmentation(flip_prob: float = 0.5, rotate_degrees: float = 15.0, zoom_range: Sequence[float] = (0.9, 1.1), prob: float = 0.5,
                          intensity_shift: float = 0.0, intensity_scale: float = 0.0) -> mt.Compose:
    """Random flips, rotation and zoom in the axial plane (the mask-mining paper), applied to image and mask together,
    then, when not 0, the image's random intensity scale (``1 + U(-intensity_scale, intensity_scale)``) and shift
    (``U(-intensity_shift, intensity_shift)``). The intensity transforms come last and draw only when present, so
    without them every other draw is unchanged."""
    keys = ("image", "mask")
    intensity = ([mt.RandScaleIntensityd("image", factors=intensity_scale, prob=1.0)] if intensity_scale else []) + (
        [mt.RandShiftIntensityd("image", offsets=intensity_shift, prob=1.0)] if intensity_shift else [])
    return mt.Compose(
        [
            mt.RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            mt.RandFlipd(keys, prob=flip_prob, spatial_axis=1),
            mt.RandRotated(keys, range_x=math.radians(rotate_degrees), prob=prob, mode=("bilinear", "nearest"), padding_mode="border"),
            # "nearest-exact" reads the pixel under the bilinear stencil's centre; torch's "nearest" rounds the source
            # position down, which shifted every zoomed mask half a pixel right and down of its image.
            mt.RandZoomd(keys, min_zoom=zoom_range[0], max_zoom=zoom_range[1], prob=prob, mode=("bilinear", "nearest-exact"), padding_mode="edge"),
            *intensity,
        ]
    ).set_random_state(seed=0)


def augment(transform: Callable, sample: dict) -> dict:
    """Apply a MONAI dictionary ``transform`` to ``sample`` ({"image", "mask"} tensors); plain tensors back.

    MONAI's metadata tracking (MetaTensor, applied-operations lists) costs much of the augmentation
    time on small slices, and nothing reads it here: off for this call only, same results.
    """
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        result = transform(sample)
    finally:
        set_track_meta(tracking)
    return {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in result.items()}


class InPlaneAugmentation(mt.Randomizable):
    """Random flips, rotation and zoom in the axial plane of 3D samples: the 2D ``training_augmentation`` per crop.

    Applied to a dict with ``image`` (K, D, H, W) and ``mask`` (C, D, H, W) (K = 1 for
    ``Crop3DDataset``), it folds D into the channels, (K * D, H, W) and (C * D, H, W), runs
    ``training_augmentation(flip_prob, rotate_degrees, zoom_range, prob)`` (MONAI's ``RandFlipd``
    on H and on W, ``RandRotated(range_x)``, ``RandZoomd(keep_size=True)``; image bilinear, mask
    nearest), and unfolds. Every slice of a crop gets the same flips, angle and zoom factor, and no
    transform reads across slices, so D is never mixed, and the parameter distributions are those
    of the 2D pipeline. (MONAI's 3D ``RandZoomd`` would draw H and W factors independently, or,
    given two factors, pair H with W assuming (H, W, D) axes; folding avoids both.)

    ``set_random_state`` reseeds the 2D transforms: MONAI's DataLoader does so in each worker.
    """

    def __init__(self, flip_prob: float = 0.5, rotate_degrees: float = 15.0, zoom_range: Sequence[float] = (0.9, 1.1), prob: float = 0.5,
                 intensity_shift: float = 0.0, intensity_scale: float = 0.0):
        self.transform = training_augmentation(flip_prob, rotate_degrees, zoom_range, prob, intensity_shift, intensity_scale)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> InPlaneAugmentation:
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, sample: dict) -> dict:
        shapes = {key: sample[key].shape for key in ("image", "mask")}
        folded = {key: value.reshape(-1, *value.shape[-2:]) if key in shapes else value for key, value in sample.items()}
        result = self.transform(folded)
        return {key: value.reshape(shapes[key]) if key in shapes else value for key, value in result.items()}
