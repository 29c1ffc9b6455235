"""SegmentationTask: the U-Net backbone, the chosen segmentation loss and the suite's segmentation metrics, shared by every segmenting strategy.

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
from .classification import CheckpointError
from .figures import overlay_figure, save_figure
from .losses import SEG_LOSSES, build_segmentation_loss
from .metrics import COUNT_KEYS, SliceRecords, summarize_slices, summarize_volumes

STAGES = ("val", "test")


class SegmentationTask(BaseTask):
    """Segmentation on the CMU-Net U-Net, trained with the loss ``seg_loss`` (see ``lightning_modules.losses``).

    The backbone and optimisation arguments are ``BaseTask``'s.

    Args:
        out_channels: segmentation channels (1 for liver or lesion, 2 for ``data.target: both``).
        threshold: probability threshold for a foreground pixel.
        largest_component: keep only the largest 3D connected component of the liver channel for
            per-volume metrics (mask mining's evaluation; lesions are never reduced).
        num_overlays: slices drawn in the prediction overlay figure (0 disables it).
        seg_loss: ``dice`` (MONAI Dice on sigmoid outputs over the whole batch), ``pwce`` (pixel-weighted
            binary cross-entropy: the mask-mining paper's liver loss) or ``pwce_over_dice`` (pwce divided by
            the soft Dice score: its lesion loss). Used by ``compute_losses`` through ``segmentation_loss``.
        distance_weights: weight the pwce pixels by the U-Net distance map of the ground truth (pixels
            between close objects weigh most; ignored by ``dice``). Computed on the CPU with scipy at every
            step: some 5 ms per 256x256 slice holding one object.
        distance_w0: the distance map's peak extra weight ``w0``.
        distance_sigma: the distance map's width ``sigma`` in pixels.
    """

    monitor = ("val/dice_volume", "max")

    def __init__(
        self,
        out_channels: int = 1,
        threshold: float = 0.5,
        largest_component: bool = True,
        num_overlays: int = 4,
        seg_loss: str = "dice",
        distance_weights: bool = False,
        distance_w0: float = 10.0,
        distance_sigma: float = 5.0,
        **kwargs,
    ) -> None:
        if seg_loss not in SEG_LOSSES:
            raise CheckpointError(f"unknown segmentation loss {seg_loss!r}; choose one of: {', '.join(SEG_LOSSES)} (--model.init_args.seg_loss)")
        super().__init__(**kwargs)

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        self.model = UNet(h.in_channels, h.out_channels, h.base_channels, h.norm)

    def configure_losses(self) -> None:
        h = self.hparams
        # (seg logits, mask) -> scalar; it holds no weights, so checkpoints do not depend on the choice
        self.segmentation_loss = build_segmentation_loss(h.seg_loss, h.distance_weights, h.distance_w0, h.distance_sigma)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.segmentation_loss(outputs["seg"], batch["mask"])}

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
