"""What preprocessing does to one volume's arrays: display orientation, HU window, in-plane resizing, boxes, and
reading a box back out of a cropped array (``read_box``).

``datamodules.io.cache`` applies these once per volume and stores the result; ``lits predict`` applies
them to a new volume the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreprocessSettings:
    """What a cache entry is built with (part of its fingerprint: changing one rebuilds the entry)."""

    hu_min: float = -100.0
    hu_max: float = 600.0
    image_size: int = 256
    roi_margin_px: int = 64  # in-plane margin of the full-resolution region around the liver
    roi_margin_slices: int = 4  # its margin along z


def to_display(array: np.ndarray) -> np.ndarray:
    """Canonical (X, Y, Z) -> display (Z, rows, cols), rows anterior->posterior, columns patient right->left (a view)."""
    return array[::-1, ::-1, :].transpose(2, 1, 0)


def window(hu: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Clip HU to the window and scale to [0, 1], in one float32 pass plus two in-place ones."""
    image = np.empty(hu.shape, dtype=np.float32)  # C-contiguous even when ``hu`` is a strided view
    np.clip(hu, settings.hu_min, settings.hu_max, out=image, casting="unsafe")
    image -= settings.hu_min
    image *= 1.0 / (settings.hu_max - settings.hu_min)
    return image


def resize_image(slices: np.ndarray, size: int) -> np.ndarray:
    """(Z, H, W) float32 -> float16 (Z, size, size).

    Downsampling averages the source pixels under each output pixel ('area', an exact 2x2 mean for
    LiTS' 512 -> 256), which is antialiased and cheap; upsampling is bilinear.
    """
    tensor = torch.from_numpy(slices)[:, None]
    height, width = slices.shape[1:]
    if height % size == 0 and width % size == 0:
        resized = F.avg_pool2d(tensor, kernel_size=(height // size, width // size))
    elif size <= min(height, width):
        resized = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].half().numpy()


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(Z, H, W) label map -> (Z, size, size) by nearest neighbour, the same pixels torch's 'nearest-exact' picks."""
    height, width = labels.shape[1:]
    if height % size == 0 and width % size == 0:  # an integer factor k picks every k-th pixel from k // 2
        step_y, step_x = height // size, width // size
        return np.ascontiguousarray(labels[:, step_y // 2 :: step_y, step_x // 2 :: step_x])
    rows = np.minimum(((np.arange(size) + 0.5) * labels.shape[1] / size).astype(np.int64), labels.shape[1] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * labels.shape[2] / size).astype(np.int64), labels.shape[2] - 1)
    return np.ascontiguousarray(labels[:, rows][:, :, cols])


def foreground_box(labels: np.ndarray) -> list[list[int]]:
    """[start, stop) per axis of the non-zero labels (empty boxes for an empty map)."""
    box = []
    for axis in range(labels.ndim):
        present = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        box.append([int(present[0]), int(present[-1]) + 1] if present.size else [0, 0])
    return box


def grow_box(box: list[list[int]], margins: tuple[int, int, int], shape: tuple[int, ...]) -> list[list[int]]:
    """``box`` grown by ``margins`` per axis and clipped to ``shape``; an empty box stays empty ([0, 0] per axis)."""
    if any(stop <= start for start, stop in box):
        return [[0, 0] for _ in box]
    return [[max(0, start - m), min(n, stop + m)] for (start, stop), m, n in zip(box, margins, shape)]


def box_slices(box) -> tuple[slice, ...]:
    """A box (per-axis ``(start, stop)``) as the index that reads it from an array."""
    return tuple(slice(int(start), int(stop)) for start, stop in box)


def read_box(source: np.ndarray, source_box, box, dtype=None) -> np.ndarray:
    """``box`` of a volume of which ``source`` holds the part ``source_box``, as ``dtype``: 0 outside ``source_box``.

    Boxes are per-axis ``(start, stop)``, half-open, in one coordinate frame; ``box`` may reach
    beyond ``source_box`` and beyond the volume. The intersection is read from ``source`` (a
    memory map) in one slice and copied with one assignment; a dtype change goes through torch,
    faster than numpy for float16 -> float32.
    """
    dtype = np.dtype(dtype or source.dtype)
    starts = [int(start) for start, _ in box]
    shape = [int(stop) - start for start, (_, stop) in zip(starts, box)]
    low = [max(start, int(s)) for start, (s, _) in zip(starts, source_box)]
    high = [min(start + n, int(e)) for start, n, (_, e) in zip(starts, shape, source_box)]
    covered = low == starts and high == [start + n for start, n in zip(starts, shape)]
    if any(h <= l for l, h in zip(low, high)):
        return np.zeros(shape, dtype)
    region = np.array(source[tuple(slice(l - int(s), h - int(s)) for l, h, (s, _) in zip(low, high, source_box))])
    if covered and region.dtype == dtype:
        return region
    out = np.empty(shape, dtype) if covered else np.zeros(shape, dtype)
    target = tuple(slice(l - start, h - start) for l, h, start in zip(low, high, starts))
    if region.dtype == dtype:
        out[target] = region
    else:
        torch.from_numpy(out)[target] = torch.from_numpy(region)
    return out
