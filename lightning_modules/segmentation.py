"""SegmentationTask: the U-Net backbone plus the suite's segmentation metrics, shared by every segmenting strategy.

Metrics (validation and test, logged as ``{stage}/{name}``):

* ``dice_slice``, ``hd_slice_px``: mean over slices at the training resolution (the CMU-Net convention);
* ``dice_volume``, ``hd95_volume_mm``, ``hd_volume_mm``: each volume reassembled from its slices at
  its original in-plane resolution, optionally reduced to its largest connected component (liver
  channel), compared in mm; averaged over volumes.

Per-slice predictions are collected in a torchmetrics state gathered over DDP ranks and
de-duplicated, so the figures are exact whatever the number of devices. See
``lightning_modules.metrics`` for the empty-mask conventions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from .backbone import UNet
from .base import BaseTask
from .figures import overlay_figure, save_figure
from .metrics import COUNT_KEYS, SliceRecords, summarize_slices, summarize_volumes

STAGES = ("val", "test")


class SegmentationTask(BaseTask):
    """Segmentation on the CMU-Net U-Net. Subclasses define the loss.

    Args:
        in_channels: input channels (``2 * data.context_slices + 1``).
        out_channels: segmentation channels (1 for liver or lesion, 2 for ``data.target: both``).
        base_channels: first block width (16 in the paper; doubles per block up to 256).
        norm: ``instance`` (paper) or ``batch``.
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        scheduler: ``cosine_warm_restarts`` (CMU-Net), ``step`` (mask mining) or ``none``.
        restart_period: epochs between cosine warm restarts.
        min_lr: cosine floor.
        step_size, step_gamma: StepLR period (epochs) and factor.
        threshold: probability threshold for a foreground pixel.
        largest_component: keep only the largest 3D connected component of the liver channel for
            per-volume metrics (mask mining's evaluation; lesions are never reduced).
        num_overlays: slices drawn in the prediction overlay figure (0 disables it).
    """

    monitor = ("val/dice_volume", "max")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        norm: str = "instance",
        lr: float = 0.01,
        weight_decay: float = 0.0,
        scheduler: str = "cosine_warm_restarts",
        restart_period: int = 10,
        min_lr: float = 0.0,
        step_size: int = 30,
        step_gamma: float = 0.1,
        threshold: float = 0.5,
        largest_component: bool = True,
        num_overlays: int = 4,
    ) -> None:
        super().__init__()

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        self.model = UNet(h.in_channels, h.out_channels, h.base_channels, h.norm)

    def configure_metrics(self) -> None:
        self.records = nn.ModuleDict({stage: SliceRecords() for stage in STAGES})
        self._overlay_samples: dict[str, dict] = {stage: {} for stage in STAGES}
        self.per_volume: dict[str, dict[int, dict[str, float]]] = {}  # the last epoch's, by stage

    def foreground_probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-pixel foreground probability (B, C, H, W) that the metrics threshold."""
        return torch.sigmoid(outputs["seg"])

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        probs = self.foreground_probability(outputs).float()
        target = batch["mask"] > 0.5
        self.records[stage].update(probs, target, batch["volume_index"], batch["slice_index"], self.hparams.threshold)
        self._keep_overlay_samples(stage, batch, probs)

    def summarize_records(self, records: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Epoch figures (slice and volume means, voxel counts summed over volumes) and per-volume figures of ``SliceRecords.compute()``."""
        datamodule = self.trainer.datamodule
        lcc_channels = (0,) if self.hparams.largest_component and datamodule.hparams.target != "lesion" else ()
        volumes, per_volume = summarize_volumes(
            records, datamodule.eval_target, lcc_channels, self.hparams.threshold, return_per_volume=True
        )
        counts = {key: float(sum(figures[key] for figures in per_volume.values())) for key in COUNT_KEYS}
        return {**summarize_slices(records), **volumes, **counts}, per_volume

    def compute_metrics(self, stage: str) -> dict[str, float]:
        records = self.records[stage].compute()
        self.records[stage].reset()
        if len(records["volume_index"]) == 0:
            return {}
        figures, self.per_volume[stage] = self.summarize_records(records)
        self._write_reports(stage, self.per_volume[stage])
        return {f"{stage}/{k}": v for k, v in figures.items()}

    # -- reports ---------------------------------------------------------------------------------
    def _keep_overlay_samples(self, stage: str, batch: dict, probs: torch.Tensor) -> None:
        """Keep, for up to ``num_overlays`` volumes, the slice with the most liver seen so far (rank 0 only)."""
        kept = self._overlay_samples[stage]
        if self.global_rank != 0 or not self.hparams.num_overlays:
            return
        areas = batch["mask"][:, 0].flatten(1).sum(1)
        for i in torch.nonzero(areas).flatten().tolist():
            volume, area = batch["volume"][i], float(areas[i])
            if (volume not in kept and len(kept) < self.hparams.num_overlays) or (volume in kept and area > kept[volume][0]):
                image = batch["image"][i, batch["image"].shape[1] // 2].detach().cpu().clone()
                kept[volume] = (area, f"{volume} z={int(batch['slice_index'][i])}", image,
                                batch["mask"][i, 0].cpu() > 0.5, probs[i, 0].cpu() >= self.hparams.threshold)

    def _write_reports(self, stage: str, per_volume: dict[int, dict[str, float]]) -> None:
        samples, self._overlay_samples[stage] = [s[1:] for s in self._overlay_samples[stage].values()], {}
        if self.trainer.sanity_checking:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank makes it
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        volumes = self.trainer.datamodule.volumes
        with open(folder / f"{stage}_per_volume.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            names = sorted(next(iter(per_volume.values()), {}))
            writer.writerow(["volume", *names])
            for index, figures in sorted(per_volume.items()):
                writer.writerow([volumes[index].volume_id, *(f"{figures[n]:.6g}" for n in names)])
        if samples:
            title = f"validation predictions, epoch {self.current_epoch}" if stage == "val" else "test predictions"
            figure = overlay_figure(samples, title)
            save_figure(figure, folder / f"{stage}_overlays.png", self.loggers, f"{stage}/overlays", self.global_step)
