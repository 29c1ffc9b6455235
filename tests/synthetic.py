"""Tiny synthetic LiTS-like volumes for tests, written as real NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def tiny_volume(seed: int, shape=(32, 32, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A small canonical (RAS) volume: body at 0 HU, a liver ellipsoid at 60 HU on the right, a lesion inside.

    The first and last two slices have no liver.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((x - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1] = 0
    cx, cy = shape[0] * (0.62 + 0.05 * rng.random()), shape[1] * 0.5
    liver = ((x - cx) / (shape[0] * 0.22)) ** 2 + ((y - cy) / (shape[1] * 0.25)) ** 2 + ((z - shape[2] / 2) / (shape[2] * 0.32)) ** 2 < 1
    label = liver.astype(np.uint8)
    lesion = ((x - cx) ** 2 + (y - cy) ** 2 + (z - shape[2] / 2) ** 2) < 4
    label[lesion & liver] = 2
    hu[liver] = 60
    hu[label == 2] = 20
    hu += rng.normal(0, 5, shape).astype(np.float32)
    return hu.astype(np.int16), label


def write_pair(folder: Path, volume_id: str, hu: np.ndarray, label: np.ndarray, affine: np.ndarray | None = None) -> tuple[Path, Path]:
    affine = np.diag([1.5, 1.5, 4.0, 1.0]) if affine is None else affine
    folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / f"volume-{volume_id}.nii.gz", folder / f"segmentation-{volume_id}.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return image_path, label_path


def tiny_experiment(folder: Path, model: str = "BaselineUNet", volumes: int = 3, split=(1, 1, 1), max_epochs: int = 1,
                    **init_args) -> dict:
    """Write `volumes` tiny 32x32x6 volumes under ``folder/data`` and return a `lits fit` config for them.

    A 4-channel U-Net on 32x32 slices, CPU, no progress bar: what the end-to-end tests of `lits run`,
    `lits study` and `lits sweep` train in a few seconds. Paths are relative to ``folder``.
    """
    for i in range(volumes):
        write_pair(folder / "data", str(i), *tiny_volume(i, shape=(32, 32, 6)))
    return {
        "model": {"class_path": f"lightning_modules.{model}", "init_args": {"base_channels": 4, **init_args}},
        "data": {"root": "data", "cache_dir": "cache", "split": list(split), "image_size": 32, "batch_size": 4,
                 "num_workers": 0, "preprocess_workers": 1},
        "trainer": {"max_epochs": max_epochs, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
    }


def fitted_datamodule(root, tmp_path, **options):
    """A ``LiTSDataModule`` on ``root`` with its cache under ``tmp_path``, prepared and set up for fitting."""
    from datamodules import LiTSDataModule

    module = LiTSDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, **options)
    module.prepare_data()
    module.setup("fit")
    return module
