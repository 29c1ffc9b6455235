"""Whole-volume inference of the liver-lesion cascade (Christ et al.; the mask-mining paper's "2D" setup).

One volume goes through the two networks of the suite like this:

1. **Liver.** The liver network sees every axial slice resized to ``data.image_size`` (its training
   resolution). Its probabilities are quantised to uint8, upsampled bilinearly to the original in-plane
   size, thresholded and reduced to their largest 3D connected component: exactly what the liver
   network's own per-volume metrics do (``volume_scoring.summarize_volumes``), so the cascade's liver figures
   and the liver stage's agree.
2. **Region of interest.** The liver mask's bounding box, grown by ``region_margin`` pixels in-plane and
   ``region_margin_slices`` slices (the mask dilated, as a box).
3. **Lesions.** The lesion network sees that box of the CT at full in-plane resolution (padded to a
   multiple of 16), with its own context slices. Its mask is kept where the liver mask, dilated in-plane
   by ``lesion_dilation`` pixels, allows: a hypodense lesion at the liver's border is often left out of
   the liver network's mask, and must not be cut away with it.
4. **Label map.** 1 liver, 2 lesion. LiTS counts lesions as liver (label 2 lies inside the liver), so the
   final liver is ``liver | lesion``.

The full-resolution CT is read through a callable ``read_image(box) -> (z, h, w) float32`` so the same
code serves the preprocessing cache (``lits test``: only the ground-truth liver's region plus a margin
is cached, the rest reads as 0) and a whole NIfTI volume in memory (``lits predict``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lightning_modules.inference.liver_guided import LiverGuided, region_probability
from lightning_modules.metrics.slice_volume import largest_connected_component
from lightning_modules.metrics.volume_scoring import reassemble_volume

Box = list[list[int]]  # [[z0, z1], [y0, y1], [x0, x1]], half-open, display coordinates
Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, K, H, W) image -> (B, C, H, W) probabilities

_DIVISOR = 16  # four U-Net poolings
#: the cascade's region settings, the defaults of the segmentation tasks' arguments of the same names
CASCADE_DEFAULTS = {"region_margin": 16, "region_margin_slices": 2, "lesion_dilation": 8}


def context_stack(slices: torch.Tensor, indices: torch.Tensor, context: int) -> torch.Tensor:
    """(Z, H, W) slices -> (n, 2 * context + 1, H, W) inputs centred on ``indices``.

    Neighbours beyond the volume's ends repeat the edge slice, as ``SliceDataset`` does in training.
    """
    offsets = torch.arange(-context, context + 1, device=indices.device)
    neighbours = (indices[:, None] + offsets[None]).clamp(0, slices.shape[0] - 1)
    return slices[neighbours]


@torch.no_grad()
def slice_probabilities(predict: Predictor, slices: torch.Tensor, in_channels: int, batch_size: int = 16,
                        guide: torch.Tensor | None = None) -> torch.Tensor:
    """Run a 2D network over every slice of a (Z, H, W) stack: (Z, C, H, W) float32 probabilities.

    Slices are zero-padded at the bottom and right to a multiple of 16 and cropped back, so any
    region size works. ``in_channels`` = ``2 * context + 1`` of the network; ``guide`` (Z, H, W), if given,
    is one more input channel after them (the combined model's liver probability, ``liver_guided``).
    """
    if in_channels % 2 == 0:
        raise ValueError(f"a 2.5D network takes 2 * context + 1 input channels, got {in_channels}")
    depth, height, width = slices.shape
    pad_h, pad_w = -height % _DIVISOR, -width % _DIVISOR
    outputs = []
    for start in range(0, depth, batch_size):
        indices = torch.arange(start, min(start + batch_size, depth), device=slices.device)
        batch = context_stack(slices, indices, in_channels // 2)
        if guide is not None:
            batch = torch.cat([batch, guide[indices, None]], dim=1)
        if pad_h or pad_w:
            batch = F.pad(batch, (0, pad_w, 0, pad_h))
        outputs.append(predict(batch).float()[..., :height, :width])
    return torch.cat(outputs) if outputs else slices.new_zeros((0, 1, height, width))


def liver_mask(probs: torch.Tensor, full_size: tuple[int, int], threshold: float = 0.5, chunk: int = 32) -> np.ndarray:
    """(Z, 1, h, w) liver probabilities -> bool (Z, H, W) at the original in-plane size, largest 3D component.

    Quantised to uint8 and upsampled exactly as ``volume_scoring.summarize_volumes`` does, in chunks of slices
    (a 512x512x900 volume never exists as float32).
    """
    quantised = torch.round(probs.float().clamp(0, 1) * 255).to(torch.uint8).cpu()
    parts = [reassemble_volume(quantised[z : z + chunk], full_size, threshold)[0].numpy() for z in range(0, len(quantised), chunk)]
    mask = np.concatenate(parts) if parts else np.zeros((0, *full_size), dtype=bool)
    return largest_connected_component(mask[None], (0,))[0]


def mask_box(mask: np.ndarray, margin: int, margin_slices: int) -> Box | None:
    """Bounding box of a bool (Z, H, W) mask grown by the margins and clipped to the volume; None if empty."""
    if not mask.any():
        return None
    box = []
    for axis, grow in enumerate((margin_slices, margin, margin)):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([max(0, int(present[0]) - grow), min(mask.shape[axis], int(present[-1]) + 1 + grow)])
    return box


def dilate_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool (Z, H, W) mask slice by slice with a disk of ``radius`` pixels."""
    if radius <= 0 or not mask.any():
        return mask
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = (x * x + y * y <= radius * radius)[None]
    return ndimage.binary_dilation(mask, structure=disk)


def predict_volume(
    liver: Predictor,
    lesion: Predictor | None,
    image: torch.Tensor,
    read_image: Callable[[Box], np.ndarray],
    full_shape: Sequence[int],
    liver_in_channels: int = 1,
    lesion_in_channels: int = 1,
    threshold: float = 0.5,
    region_margin: int = 16,
    region_margin_slices: int = 2,
    lesion_dilation: int = 8,
    batch_size: int = 16,
    probabilities: bool = False,
) -> dict[str, np.ndarray]:
    """The cascade on one volume.

    Args:
        liver, lesion: networks as probability functions (``lesion=None``: a liver-only model).
        image: (Z, S, S) resized CT in [0, 1] (the cache's ``image.npy``), on the networks' device.
        read_image: full-resolution CT in [0, 1] inside a box (display coordinates, may exceed the volume).
        full_shape: (Z, H, W) of the original volume.
    Returns:
        ``labels`` uint8 (Z, H, W) in {0, 1, 2}, ``roi_box`` (the lesion network's region, empty when no
        liver was found), and with ``probabilities`` float32 ``liver_probability`` / ``lesion_probability``
        (Z, H, W) maps (the lesion map is 0 outside the region).
    """
    full_shape = tuple(int(n) for n in full_shape)
    liver_probs = slice_probabilities(liver, image, liver_in_channels, batch_size)
    liver = liver_mask(liver_probs, full_shape[1:], threshold)
    labels = liver.astype(np.uint8)
    result: dict[str, np.ndarray] = {}
    if probabilities:
        result["liver_probability"] = upsample_probabilities(liver_probs, full_shape[1:])
        result["lesion_probability"] = np.zeros(full_shape, dtype=np.float32)
    box = mask_box(liver, region_margin, region_margin_slices) if lesion is not None else None
    if box is not None:
        region = tuple(slice(a, b) for a, b in box)
        crop = torch.from_numpy(np.ascontiguousarray(read_image(box), dtype=np.float32)).to(image.device)
        # a combined model's lesion network also sees its liver network's probability at the region's pixels
        guide = region_probability(liver_probs, full_shape[1:], box) if isinstance(lesion, LiverGuided) else None
        lesion_probs = slice_probabilities(lesion, crop, lesion_in_channels, batch_size, guide)[:, 0].cpu().numpy()
        allowed = dilate_in_plane(liver[region], lesion_dilation)
        found = (lesion_probs >= threshold) & allowed
        labels[region][found] = 2
        if probabilities:
            result["lesion_probability"][region] = lesion_probs
    result["labels"] = labels
    result["roi_box"] = np.asarray(box if box is not None else [[0, 0]] * 3, dtype=np.int64)
    return result


def upsample_probabilities(probs: torch.Tensor, size: tuple[int, int], chunk: int = 32) -> np.ndarray:
    parts = []
    for z in range(0, len(probs), chunk):
        part = probs[z : z + chunk].float().cpu()
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        parts.append(part[:, 0].numpy())
    return np.concatenate(parts) if parts else np.zeros((0, *size), dtype=np.float32)
