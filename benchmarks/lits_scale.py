"""``python -m benchmarks --scale lits``: the epoch at LiTS scale, measured in parts on phantom volumes of LiTS' geometry.

LiTS' training set is 131 volumes of 512 x 512 x 74-987 slices (447.6 per volume on average). Training on all of it
takes hours on a CPU, so each part of an epoch is measured on a few phantom volumes of that geometry and scaled to
LiTS' composition (``split=[0.7, 0.15, 0.15]``: 91 training and 20 validation volumes):

1. **Preprocessing** per volume, against a plain nibabel decode of the same files.
2. **A training epoch's parts**, in one Lightning fit of the paper's U-Net (256 x 256, batch 6, per-sample
   augmentation): *data wait*, *step*, and *validation* of one whole volume, split into its *forward* part and its
   *per-volume metrics*. The validation scores a near-truth prediction (``NearTruth``: the truth shifted by 2 px), so
   that the metric time is a trained model's; the network still runs on every slice. Warm-up batches are not timed.
3. **The LiTS epoch** from those parts, on ``--ranks`` processes sharing the validation volumes, each scoring its share
   in ``metric_workers`` processes (the suite's automatic count, measured by scoring that many copies at once).
4. **Per-volume metrics and worst-case surface distances against MONAI** (``benchmarks.surface_metrics``), identical
   values asserted.
5. **Augmentation**: the batch path on the device against the per-sample MONAI path (``augment_batch_vs_sample``).

The last line printed is a JSON object with at least ``validation_share``, ``augment_batch_vs_sample``,
``metric_s_per_volume``, ``metric_workers`` and ``metric_s_per_volume_workers``; docs/benchmarks.md explains each.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules import LiTSDataModule
from datamodules.io.cache import CachedVolume
from datamodules.io.phantom import write_phantom_dataset
from datamodules.splits import split_counts
from lightning_modules import BaselineUNet
from lightning_modules.metrics.slice_volume import SLICE_KEYS, split_slice_figures
from lightning_modules.metrics.volume_scoring import metric_workers, record_volumes, volume_figures
from lightning_modules.metrics.slice_records import RECORD_KEYS
from lightning_modules.metrics.volume_records import volume_share

from benchmarks.augmentation import augmentation_throughput
from benchmarks.preprocessing import bench_preprocess
from benchmarks.surface_metrics import metrics_against_monai, worst_case_surfaces

LITS_VOLUMES, LITS_SLICES_PER_VOLUME, LITS_SPLIT = 131, 58_638 / 131, (0.7, 0.15, 0.15)
# (shape x, y, z; spacing mm): LiTS' range of geometry, small enough for a few minutes on 2 cores
VOLUMES = {
    "full": [((512, 512, 160), (0.7, 0.7, 1.5)), ((512, 512, 120), (0.85, 0.85, 2.5)), ((512, 512, 100), (0.8, 0.8, 5.0))],
    "quick": [((512, 512, 48), (0.7, 0.7, 2.5)), ((512, 512, 40), (0.8, 0.8, 5.0)), ((512, 512, 32), (0.8, 0.8, 5.0))],
}


class NearTruth(BaselineUNet):
    """The U-Net, scored on a near-truth prediction: every evaluation batch still runs the network (timed
    like a real validation), but the per-slice records hold the ground truth shifted by 2 px along x.
    Keeps the last epoch's slice records, which the benchmark scores again in worker processes."""

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        shifted = torch.roll(batch["mask"], shifts=2, dims=-1)
        super().update_metrics(stage, {"seg": (shifted * 2 - 1) * 10.0}, batch)

    def summarize_records(self, records: dict[str, torch.Tensor]):
        self.last_records = records
        return super().summarize_records(records)


class EpochTimer(pl.Callback):
    """Wall time of an epoch's parts: data wait and step per training batch (after ``skip`` warm-up
    batches), the validation's forward part (its batches after ``skip`` warm-up ones, or as many as leave 2
    batches to time) and its epoch-end part (per-volume metrics)."""

    def __init__(self, skip: int):
        self.skip = skip
        self.wait = self.step = 0.0
        self.steps = 0
        self.val_forward = self.val_metrics = 0.0
        self.val_slices = self.val_timed_slices = self.val_skip = 0

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
        batches = int(trainer.num_val_batches[0])
        if not trainer.sanity_checking and batches < 2:
            raise ValueError(f"{batches} validation batch: too few to time after a warm-up one (lower the eval batch size)")
        self.val_skip = max(1, min(self.skip, batches - 2))

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_last = time.perf_counter()
        if trainer.sanity_checking:
            return
        self.val_slices += len(batch["image"])
        if batch_idx == self.val_skip - 1:  # the end of the warm-up: the workers have started, the device is set up
            self.val_start = self.val_last
        elif batch_idx >= self.val_skip:
            self.val_timed_slices += len(batch["image"])

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_forward += self.val_last - self.val_start
            self.val_metrics += time.perf_counter() - self.val_last


