"""``python -m benchmarks --scale lits``: the epoch at LiTS scale, measured in parts on phantom volumes of LiTS' geometry.

LiTS' training set is 131 volumes of 512 x 512 x 74-987 slices (58,638 slices, 447.6 per volume on
average), 0.56-1.0 mm in plane and 0.7-5 mm between slices. Training on all of it takes hours on a
CPU, so the benchmark measures each part of an epoch on a few phantom volumes of that geometry and
scales the parts to LiTS' composition:

1. **Preprocessing** (decode, reorient, window, resize to 256, write the cache) per volume, against a
   plain nibabel decode of the same files.
2. **A training epoch's parts**, measured in one Lightning fit of the paper's U-Net (``BaselineUNet``,
   256 x 256, batch 6, the suite's per-sample augmentation, ``num_workers`` DataLoader workers) on the
   phantom's training volume: *data wait* (from one step's end to the next step's start: the loader
   plus Lightning's loop), *step* (forward, loss, backward, Adam) and *validation* of one whole volume,
   split into its *forward* part (network + per-slice records) and its *per-volume metrics* (reassembly at
   512 x 512, largest 3D component, Dice and surface distances in mm). The validation scores a
   near-truth prediction (the truth shifted by 2 px at 256 x 256, ``NearTruth``) rather than the
   untrained network's output, so that the metric time is that of a trained model (the surface
   distances of a prediction far from the truth cost far more; ``python -m benchmarks`` (f) shows that
   worst case). The network still runs on every validation slice.
3. **The LiTS epoch**, from the measured parts: ``split=[0.7, 0.15, 0.15]`` of 131 volumes (91 training, 20
   validation volumes) of 447.6 slices each; every training slice once per epoch (the data module's
   default, no ``foreground_margin``); validation of every slice of the validation volumes and one
   per-volume metric computation each (scaled to 447.6 slices from the measured volume), on
   ``--ranks`` processes sharing the validation volumes (sharded validation) and one device each.
   ``validation_share`` = validation / (training + validation) of that epoch's wall time.
4. **Per-volume metric time against MONAI** on the full volume: ``metrics.volume_dice_hausdorff`` (the
   suite's; cropped to the masks' joint bounding box) against MONAI's ``compute_dice`` and
   ``compute_hausdorff_distance`` (95 and 100) on the uncropped volume; identical values asserted.
5. **Augmentation**: the batch path (``datamodules.batch_augmentation``, on the device) against the
   per-sample MONAI path, in slices/s at 256 x 256: ``augment_batch_vs_sample``.

The last line printed is a JSON object with at least ``validation_share``, ``augment_batch_vs_sample`` and
``metric_s_per_volume`` (per volume of 447.6 slices at 512 x 512).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from datamodules import LiTSDataModule
from datamodules.cache import CachedVolume
from datamodules.phantom import write_phantom_dataset
from datamodules.splits import _counts
from lightning_modules import BaselineUNet
from lightning_modules.metrics import volume_dice_hausdorff

from .augmentation import augmentation_throughput
from .preprocessing import bench_preprocess

LITS_VOLUMES, LITS_SLICES_PER_VOLUME, LITS_SPLIT = 131, 58_638 / 131, (0.7, 0.15, 0.15)
# (shape x, y, z; spacing mm): LiTS' range of geometry, small enough for a few minutes on 2 cores
VOLUMES = {
    "full": [((512, 512, 160), (0.7, 0.7, 1.5)), ((512, 512, 120), (0.85, 0.85, 2.5)), ((512, 512, 100), (0.8, 0.8, 5.0))],
    "quick": [((512, 512, 48), (0.7, 0.7, 2.5)), ((512, 512, 40), (0.8, 0.8, 5.0)), ((512, 512, 32), (0.8, 0.8, 5.0))],
}


class NearTruth(BaselineUNet):
    """The U-Net, scored on a near-truth prediction: every evaluation batch still runs the network (timed
    like a real validation), but the per-slice records hold the ground truth shifted by 2 px along x."""

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        shifted = torch.roll(batch["mask"], shifts=2, dims=-1)
        super().update_metrics(stage, {"seg": (shifted * 2 - 1) * 10.0}, batch)


class EpochTimer(pl.Callback):
    """Wall time of an epoch's parts: data wait and step per training batch (after ``skip`` warm-up
    batches), the validation's forward part (its batches) and its epoch-end part (per-volume metrics)."""

    def __init__(self, skip: int):
        self.skip = skip
        self.wait = self.step = 0.0
        self.steps = 0
        self.val_forward = self.val_metrics = 0.0
        self.val_slices = 0

    def on_train_epoch_start(self, trainer, module):
        self.mark = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx >= self.skip:
            self.wait += now - self.mark
        self.started = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx >= self.skip:
            self.step += now - self.started
            self.steps += 1
        self.mark = now

    def on_validation_epoch_start(self, trainer, module):
        self.val_start = self.val_last = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_last = time.perf_counter()
        if not trainer.sanity_checking:
            self.val_slices += len(batch["image"])

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_forward += self.val_last - self.val_start
            self.val_metrics += time.perf_counter() - self.val_last


