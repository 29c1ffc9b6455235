"""The per-volume metrics of ``python -m benchmarks --scale lits`` against MONAI's, on full-resolution volumes.

* ``metrics_against_monai``: the suite's Dice / hd95 / Hausdorff (cropped to the masks' joint box) against MONAI's
  ``compute_dice`` / ``compute_hausdorff_distance`` on the uncropped volume, for a near-truth prediction;
* ``worst_case_surfaces``: the liver's surface distances with the whole volume predicted liver (an untrained
  network's answer, where a KD-tree search is slowest) against MONAI's ``get_edge_surface_distance``.
Both assert identical values, so a speed-up can never change a figure.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.metrics.utils import get_edge_surface_distance

from datamodules.io.cache import CachedVolume
from lightning_modules.metrics.slice_volume import volume_dice_hausdorff
from lightning_modules.metrics.surface_distance import surface_distances


def near_truth_volume(volume: CachedVolume) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A volume's full-resolution liver truth (1, Z, H, W) and a near-truth prediction: shifted by 2 voxels in
    x, with one false-positive island (a trained network's typical error)."""
    truth = (np.asarray(volume.label_full()) >= 1)[None]
    pred = np.roll(truth, 2, axis=-1)
    z, h, w = truth.shape[1:]
    pred[0, z // 2, h // 8 : h // 8 + 10, w // 8 : w // 8 + 10] = True
    return pred, truth, [float(s) for s in volume.spacing]


def metrics_against_monai(volume: CachedVolume, repeats: int) -> dict:
    """The suite's per-volume Dice / hd95 / Hausdorff against MONAI's on the uncropped volume: time and values."""
    pred, truth, spacing = near_truth_volume(volume)

    def suite():
        return volume_dice_hausdorff(pred, truth, spacing)

    def monai():
        p, t = torch.from_numpy(pred)[None], torch.from_numpy(truth)[None]
        return {
            "dice_volume": float(compute_dice(p, t, include_background=True)),
            "hd95_volume_mm": float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)),
            "hd_volume_mm": float(compute_hausdorff_distance(p, t, include_background=True, spacing=spacing)),
        }

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)  # MONAI's own call
    times = {"suite": float("inf"), "monai": float("inf")}
    for _ in range(repeats):
        for name, function in (("suite", suite), ("monai", monai)):
            start = time.perf_counter()
            values = function()
            times[name] = min(times[name], time.perf_counter() - start)
            if name == "suite":
                ours = values
            else:
                theirs = values
    for key, value in theirs.items():
        if abs(ours[key] - value) > 1e-4 * max(1.0, abs(value)):
            raise AssertionError(f"{key}: suite {ours[key]} != MONAI {value}")
    return {"shape": list(volume.full_shape), "suite_s": times["suite"], "monai_s": times["monai"], "values": ours}


def worst_case_surfaces(volume: CachedVolume, with_monai: bool) -> dict:
    """The liver's surface distances with the whole volume predicted liver: the suite's time, and MONAI's on the same
    masks (``with_monai``; identical values asserted, or AssertionError)."""
    truth = np.asarray(volume.label_full()) >= 1
    pred = np.ones_like(truth)
    spacing = [float(s) for s in volume.spacing]
    start = time.perf_counter()
    ours = surface_distances(pred, truth, spacing)
    result = {"shape": list(truth.shape), "suite_s": time.perf_counter() - start, "monai_s": None}
    if with_monai:
        start = time.perf_counter()
        _, theirs, _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(truth), spacing=spacing,
                                                 symmetric=True, warn_empty=False)
        result["monai_s"] = time.perf_counter() - start
        if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
            raise AssertionError("worst-case surface distances: the suite's differ from MONAI's")
    return result
