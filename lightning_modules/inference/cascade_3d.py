"""Whole-volume inference of the 3D liver-lesion cascade (the mask-mining paper's "Cascaded 3D" setup, Fig. 3A).

Both networks are 3D U-Nets working on the volume as the 3D data module caches it (``datamodules.io.volume3d``):
in-plane resized to ``data.image_size`` (S x S) and resampled along z to ``data.slice_spacing_mm``. One volume
goes through the cascade like this:

1. **Liver.** MONAI's ``SlidingWindowInferer`` (windows of the training crop size, ``overlap``, Gaussian or
   constant blending; a volume thinner than a window padded with air and cropped back) over the whole
   resampled volume gives liver probabilities on the resampled grid. They are
   mapped back onto the original slices (linear in z, ``volume3d.interpolate_z``), quantised, upsampled to the
   original in-plane size, thresholded and reduced to their largest 3D component: ``cascade_2d.liver_mask``, the 2D
   cascade's own liver step, so a 3D and a 2D liver network are scored alike.
2. **Region of interest.** The liver mask's bounding box, mapped onto the resampled grid and grown by
   ``region_margin`` voxels in-plane and ``region_margin_slices`` resampled slices, then widened (inside the
   volume) to at least one window, so that the lesion network sees real CT rather than padding where the volume
   has it.
3. **Lesions.** The lesion network's sliding window over that region; its probabilities (0 outside the region)
   are mapped back onto the original slices, upsampled, thresholded and kept where the liver mask dilated
   in-plane by ``lesion_dilation`` pixels allows, as in the 2D cascade.
4. **Label map.** 1 liver, 2 lesion, at the original resolution.

The lesion network sees the resampled grid, not the full in-plane resolution of the 2D cascade's lesion network:
the 3D setup trains both networks on the same cached volumes (the paper's 128x128x64 crops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from datamodules.datasets.crops3d import AIR
from datamodules.io.volume3d import interpolate_z

from lightning_modules.inference.cascade_2d import Box, upsample_probabilities, dilate_in_plane, liver_mask, mask_box

VolumePredictor = Callable[[torch.Tensor], torch.Tensor]  # (B, K, D, H, W) windows -> (B, 1, D, H, W) probabilities


def window_probabilities(predict: VolumePredictor, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.25,
                         mode: str = "gaussian", sw_batch_size: int = 2) -> torch.Tensor:
    """Foreground probabilities of a (Z', H, W) volume by MONAI's sliding window: float32 (Z', H, W).

    ``roi_size`` is the window (D, H, W). Probabilities, not logits, are blended, so any network whose output decodes
    to a probability (a mask-mining round's error head) is predicted the same way.
    """
    return sliding_window(roi_size, overlap, mode, sw_batch_size)(image[None, None].float(), lambda window: predict(window).float())[0, 0]


def sliding_window(roi_size: Sequence[int], overlap: float, mode: str, sw_batch_size: int = 2):
    """MONAI's ``SlidingWindowInferer`` over ``roi_size`` windows.

    A volume shorter than the window on an axis (a thin slab against the training crop's depth) is padded
    symmetrically with air, as the training crops are (``crops3d.AIR``), and the output cropped back to the volume's
    own extent: the figures and label maps never see the padding.
    """
    from monai.inferers import SlidingWindowInferer  # MONAI's inferers import a lot; only evaluation needs them

    return SlidingWindowInferer(roi_size=tuple(int(v) for v in roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                mode=mode, padding_mode="constant", cval=AIR)


def resampled_box(box: Box, positions: np.ndarray, full_size: Sequence[int], shape: Sequence[int],
                  margin: int, margin_slices: int, roi_size: Sequence[int]) -> Box:
    """A full-resolution box (original slices, original pixels) as a box of the resampled grid of ``shape``.

    ``positions`` are the original slices' coordinates on the resampled grid (``volume3d.original_positions``).
    The box covers every resampled voxel the original box touches, grown by the margins, then widened
    symmetrically to ``roi_size`` where the volume allows, and clipped to the volume.
    """
    (z0, z1), (y0, y1), (x0, x1) = box
    bounds = [
        (int(np.floor(positions[z0])) - margin_slices, int(np.ceil(positions[z1 - 1])) + 1 + margin_slices),
        (int(np.floor(y0 * shape[1] / full_size[0])) - margin, int(np.ceil(y1 * shape[1] / full_size[0])) + margin),
        (int(np.floor(x0 * shape[2] / full_size[1])) - margin, int(np.ceil(x1 * shape[2] / full_size[1])) + margin),
    ]
    result = []
    for (low, high), size, window in zip(bounds, shape, roi_size):
        low, high = max(0, low), min(size, high)
        missing = max(0, min(window, size) - (high - low))
        low = max(0, low - missing // 2)
        high = min(size, low + max(high - low, min(window, size)))
        low = max(0, high - max(high - low, min(window, size)))
        result.append([low, high])
    return result


def predict_volume_3d(
    liver: VolumePredictor,
    lesion: VolumePredictor | None,
    image: torch.Tensor,
    positions: np.ndarray,
    full_shape: Sequence[int],
    roi_size: Sequence[int],
    overlap: float = 0.25,
    mode: str = "gaussian",
    threshold: float = 0.5,
    region_margin: int = 8,
    region_margin_slices: int = 2,
    lesion_dilation: int = 8,
    probabilities: bool = False,
) -> dict[str, np.ndarray]:
    """The 3D cascade on one volume.

    Args:
        liver, lesion: 3D networks as probability functions of (B, 1, D, H, W) windows (``lesion=None``: liver only).
        image: (Z', S, S) resampled CT in [0, 1] (``ResampledVolume.image``), on the networks' device.
        positions: (Z,) coordinate of each original slice on the resampled grid (``volume3d.original_positions``).
        full_shape: (Z, H, W) of the original volume.
        roi_size: the sliding window (D, H, W): the networks' training crop size.
    Returns:
        As ``cascade_2d.predict_volume``: ``labels`` uint8 (Z, H, W) in {0, 1, 2}; ``roi_box`` int64 (3, 2), the lesion
        network's region in original coordinates (its slices and pixels), zeros when no liver was found; with
        ``probabilities``, float32 ``liver_probability`` and ``lesion_probability`` (Z, H, W).
    """
    full_shape = tuple(int(n) for n in full_shape)
    shape = tuple(image.shape)
    to_original = lambda probs, at: interpolate_z(probs[None], at, "linear")[0].clamp_(0, 1)[:, None]  # (len(at), 1, S, S)
    liver_probs = to_original(window_probabilities(liver, image, roi_size, overlap, mode), positions)
    liver_found = liver_mask(liver_probs, full_shape[1:], threshold)
    labels = liver_found.astype(np.uint8)
    result: dict[str, np.ndarray] = {}
    if probabilities:
        result["liver_probability"] = upsample_probabilities(liver_probs, full_shape[1:])
        result["lesion_probability"] = np.zeros(full_shape, dtype=np.float32)
    box = mask_box(liver_found, 0, 0) if lesion is not None else None
    original_box = None
    if box is not None:
        region = resampled_box(box, positions, full_shape[1:], shape, region_margin, region_margin_slices, roi_size)
        lesion_resampled = torch.zeros(shape, dtype=torch.float32, device=image.device)
        window = tuple(slice(a, b) for a, b in region)
        lesion_resampled[window] = window_probabilities(lesion, image[window].contiguous(), roi_size, overlap, mode)
        original_box = _original_box(region, positions, full_shape, shape)
        slab = slice(*original_box[0])  # the original slices the region reaches: lesion probabilities are 0 elsewhere
        lesion_probs = upsample_probabilities(to_original(lesion_resampled, positions[slab]), full_shape[1:])
        found = (lesion_probs >= threshold) & dilate_in_plane(liver_found[slab], lesion_dilation)
        labels[slab][found] = 2
        if probabilities:
            result["lesion_probability"][slab] = lesion_probs
    result["labels"] = labels
    result["roi_box"] = np.asarray(original_box or [[0, 0]] * 3, dtype=np.int64)
    return result


def _original_box(region: Box, positions: np.ndarray, full_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """The original slices and pixels a resampled-grid box covers (for figures and reports)."""
    (z0, z1), (y0, y1), (x0, x1) = region
    inside = np.flatnonzero((positions > z0 - 1) & (positions < z1))
    scale_y, scale_x = full_shape[1] / shape[1], full_shape[2] / shape[2]
    return [[int(inside[0]), int(inside[-1]) + 1] if len(inside) else [0, 0],
            [int(np.floor(y0 * scale_y)), min(full_shape[1], int(np.ceil(y1 * scale_y)))],
            [int(np.floor(x0 * scale_x)), min(full_shape[2], int(np.ceil(x1 * scale_x)))]]
