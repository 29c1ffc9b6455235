"""Finding and reading LiTS-style NIfTI pairs, with one-line errors for every kind of bad input.

Two layouts are recognised under a data root:

* LiTS: ``volume-<id>.nii[.gz]`` beside ``segmentation-<id>.nii[.gz]``, in any sub-folder (the
  official release splits them over "Training Batch 1/2").
* Medical Segmentation Decathlon Task03_Liver: ``imagesTr/<id>.nii.gz`` and ``labelsTr/<id>.nii.gz``
  (macOS ``._*`` resource files shipped in the MSD tarball are ignored).

The suite's own temporary files (``.tmp-*``, left behind by a killed writer: ``datamodules.io.atomic``) are
never taken for data. A CT whose voxels are NaN or infinite is refused (``check_finite``): it would train on
and predict from numbers that are not Hounsfield units.

Volumes are returned in nibabel's closest-canonical orientation (RAS+: array axis 0 points to the
patient's right, axis 1 anterior, axis 2 superior), so axial slices are ``array[:, :, z]`` whatever
the orientation the file was stored in, and ``z`` grows towards the head.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.errors import DataError
from datamodules.io.atomic import is_temporary

LABELS = (0, 1, 2)  # background, liver, lesion
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DATA_HELP = (
    "point --data.root at a LiTS folder (volume-<id>.nii[.gz] + segmentation-<id>.nii[.gz]) or an MSD "
    "Task03_Liver folder (imagesTr/ + labelsTr/), or leave it unset to use the synthetic phantom"
)


@dataclass(frozen=True)
class VolumeFiles:
    volume_id: str
    image: Path
    label: Path


def strip_nifti_suffix(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _nifti_files(folder: Path, recursive: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is None or path.name.startswith("._") or is_temporary(path) or not path.is_file():
            continue
        if stem in found:
            raise DataError(f"{path}: duplicate of {found[stem]}; keep only one copy of each volume in the data folder")
        found[stem] = path
    return found


def _pair_up(images: dict[str, Path], labels: dict[str, Path], image_word: str, label_word: str) -> list[VolumeFiles]:
    for volume_id, path in images.items():
        if volume_id not in labels:
            raise DataError(f"{path}: volume has no {label_word}; add it or remove the volume from the data folder")
    for volume_id, path in labels.items():
        if volume_id not in images:
            raise DataError(f"{path}: {label_word} has no {image_word}; add it or remove the mask from the data folder")
    return [VolumeFiles(i, images[i], labels[i]) for i in sorted(images, key=natural_key)]


def discover(root: str | Path) -> list[VolumeFiles]:
    """All (volume, mask) pairs under ``root``, sorted naturally by id; raises DataError if unpaired or empty."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {DATA_HELP}")
    if (root / "imagesTr").is_dir():
        if not (root / "labelsTr").is_dir():
            raise DataError(f"{root / 'labelsTr'} is missing beside imagesTr/; add the MSD label folder")
        pairs = _pair_up(
            _nifti_files(root / "imagesTr", False), _nifti_files(root / "labelsTr", False), "image in imagesTr/", "label in labelsTr/"
        )
    else:
        files = _nifti_files(root, True)
        images = {k.removeprefix("volume-"): p for k, p in files.items() if k.startswith("volume-")}
        labels = {k.removeprefix("segmentation-"): p for k, p in files.items() if k.startswith("segmentation-")}
        pairs = _pair_up(images, labels, "volume-<id> file", "segmentation-<id> mask")
    if not pairs:
        raise DataError(f"data folder {root} contains no NIfTI volumes; {DATA_HELP}")
    return pairs


def open_nifti(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error}); re-export or re-download it") from None
    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {image.shape}; store one CT volume per file")
    return image


def check_pair(files: VolumeFiles) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Header-level checks (cheap, nothing decompressed): both readable, same shape, same affine."""
    image, label = open_nifti(files.image), open_nifti(files.label)
    if image.shape != label.shape:
        raise DataError(
            f"{files.label}: mask shape {label.shape} differs from {files.image.name} shape {image.shape}; "
            "use the mask that belongs to this volume"
        )
    scale = max(1.0, float(np.abs(image.affine).max()))
    if not np.allclose(image.affine, label.affine, atol=1e-3 * scale, rtol=0):
        raise DataError(
            f"{files.label}: mask affine differs from {files.image.name}'s; the mask is not on the volume's grid, "
            "resample or re-export it onto the volume"
        )
    return image, label


def read_voxels(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as error:
        raise DataError(f"{path}: truncated or corrupt data ({type(error).__name__}: {error}); re-download or re-export it") from None


def check_finite(voxels: np.ndarray, path: Path) -> None:
    """DataError naming ``path`` and how many of its voxels are NaN or infinite (integer data cannot be)."""
    if voxels.dtype.kind not in "fc":
        return
    bad = voxels.size - np.count_nonzero(np.isfinite(voxels))
    if bad:
        raise DataError(f"{path}: {bad} of {voxels.size} voxels are NaN or infinite; a CT holds finite Hounsfield units, "
                        "fix or re-export the scan")


def check_labels(labels: np.ndarray, path: Path) -> None:
    # Range checks are single vectorised passes; np.unique (a sort) only runs to word the error.
    valid = labels.max() <= max(LABELS) and (labels.dtype.kind == "u" or labels.min() >= 0)
    if valid and labels.dtype.kind == "f":
        valid = bool(np.all(labels == np.round(labels)))
    if not valid:
        values = np.unique(labels)
        bad = [v.item() for v in values if v not in LABELS][:5]
        raise DataError(f"{path}: label values {bad} outside {{0 background, 1 liver, 2 lesion}}; map the labels to LiTS' convention")


def load_pair(files: VolumeFiles) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a pair in canonical RAS+ orientation.

    Returns ``(hu, label, spacing)``: Hounsfield units (X, Y, Z) as stored (integers, or floats
    when the header scales them), uint8 labels (X, Y, Z) in {0, 1, 2}, and voxel spacing
    (sx, sy, sz) in mm along those axes. The arrays may be strided views (no copies are made).
    """
    image, label = check_pair(files)
    image, label = nib.as_closest_canonical(image), nib.as_closest_canonical(label)
    hu = read_voxels(image, files.image)
    check_finite(hu, files.image)
    labels = read_voxels(label, files.label)
    check_labels(labels, files.label)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    return hu, labels.astype(np.uint8, copy=False), spacing
