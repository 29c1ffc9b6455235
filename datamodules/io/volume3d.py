"""3D training data, the volumes: cached volumes resampled to a fixed slice spacing, and back.

A 3D network reads the cached in-plane-resized stack (``image.npy``, (Z, S, S) with S =
``image_size``) resampled along z to one slice spacing for every volume (LiTS' slice spacing
ranges from 0.7 to 5 mm). ``resample_volume`` builds that grid once per cache entry and spacing,
``datamodules.datasets.crops3d.Crop3DDataset`` draws training crops from it (``InPlaneAugmentation`` augments
them in the axial plane), and ``to_original_slices`` maps a prediction back onto the original slices, where
the full-resolution labels (``label_box.npy``) are compared with it.

The z grid (``resampled_positions``)
------------------------------------
For a volume of Z slices ``sz`` mm apart resampled to ``s`` mm (``slice_spacing_mm``):

* Z' = ceil((Z - 1) * sz / s) + 1 slices; resampled slice j lies j * s mm above the centre of
  original slice 0, i.e. at original-slice coordinate j * s / sz.
* The first resampled slice is original slice 0; the last lies on, or less than one new spacing
  beyond, the last original slice, so every original slice lies inside the resampled grid and
  mapping back never extrapolates. Beyond the last original slice values are the edge slice's.
* Example: 20 slices at 5 mm -> 39 slices at 2.5 mm (original slice i is resampled slice 2i);
  10 slices at 4 mm -> 16 slices at 2.5 mm (the last at original coordinate 9.375).

Images are interpolated linearly along z; labels by nearest neighbour, the source slice being
``floor(x + 0.5)`` of the coordinate x (ties go up). Mapping labels to ``s <= sz`` and back with
nearest neighbour is the identity (each original slice has a resampled slice within half an
original spacing); going to a coarser grid loses slices, as any resampling does.

Files, beside the 2D arrays in the cache entry (``<s>`` formatted with ``{:g}``, e.g. ``2.5``):

=========================  ==================  =============================================
file                       array               content
=========================  ==================  =============================================
``image3d_<s>mm.npy``      float16 (Z', S, S)  ``image.npy`` resampled linearly along z
``label3d_<s>mm.npy``      uint8 (Z', S, S)    ``label.npy`` (0/1/2) resampled by nearest
                                               neighbour along z
``volume3d_<s>mm.json``    -                   the z grid, the image minimum, the liver box
                                               and per-slice foreground counts of the
                                               resampled grid, and the source it was built
                                               from; written last: it marks a complete build
=========================  ==================  =============================================

Each file is written under a temporary name and renamed into place: a killed build leaves no
half-written file, and the next call rebuilds what is missing. A build holds the lock
``.locks/volume3d_<s>mm.json.lock`` in the entry folder (``datamodules.io.locks``), so processes
that resample one entry at once (every node of a multi-node run) build it once and share it. A rebuilt cache entry (changed
inputs or settings) is a new folder without these files, so they never go stale.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.io.atomic import write_atomically
from datamodules.io.cache import CachedVolume
from datamodules.io.locks import acquire, lock_for, temporaries_of
from datamodules.io.preprocess import foreground_box

FORMAT_3D = 1
DEFAULT_SLICE_SPACING_MM = 2.5
NETWORK_DIVISOR = 16  # the 3D U-Net halves every spatial axis four times


# -- the z grid ---------------------------------------------------------------------------------
def resampled_positions(num_slices: int, source_spacing_mm: float, slice_spacing_mm: float) -> np.ndarray:
    """Original-slice coordinate of each slice of the resampled grid, float64 (Z',).

    Z' = ceil((Z - 1) * sz / s) + 1 and position j is j * s / sz (see the module docstring).
    """
    step = slice_spacing_mm / source_spacing_mm
    # rounded so that an exact ratio (19 * 5 / 2.5 = 38) computed with a rounding error stays exact
    count = math.ceil(round((num_slices - 1) / step, 6)) + 1 if num_slices > 1 else 1
    return np.arange(count, dtype=np.float64) * step


def original_positions(num_slices: int, source_spacing_mm: float, slice_spacing_mm: float) -> np.ndarray:
    """Resampled-grid coordinate of each original slice, float64 (Z,): i * sz / s, all within [0, Z' - 1]."""
    return np.arange(num_slices, dtype=np.float64) * (source_spacing_mm / slice_spacing_mm)


def interpolate_z(volume: torch.Tensor, positions: np.ndarray | torch.Tensor, mode: str) -> torch.Tensor:
    """``volume`` (C, Z, H, W) read at z coordinates ``positions`` (Zout,): (C, Zout, H, W), same dtype and device.

    ``mode="linear"``: ``grid_sample`` (bilinear, ``align_corners=True``, border padding) on the
    volume viewed as C * H * W channels of a Z x 1 image, so the sampling grid is Zout points
    rather than one per output voxel and every in-plane position is read exactly; computed in
    float32 (float64 stays float64). ``mode="nearest"``: the slices ``floor(x + 0.5)``, clipped to
    the volume (exact for any dtype).
    """
    positions = torch.as_tensor(positions, dtype=torch.float64)
    channels, depth, height, width = volume.shape
    if mode == "nearest" or depth == 1:
        index = torch.floor(positions + 0.5).clamp(0, depth - 1).long().to(volume.device)
        return volume.index_select(1, index)
    if mode != "linear":
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    work = volume if volume.dtype == torch.float64 else volume.float()
    columns = work.movedim(1, -1).reshape(1, channels * height * width, depth, 1)
    y = (2.0 * positions / (depth - 1) - 1.0).to(work.dtype)
    grid = torch.stack([torch.zeros_like(y), y], -1).reshape(1, -1, 1, 2).to(volume.device)
    out = F.grid_sample(columns, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(channels, height, width, len(positions)).movedim(-1, 1).contiguous().to(volume.dtype)


# -- the resampled cache ------------------------------------------------------------------------
def _file_names(slice_spacing_mm: float) -> tuple[str, str, str]:
    tag = f"{slice_spacing_mm:g}mm"
    return f"image3d_{tag}.npy", f"label3d_{tag}.npy", f"volume3d_{tag}.json"


def _source(entry: CachedVolume) -> dict:
    return {
        "num_slices": entry.num_slices,
        "slice_spacing_mm": entry.spacing[0],
        "image_shape": list(entry.image.shape),
        "fingerprint": entry.meta.get("fingerprint"),
    }


class ResampledVolume:
    """One cache entry resampled along z to ``slice_spacing_mm`` (from ``resample_volume``); arrays memory-mapped.

    ===================  =====================  ============================================
    attribute            value                  meaning
    ===================  =====================  ============================================
    ``image``            float16 (Z', S, S)     windowed image in [0, 1], memory-mapped
    ``label``            uint8 (Z', S, S)       labels 0/1/2, memory-mapped
    ``shape``            (Z', S, S)
    ``z_positions``      float64 (Z',)          original-slice coordinate of each slice
    ``liver_box``        ((z0, z1), (y0, y1),   bounding box of labels >= 1 in this grid,
                         (x0, x1))              half-open; all (0, 0) without liver
    ``image_min``        float                  the image's minimum
    ``slice_voxels``     dict of int64 (Z',)    per slice, voxels of labels >= 1 (``"liver"``)
                                                and of label 2 (``"lesion"``)
    ``volume``           CachedVolume           the source entry
    ===================  =====================  ============================================
    """

    def __init__(self, volume: CachedVolume, slice_spacing_mm: float, meta: dict):
        self.volume = volume
        self.slice_spacing_mm = float(slice_spacing_mm)
        self.meta = meta
        image_name, label_name, _ = _file_names(self.slice_spacing_mm)
        self._paths = volume.entry / image_name, volume.entry / label_name

    @cached_property
    def image(self) -> np.ndarray:
        return np.load(self._paths[0], mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray:
        return np.load(self._paths[1], mmap_mode="r")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def z_positions(self) -> np.ndarray:
        return np.asarray(self.meta["z_positions"], dtype=np.float64)

    @property
    def liver_box(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(axis) for axis in self.meta["liver_box"])

    @property
    def image_min(self) -> float:
        return float(self.meta["image_min"])

    @property
    def slice_voxels(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(counts, dtype=np.int64) for name, counts in self.meta["slice_voxels"].items()}

    def __getstate__(self):
        # DataLoader workers reopen the memory maps instead of receiving pickled arrays
        return {"volume": self.volume, "slice_spacing_mm": self.slice_spacing_mm, "meta": self.meta, "_paths": self._paths}


def _build(entry: CachedVolume, slice_spacing_mm: float, paths: tuple[Path, Path, Path]) -> dict:
    positions = resampled_positions(entry.num_slices, entry.spacing[0], slice_spacing_mm)
    image = torch.from_numpy(np.array(entry.image))[None]
    image = interpolate_z(image, positions, "linear")[0].half().numpy()
    label = interpolate_z(torch.from_numpy(np.array(entry.label))[None], positions, "nearest")[0].numpy()
    liver = label >= 1
    meta = {
        "format": FORMAT_3D,
        "slice_spacing_mm": slice_spacing_mm,
        "source": _source(entry),
        "shape": list(image.shape),
        "z_positions": positions.tolist(),
        "image_min": float(image.min()),
        "liver_box": foreground_box(liver),
        "slice_voxels": {
            "liver": np.count_nonzero(liver, axis=(1, 2)).tolist(),
            "lesion": np.count_nonzero(label == 2, axis=(1, 2)).tolist(),
        },
    }
    write_atomically(paths[0], lambda tmp: np.save(tmp, image))
    write_atomically(paths[1], lambda tmp: np.save(tmp, label))
    write_atomically(paths[2], lambda tmp: tmp.write_text(json.dumps(meta)))
    return meta


def _stored(entry: CachedVolume, paths: tuple[Path, Path, Path]) -> dict | None:
    """The stored build's ``volume3d_<s>mm.json`` if all three files are there and match ``entry``, else None."""
    try:
        meta = json.loads(paths[2].read_text())
    except (OSError, ValueError):
        return None
    current = meta.get("format") == FORMAT_3D and meta.get("source") == _source(entry) and paths[0].exists() and paths[1].exists()
    return meta if current else None


def resample_volume(entry: CachedVolume, slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM) -> ResampledVolume:
    """The cache entry's in-plane-resized image and labels resampled along z to ``slice_spacing_mm``.

    Built on the first call (image linear, labels nearest along z; the grid is
    ``resampled_positions``) and stored in the entry folder; later calls reuse the stored files
    (nothing is rewritten) while all three exist and ``volume3d_<s>mm.json`` matches the entry,
    and rebuild them otherwise. Safe to call from several processes at once: one builds, holding
    the entry's lock, and the others wait for it and reuse its files.

    Args:
        entry: a cache entry (``CachedVolume``), Z slices of S x S pixels, ``spacing[0]`` = sz mm.
        slice_spacing_mm: the new slice spacing s in mm (> 0).

    Returns:
        ``ResampledVolume`` with memory-mapped ``image`` float16 (Z', S, S) and ``label`` uint8 (Z', S, S).
    """
    if not slice_spacing_mm > 0:
        raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm}")
    slice_spacing_mm = float(slice_spacing_mm)
    paths = tuple(entry.entry / name for name in _file_names(slice_spacing_mm))
    meta = _stored(entry, paths)
    if meta is None:
        lock = lock_for(paths[2])
        acquire(lock, wait=True)
        try:
            meta = _stored(entry, paths)  # another process may have built it while we waited
            if meta is None:
                names = [p.name for p in entry.entry.iterdir()]
                # writers write only under the lock: these are a killed build's (older versions named them
                # .tmp-<stem>-<hex><suffix>)
                legacy = list(entry.entry.glob(f".tmp-*3d_{slice_spacing_mm:g}mm-*"))
                for leftover in [t for path in paths for t in temporaries_of(path, names)] + legacy:
                    leftover.unlink(missing_ok=True)
                meta = _build(entry, slice_spacing_mm, paths)
        finally:
            lock.release()
    return ResampledVolume(entry, slice_spacing_mm, meta)


def to_original_slices(
    prediction_3d: torch.Tensor, entry: CachedVolume, slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM, mode: str | None = None
) -> torch.Tensor:
    """A prediction on the resampled grid mapped back onto the entry's original slices.

    ================  =====================  ===================================================
    argument          shape                  meaning
    ================  =====================  ===================================================
    ``prediction_3d`` (C, Z', S, S)          probabilities (floating) or labels (bool/integer)
                                             on the grid of ``resample_volume(entry, s)``
    returns           (C, Z, S, S)           the same dtype and device, on the original slices
                                             (still S x S in-plane: the cache's resized plane)
    ================  =====================  ===================================================

    ``mode``: ``"linear"`` (default for floating dtypes) interpolates between the two resampled
    slices around each original slice (i * sz / s); ``"nearest"`` (default otherwise) takes the
    nearest one.
    """
    positions = original_positions(entry.num_slices, entry.spacing[0], slice_spacing_mm)
    expected = len(resampled_positions(entry.num_slices, entry.spacing[0], slice_spacing_mm))
    if prediction_3d.ndim != 4 or prediction_3d.shape[1] != expected:
        raise ValueError(
            f"prediction of shape {tuple(prediction_3d.shape)} is not (C, {expected}, S, S), the {slice_spacing_mm:g} mm "
            f"grid of volume {entry.volume_id} ({entry.num_slices} slices at {entry.spacing[0]:g} mm)"
        )
    if mode is None:
        mode = "linear" if prediction_3d.is_floating_point() else "nearest"
    return interpolate_z(prediction_3d, positions, mode)