def measure_epoch(data: Path, cache: Path, steps: int, batch_size: int, num_workers: int, accelerator: str,
                  eval_batch_size: int | None = None, workers: int = 1) -> dict:
    """One fit: ``steps`` timed training batches after 2 warm-up ones, then validation of one whole volume (batches of
    ``eval_batch_size``, default ``batch_size``); with ``workers`` > 1, one round of that many copies of the volume
    scored in as many worker processes (``metric_round_s``)."""
    pl.seed_everything(0, verbose=False)
    datamodule = LiTSDataModule(root=str(data), cache_dir=str(cache), split=[1, 1, 1], batch_size=batch_size,
                                eval_batch_size=eval_batch_size or batch_size, num_workers=num_workers, preprocess_workers=1)
    module = NearTruth(num_overlays=0, scheduler="none", lr=1e-3)
    timer = EpochTimer(skip=2)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=steps + 2, logger=False,
                         default_root_dir=str(cache.parent),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    volume = datamodule.volumes[datamodule.datasets["val"].volume_indices[0]]
    parts = {
        "wait_s_per_slice": timer.wait / (timer.steps * batch_size),
        "step_s_per_slice": timer.step / (timer.steps * batch_size),
        "val_forward_s_per_slice": timer.val_forward / timer.val_timed_slices,
        "val_metrics_s_per_volume": timer.val_metrics,
        "val_volume_shape": list(volume.full_shape),
        "val_slices": timer.val_slices,
        "val_timed_slices": timer.val_timed_slices,
        "val_warmup_batches": timer.val_skip,
        "eval_batch_size": eval_batch_size or batch_size,
        "steps": timer.steps,
        "metric_workers": workers,
    }
    if workers > 1:
        parts["metric_round_s"] = metric_round(module, datamodule, workers)
    return parts


def metric_round(module: NearTruth, datamodule: LiTSDataModule, workers: int) -> float:
    """Seconds to score ``workers`` copies of the validation volume in ``workers`` worker processes (``volume_figures``
    as ``summarize_records`` calls it, with the per-slice figures), each copy's figures checked equal to the
    validation's in-process ones."""
    records = module.last_records
    (volume,) = record_volumes(records)
    slices = len(records["volume_index"])
    copies = {key: torch.cat([records[key]] * workers) for key in RECORD_KEYS}
    copies["volume_index"] = torch.arange(workers, device=records["volume_index"].device).repeat_interleave(slices)
    channels = (0,) if module.hparams.largest_component and datamodule.hparams.target != "lesion" else ()
    start = time.perf_counter()
    rows = volume_figures(copies, lambda copy: datamodule.eval_target(volume), channels, module.hparams.threshold,
                          workers=workers, with_slices=True)
    elapsed = time.perf_counter() - start
    if len({tuple(row[key] for key in SLICE_KEYS) for row in rows.values()}) != 1:
        raise AssertionError("the per-slice figures of the copies differ")
    rows, _ = split_slice_figures(rows)
    if sorted(rows) != list(range(workers)) or any(row != module.per_volume["val"][volume] for row in rows.values()):
        raise AssertionError("the per-volume figures of the worker processes differ from the in-process ones")
    return elapsed


def lits_metric_workers(ranks: int) -> int:
    """The suite's automatic worker count for one rank's share of LiTS' validation volumes (``ranks`` on this machine)."""
    _, val_volumes, _ = split_counts(LITS_SPLIT, LITS_VOLUMES)
    share = len(volume_share(range(val_volumes), 0, ranks))
    return metric_workers(share, round(share * LITS_SLICES_PER_VOLUME) * 256 * 256, local_processes=ranks)