def measure_epoch(data: Path, cache: Path, steps: int, batch_size: int, num_workers: int, accelerator: str) -> dict:
    """One fit: ``steps`` timed training batches after 2 warm-up ones, then validation of one whole volume."""
    pl.seed_everything(0, verbose=False)
    datamodule = LiTSDataModule(root=str(data), cache_dir=str(cache), split=[1, 1, 1], batch_size=batch_size,
                                eval_batch_size=batch_size, num_workers=num_workers, preprocess_workers=1)
    module = NearTruth(num_overlays=0, scheduler="none", lr=1e-3)
    timer = EpochTimer(skip=2)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=steps + 2, logger=False,
                         default_root_dir=str(cache.parent),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    volume = datamodule.volumes[datamodule.datasets["val"].volume_indices[0]]
    return {
        "wait_s_per_slice": timer.wait / (timer.steps * batch_size),
        "step_s_per_slice": timer.step / (timer.steps * batch_size),
        "val_forward_s_per_slice": timer.val_forward / timer.val_slices,
        "val_metrics_s_per_volume": timer.val_metrics,
        "val_volume_shape": list(volume.full_shape),
        "val_slices": timer.val_slices,
        "steps": timer.steps,
    }


def lits_epoch(parts: dict, ranks: int) -> dict:
    """The epoch's wall time at LiTS scale from the measured per-slice and per-volume parts."""
    train_volumes, val_volumes, _ = _counts(LITS_SPLIT, LITS_VOLUMES)
    train_slices, val_slices = train_volumes * LITS_SLICES_PER_VOLUME, val_volumes * LITS_SLICES_PER_VOLUME
    metric_s = parts["val_metrics_s_per_volume"] * LITS_SLICES_PER_VOLUME / parts["val_slices"]
    training = train_slices * (parts["wait_s_per_slice"] + parts["step_s_per_slice"]) / ranks
    validation = (val_slices * parts["val_forward_s_per_slice"] + val_volumes * metric_s) / ranks
    return {"train_volumes": train_volumes, "val_volumes": val_volumes, "train_slices": round(train_slices),
            "val_slices": round(val_slices), "training_s": training, "validation_s": validation,
            "metric_s_per_volume": metric_s, "validation_share": validation / (training + validation)}


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


def bench_lits_scale(work: Path, quick: bool, ranks: int, device: str) -> dict:
    geometry = VOLUMES["quick" if quick else "full"]
    data = work / "data"
    for index, (shape, spacing) in enumerate(geometry):
        write_phantom_dataset(data / str(index), volumes=1, seed=index, shape=shape, spacing=spacing)
        for path in (data / str(index)).iterdir():  # volume-0.nii.gz -> volume-<index>.nii.gz, one folder
            path.rename(data / path.name.replace("-0.", f"-{index}."))
        (data / str(index)).rmdir()
    pre = bench_preprocess(data, work, repeats=1)
    slices = sum(shape[2] for shape, _ in geometry)
    parts = measure_epoch(data, work / "epoch_cache", steps=2 if quick else 6, batch_size=6, num_workers=2,
                          accelerator="cpu" if device == "cpu" else "gpu")
    epoch = lits_epoch(parts, ranks)
    cache = sorted(p for p in (work / "epoch_cache").rglob("*") if p.is_dir() and (p / "image.npy").exists())
    largest = max((CachedVolume(entry) for entry in cache), key=lambda v: np.prod(v.full_shape))
    against = metrics_against_monai(largest, repeats=1 if quick else 2)
    augmentation = augmentation_throughput(device=device)
    return {"pre": pre, "slices": slices, "geometry": geometry, "parts": parts, "epoch": epoch, "against": against,
            "augmentation": augmentation, "ranks": ranks}
