"""Variants of the real CT sample (tests/data/real-ct-sample) made the way real LiTS volumes differ from it.

The sample is 122 x 101 x 30 voxels of 3 mm, stored RAS. LiTS volumes are 512 x 512 at ~0.7-1 mm in-plane, stored
LPS, LAS or RAS, some of them thin slabs of the upper abdomen. Every variant is resampled in the canonical frame
(linear for HU, nearest for the mask), padded with air to 512 x 512 where asked, then stored in the requested
orientation with an affine that keeps the world position of every voxel, so a loader that reorients to canonical
must recover the same anatomy.

    python -m tests.real_ct_variants OUT    # writes every variant as its own LiTS-layout folder under OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

SAMPLE = Path(__file__).parent / "data" / "real-ct-sample"
AIR_HU = -1024

#: name -> (in-plane spacing mm or None to keep, slice spacing mm or None, padded in-plane size or None,
#:          upper-abdomen slab thickness in mm or None for the whole volume, stored axis codes)
VARIANTS = {
    "as-is": (None, None, None, None, ("R", "A", "S")),
    "lits-512-las": (0.98, None, 512, None, ("L", "A", "S")),
    "lits-512-lps": (0.98, None, 512, None, ("L", "P", "S")),
    "thin-slab-2mm-las": (0.98, 2.0, 512, 40.0, ("L", "A", "S")),
}


def _resample(array: np.ndarray, zoom: tuple[float, float, float], order: int) -> np.ndarray:
    return ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)


def make_variant(name: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(volume, segmentation) images of one variant, in memory."""
    in_plane, through, size, slab_mm, codes = VARIANTS[name]
    volume = nib.as_closest_canonical(nib.load(SAMPLE / "volume-0.nii.gz"))
    label_image = nib.as_closest_canonical(nib.load(SAMPLE / "segmentation-0.nii.gz"))
    hu = np.asarray(volume.dataobj, dtype=np.float32)
    label = np.asarray(label_image.dataobj, dtype=np.uint8)
    spacing = np.array(volume.header.get_zooms()[:3], dtype=float)
    if slab_mm is not None:  # the top (superior) slices: where the liver dome and the spleen share the slice
        keep = int(round(slab_mm / spacing[2]))
        hu, label = hu[:, :, -keep:], label[:, :, -keep:]
    target = np.array([in_plane or spacing[0], in_plane or spacing[1], through or spacing[2]])
    zoom = tuple(spacing / target)
    if not np.allclose(zoom, 1.0):
        hu, label = _resample(hu, zoom, 1), _resample(label, zoom, 0)
    if size is not None:
        pad = [((size - n) // 2, size - n - (size - n) // 2) for n in hu.shape[:2]] + [(0, 0)]
        hu = np.pad(hu, pad, constant_values=AIR_HU)
        label = np.pad(label, pad, constant_values=0)
    affine = np.diag([*target, 1.0])
    affine[:3, 3] = volume.affine[:3, 3]
    canonical = [nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), nib.Nifti1Image(label.astype(np.uint8), affine)]
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    return tuple(image.as_reoriented(transform) for image in canonical)


def write_variant(name: str, folder: Path) -> Path:
    """Write one variant as ``folder/volume-0.nii.gz`` + ``folder/segmentation-0.nii.gz``; return folder."""
    folder.mkdir(parents=True, exist_ok=True)
    volume, label = make_variant(name)
    nib.save(volume, folder / "volume-0.nii.gz")
    nib.save(label, folder / "segmentation-0.nii.gz")
    return folder


if __name__ == "__main__":
    for variant in VARIANTS:
        print(write_variant(variant, Path(sys.argv[1]) / variant))