def lits_epoch(parts: dict, ranks: int) -> dict:
    """The epoch's wall time at LiTS scale from the measured per-slice and per-volume parts.

    With ``metric_round_s`` (``metric_workers`` volumes scored at once), each rank scores its share of the validation
    volumes in rounds of ``metric_workers``; without it, in-process, as ``validation_s_1_worker`` always does.
    """
    train_volumes, val_volumes, _ = split_counts(LITS_SPLIT, LITS_VOLUMES)
    train_slices, val_slices = train_volumes * LITS_SLICES_PER_VOLUME, val_volumes * LITS_SLICES_PER_VOLUME
    scale = LITS_SLICES_PER_VOLUME / parts["val_slices"]  # the measured volume's per-volume time -> LiTS' mean volume
    metric_s = parts["val_metrics_s_per_volume"] * scale
    training = train_slices * (parts["wait_s_per_slice"] + parts["step_s_per_slice"]) / ranks
    forward = val_slices * parts["val_forward_s_per_slice"] / ranks
    sequential = forward + val_volumes * metric_s / ranks
    workers, validation, metric_workers_s = 1, sequential, metric_s
    if "metric_round_s" in parts:
        workers = parts["metric_workers"]
        share = len(volume_share(range(val_volumes), 0, ranks))  # the largest share: the ranks wait for it
        validation = forward + math.ceil(share / workers) * parts["metric_round_s"] * scale
        metric_workers_s = parts["metric_round_s"] * scale / workers
    return {"train_volumes": train_volumes, "val_volumes": val_volumes, "train_slices": round(train_slices),
            "val_slices": round(val_slices), "training_s": training, "validation_s": validation,
            "metric_s_per_volume": metric_s, "metric_workers": workers, "metric_s_per_volume_workers": metric_workers_s,
            "validation_share": validation / (training + validation),
            "validation_s_1_worker": sequential, "validation_share_1_worker": sequential / (training + sequential)}


def bench_lits_scale(work: Path, quick: bool, ranks: int, device: str, eval_batch_size: int | None = None) -> dict:
    """Every part (see the module's docstring); ``eval_batch_size`` None: 6 on the CPU, 32 (``quick``: 16) on a device."""
    geometry = VOLUMES["quick" if quick else "full"]
    if eval_batch_size is None:
        eval_batch_size = 6 if device == "cpu" else 16 if quick else 32
    data = work / "data"
    for index, (shape, spacing) in enumerate(geometry):
        write_phantom_dataset(data / str(index), volumes=1, seed=index, shape=shape, spacing=spacing)
        for path in (data / str(index)).iterdir():  # volume-0.nii.gz -> volume-<index>.nii.gz, one folder
            path.rename(data / path.name.replace("-0.", f"-{index}."))
        (data / str(index)).rmdir()
    pre = bench_preprocess(data, work, repeats=1)
    slices = sum(shape[2] for shape, _ in geometry)
    parts = measure_epoch(data, work / "epoch_cache", steps=2 if quick else 6, batch_size=6, num_workers=2,
                          accelerator="cpu" if device == "cpu" else "gpu", eval_batch_size=eval_batch_size,
                          workers=lits_metric_workers(ranks))
    epoch = lits_epoch(parts, ranks)
    cache = sorted(p for p in (work / "epoch_cache").rglob("*") if p.is_dir() and (p / "image.npy").exists())
    largest = max((CachedVolume(entry) for entry in cache), key=lambda v: np.prod(v.full_shape))
    against = metrics_against_monai(largest, repeats=1 if quick else 2)
    smallest = min((CachedVolume(entry) for entry in cache), key=lambda v: np.prod(v.full_shape))
    worst = worst_case_surfaces(smallest, with_monai=not quick and device == "cpu")  # MONAI's ~30 s: a CPU figure
    augmentation = augmentation_throughput(device=device)
    return {"pre": pre, "slices": slices, "geometry": geometry, "parts": parts, "epoch": epoch, "against": against,
            "worst": worst, "augmentation": augmentation, "ranks": ranks}


def report_rows(result: dict, device: str) -> list[tuple[str, str, str]]:
    """The printed table: (part, figure, note) rows."""
    pre, parts, epoch, against, augmentation = (result[k] for k in ("pre", "parts", "epoch", "against", "augmentation"))
    worst = result["worst"]
    workers = epoch["metric_workers"]
    return [
        ("preprocess per volume", f"{pre['preprocess_s'] / pre['volumes']:.2f} s", f"plain nibabel decode {pre['decode_s'] / pre['volumes']:.2f} s ({pre['ratio']:.2f}x)"),
        ("training: data wait", f"{parts['wait_s_per_slice'] * 1e3:.1f} ms/slice", f"{parts['steps']} batches of 6 at 256x256 after 2 warm-up ones, 2 workers"),
        ("training: step", f"{parts['step_s_per_slice'] * 1e3:.1f} ms/slice", "forward, loss, backward, Adam"),
        ("validation: forward", f"{parts['val_forward_s_per_slice'] * 1e3:.1f} ms/slice",
         f"{parts['val_timed_slices']} of {parts['val_slices']} slices of one volume, batches of {parts['eval_batch_size']} "
         f"after {parts['val_warmup_batches']} warm-up one(s)"),
        ("validation: per-volume metrics", f"{parts['val_metrics_s_per_volume']:.2f} s/volume", f"volume {parts['val_volume_shape']} (z, y, x), in-process"),
        ("  scaled to 447.6 slices", f"{epoch['metric_s_per_volume']:.2f} s/volume", "metric_s_per_volume"),
        (f"  with {workers} worker(s)", f"{epoch['metric_s_per_volume_workers']:.2f} s/volume",
         f"{workers} copies scored at once (a round) / {workers}; metric_workers, automatic for a LiTS share here"),
        ("LiTS epoch: training", f"{epoch['training_s'] / 60:.1f} min", f"{epoch['train_volumes']} volumes, {epoch['train_slices']:,} slices, {result['ranks']} rank(s)"),
        ("LiTS epoch: validation", f"{epoch['validation_s'] / 60:.1f} min", f"{epoch['val_volumes']} volumes, {epoch['val_slices']:,} slices, metrics in {workers} worker(s) per rank"),
        ("  validation share", f"{epoch['validation_share']:.1%}", "target <= 20%"),
        ("  same, metrics in-process", f"{epoch['validation_share_1_worker']:.1%}", f"validation {epoch['validation_s_1_worker'] / 60:.1f} min (as before the workers)"),
        ("Dice + hd95 + HD, suite", f"{against['suite_s']:.2f} s/volume", f"volume {against['shape']}, near-truth prediction"),
        ("  MONAI, uncropped volume", f"{against['monai_s']:.2f} s/volume", f"same values; {against['monai_s'] / against['suite_s']:.2f}x"),
        ("surface distances, worst case", f"{worst['suite_s']:.2f} s/volume",
         f"volume {worst['shape']} all predicted liver"),
        ("  MONAI", "not run (--quick or a device)" if worst["monai_s"] is None else f"{worst['monai_s']:.2f} s/volume",
         "" if worst["monai_s"] is None else f"same values; {worst['monai_s'] / worst['suite_s']:.2f}x"),
        ("augmentation, per sample (MONAI)", f"{augmentation['augment_sample_slices_per_s']:,.0f} slices/s", "1 thread (a DataLoader worker), 256x256"),
        ("augmentation, batch", f"{augmentation['augment_batch_slices_per_s']:,.0f} slices/s",
         f"{augmentation['augment_batch_vs_sample']:.1f}x, batches of {augmentation['batch']} on {device}" + (", 1 thread" if device == "cpu" else "")),
    ]


def summary(result: dict, device: str) -> dict:
    """The JSON line's figures."""
    pre, parts, epoch, against, augmentation = (result[k] for k in ("pre", "parts", "epoch", "against", "augmentation"))
    return {
        "validation_share": round(epoch["validation_share"], 4),
        "validation_share_1_worker": round(epoch["validation_share_1_worker"], 4),
        "augment_batch_vs_sample": round(augmentation["augment_batch_vs_sample"], 2),
        "metric_s_per_volume": round(epoch["metric_s_per_volume"], 3),
        "metric_workers": epoch["metric_workers"],
        "metric_s_per_volume_workers": round(epoch["metric_s_per_volume_workers"], 3),
        "preprocess_s_per_volume": round(pre["preprocess_s"] / pre["volumes"], 3),
        "decode_s_per_volume": round(pre["decode_s"] / pre["volumes"], 3),
        "data_wait_ms_per_slice": round(parts["wait_s_per_slice"] * 1e3, 2),
        "step_ms_per_slice": round(parts["step_s_per_slice"] * 1e3, 2),
        "val_forward_ms_per_slice": round(parts["val_forward_s_per_slice"] * 1e3, 2),
        "eval_batch_size": parts["eval_batch_size"],
        "lits_epoch_training_s": round(epoch["training_s"], 1),
        "lits_epoch_validation_s": round(epoch["validation_s"], 1),
        "metric_suite_vs_monai_uncropped": round(against["suite_s"] / against["monai_s"], 3),
        "surface_worst_s": round(result["worst"]["suite_s"], 3),
        "surface_worst_monai_s": None if result["worst"]["monai_s"] is None else round(result["worst"]["monai_s"], 3),
        "ranks": result["ranks"],
        "device": device,
    }


def print_report(result: dict, device: str) -> None:
    """The table ``python -m benchmarks --scale lits`` prints above its JSON line."""
    geometry = ", ".join(f"{x}x{y}x{z} ({sx}x{sy}x{sz} mm)" for (x, y, z), (sx, sy, sz) in result["geometry"])
    print(f"\nLiTS-scale phantom volumes: {geometry}; {torch.get_num_threads()} threads, device {device}")
    for name, value, note in report_rows(result, device):
        print(f"{name:34s} {value:18s} {note}")
