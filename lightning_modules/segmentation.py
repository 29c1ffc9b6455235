"""SegmentationTask: the U-Net backbone, the chosen segmentation loss and the suite's segmentation metrics, shared by every segmenting strategy.

Metrics (validation and test, logged as ``{stage}/{name}``):

* ``dice_slice``, ``hd_slice_px``: mean over slices at the training resolution (the CMU-Net convention);
* ``dice_volume``, ``hd95_volume_mm``, ``hd_volume_mm``: each volume reassembled from its slices at
  its original in-plane resolution, optionally reduced to its largest connected component (liver
  channel), compared in mm; averaged over volumes.

A lesion network of a cascade (``liver_checkpoint`` set, data in ``sampling: liver_roi`` mode) is
evaluated on whole volumes instead, with the LiTS metrics (``{stage}/liver/...``, ``{stage}/lesion/...``;
see ``cascade_evaluation``).

Per-slice predictions are collected in a torchmetrics state gathered over DDP ranks and
de-duplicated; each rank then reassembles and scores its share of the volumes and the per-volume rows
are gathered, so the figures are exact whatever the number of devices and the per-volume work is
divided by it. See
``lightning_modules.metrics.slice_volume`` for the empty-mask conventions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datamodules.errors import CheckpointError, DataError
from lightning_modules.base import BaseTask
from lightning_modules.inference.cascade_2d import CASCADE_DEFAULTS, Predictor
from lightning_modules.inference.cascade_evaluation import (
    FIGURE_KEYS, LiverNetwork, case_figures, predict_sample, predict_sample_3d, summarize_cascade_volumes,
)
from lightning_modules.inference.evaluation_3d import evaluate_volume_3d
from lightning_modules.losses.segmentation import SEG_LOSSES, build_segmentation_loss
from lightning_modules.metrics.slice_records import SliceRecords
from lightning_modules.metrics.slice_volume import COUNT_KEYS, split_slice_figures, summarize_slices
from lightning_modules.metrics.volume_records import VolumeRecords, gather_volume_rows, volume_share
from lightning_modules.metrics.volume_scoring import mean_volume_figures, metric_workers, record_volumes, share_voxels, volume_figures
from lightning_modules.networks.checkpoints import check_backbone_variant, frozen_model, read_base_checkpoint, rebuilt_model_probability
from lightning_modules.networks.unet import UNet
from lightning_modules.reports.figures import overlay_figure, save_figure, write_per_volume_csv
from lightning_modules.reports.overlays import OverlaySamples

STAGES = ("val", "test")


class SegmentationTask(BaseTask):
    """Segmentation on the CMU-Net U-Net, trained with the loss ``seg_loss`` (see ``lightning_modules.losses.segmentation``).

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
            between close objects weigh most; ignored by ``dice``; per slice in 2D, per crop in 3D). Computed on
            the CPU with scipy at every step (see ``losses.segmentation`` for its cost).
        distance_w0: the distance map's peak extra weight ``w0``.
        distance_sigma: the distance map's width ``sigma`` in pixels.
        liver_checkpoint: makes this network a cascade's lesion network: the liver network's checkpoint
            whose prediction bounds the region this network segments at full resolution (with
            ``--data.sampling=liver_roi``). Validation, test and ``lits predict`` then run the cascade.
        region_margin: in-plane margin in pixels of the lesion region around the predicted liver (in 3D: voxels of the
            resampled grid, and the region is at least one sliding window; see ``cascade_3d``).
        region_margin_slices: its margin in slices (in 3D: resampled slices).
        lesion_dilation: lesions are kept inside the predicted liver dilated in-plane by this many (original) pixels.
        sw_overlap: ``spatial_dims: 3`` evaluation: overlap of MONAI's ``SlidingWindowInferer`` windows
            (``data.volume_3d.crop_size``, two windows per forward pass) over each whole resampled volume.
        sw_mode: how overlapping windows are blended: ``gaussian`` (default) or ``constant``.
        metric_workers: worker processes that score a rank's share of the volumes after each validation and test
            epoch (reassembly at full resolution, largest component, surface distances: CPU work, while the CPU cores
            of a GPU machine idle). ``null`` (default): automatic, the cores this process may use divided among the
            machine's ranks, capped by the share's volumes; in-process for a single volume or a small share (see
            ``volume_scoring.metric_workers``). 1: always in-process. Forked, Linux only (elsewhere in-process). The figures
            are the same to the last bit whatever the count.

    With ``spatial_dims: 3`` (``data.spatial_dims: 3``) validation and test predict each whole resampled volume
    with the sliding window, log the loss on it, map the foreground probabilities back onto the original slices
    (``to_original_slices``) and score them per slice and per volume exactly as the 2D path does
    (``inference.evaluation_3d``). A 3D lesion network with a (3D) ``liver_checkpoint`` is evaluated as the 3D cascade
    (``cascade_3d.predict_volume_3d``) with the LiTS metrics, like the 2D cascade; its training crops
    (``data.target: lesion``) lie in and around the liver.
    """

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
        liver_checkpoint: str | None = None,
        region_margin: int = CASCADE_DEFAULTS["region_margin"],
        region_margin_slices: int = CASCADE_DEFAULTS["region_margin_slices"],
        lesion_dilation: int = CASCADE_DEFAULTS["lesion_dilation"],
        sw_overlap: float = 0.25,
        sw_mode: str = "gaussian",
        metric_workers: int | None = None,
        **kwargs,
    ) -> None:
        if sw_mode not in ("gaussian", "constant"):
            raise CheckpointError(f"sw_mode must be gaussian or constant, got {sw_mode!r} (--model.init_args.sw_mode)")
        if metric_workers is not None and metric_workers < 1:
            raise CheckpointError(f"metric_workers must be at least 1, or null for automatic, got {metric_workers} (--model.init_args.metric_workers)")
        if not 0.0 <= sw_overlap < 1.0:
            raise CheckpointError(f"sw_overlap must be in [0, 1), got {sw_overlap} (--model.init_args.sw_overlap)")
        if seg_loss not in SEG_LOSSES:
            raise CheckpointError(f"unknown segmentation loss {seg_loss!r}; choose one of: {', '.join(SEG_LOSSES)} (--model.init_args.seg_loss)")
        super().__init__(**kwargs)
        self.configure_cascade()  # after every subclass's configure_models, whatever they override

    # -- hooks -----------------------------------------------------------------------------------
    @property
    def output_channels(self) -> int:
        """Channels of the ``seg`` output (``out_channels``; the combined model always has 2)."""
        return self.hparams.out_channels

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/lesion/dice", "max") if self.evaluates_cascade else ("val/dice_volume", "max")

    def configure_models(self) -> None:
        h = self.hparams
        self.model = UNet(h.in_channels, h.out_channels, h.base_channels, h.norm, spatial_dims=h.spatial_dims, block=h.block, se=h.se)

    def configure_cascade(self) -> None:
        path = self.hparams.get("liver_checkpoint")
        self._liver_network = [LiverNetwork(path)] if path else []  # a list: kept out of the module tree
        if path:  # both networks of a cascade see the same kind of input: slices or volumes
            check_backbone_variant(path, self._liver_network[0].arch.variant, {"spatial_dims": self.hparams.spatial_dims},
                                   "pass a liver network of this model's spatial_dims")

    @property
    def evaluates_cascade(self) -> bool:
        """Whether whole-volume samples are evaluated as a cascade (this network has a liver network)."""
        return bool(self._liver_network)

    def cascade_networks(self, sample: dict) -> tuple[Predictor, int, Predictor, int]:
        """(liver predictor, its input channels, lesion predictor, its input channels) for one volume sample."""
        liver = self._liver_network[0]
        return (liver.predictor(sample["image"].device), liver.arch.in_channels,
                lambda image: self.foreground_probability(self(image)), self.hparams.in_channels)

    def predict_cascade(self, sample: dict, lesion: Predictor | None = None, liver: LiverNetwork | None = None) -> dict[str, np.ndarray]:
        """The cascade on one volume sample; ``lesion`` replaces this network's lesion predictor and ``liver`` the liver
        network (mask mining's bases).

        A 2D sample (``VolumeDataset``) goes through ``cascade_2d.predict_volume``; a whole resampled volume
        (``WholeVolume3DDataset``, 3D networks) through ``cascade_3d.predict_volume_3d``.
        """
        h = self.hparams
        predict_liver, liver_channels, own, lesion_channels = self.cascade_networks(sample)
        if liver is not None:
            predict_liver, liver_channels = liver.predictor(sample["image"].device), liver.arch.in_channels
        settings = {key: h[key] for key in ("threshold", *CASCADE_DEFAULTS)}
        if sample["image"].ndim == 5:
            datamodule = self.trainer.datamodule
            volume = datamodule.volumes[self.sample_volume_index(sample)]
            return predict_sample_3d(predict_liver, lesion or own, sample, volume, datamodule.hparams, h.sw_overlap, h.sw_mode, **settings)
        return predict_sample(predict_liver, liver_channels, lesion or own, lesion_channels, sample, **settings)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and datamodule.hparams.get("sampling") in ("liver_roi", "combined") and not self.evaluates_cascade:
            raise DataError(f"--data.sampling={datamodule.hparams.sampling} evaluates whole volumes as a cascade, which needs the liver network: "
                            "set --model.init_args.liver_checkpoint=<liver run>/checkpoints/best.ckpt")
        if datamodule is not None and self._liver_network:
            self._liver_network[0].check_data(datamodule.hparams)
        if stage == "fit" and datamodule is not None and datamodule.hparams.get("liver_roi", {}).get("roi_from") == "prediction":
            if not self._liver_network:
                raise DataError("--data.liver_roi.roi_from=prediction draws the training crops around a trained liver network's prediction: "
                                "it needs --model.init_args.liver_checkpoint (a cascade's lesion network)")
            boxes = self._liver_network[0].training_liver_boxes(datamodule, self.trainer.strategy.root_device, self.hparams.threshold,
                                                                show_progress=self.trainer.is_global_zero)
            datamodule.use_predicted_liver(boxes)

    def configure_losses(self) -> None:
        h = self.hparams
        # (seg logits, mask) -> scalar; it holds no weights, so checkpoints do not depend on the choice
        self.segmentation_loss = build_segmentation_loss(h.seg_loss, h.distance_weights, h.distance_w0, h.distance_sigma)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.segmentation_loss(outputs["seg"], batch["mask"])}

    def configure_metrics(self) -> None:
        self.records = nn.ModuleDict({stage: SliceRecords() for stage in STAGES})
        self.volume_records = nn.ModuleDict({stage: VolumeRecords(FIGURE_KEYS) for stage in STAGES})
        self.overlays = OverlaySamples(self.hparams.num_overlays, STAGES)
        self.per_volume: dict[str, dict[int, dict[str, float]]] = {}  # the last epoch's, by stage

    def foreground_probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-pixel foreground probability (B, C, H, W) that the metrics threshold."""
        return torch.sigmoid(outputs["seg"])

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        probs = self.foreground_probability(outputs).float()
        target = batch["mask"] > 0.5
        self.records[stage].update(probs, target, batch["volume_index"], batch["slice_index"], self.hparams.threshold)
        if self.global_rank == 0 and self.hparams.num_overlays:
            self.overlays.keep_slices(stage, batch, probs, self.hparams.threshold)

    def summarize_records(self, records: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Epoch figures (slice and volume means, voxel counts summed over volumes) and per-volume figures of ``SliceRecords.compute()``."""
        datamodule = self.trainer.datamodule
        lcc_channels = (0,) if self.hparams.largest_component and datamodule.hparams.target != "lesion" else ()
        # Every rank holds every slice's record; each scores its share of the volumes and the rows are gathered.
        share = volume_share(record_volumes(records), self.global_rank, self.trainer.world_size)
        # in worker processes on this machine's otherwise idle cores, which its ranks (num_devices) share out
        workers = metric_workers(len(share), share_voxels(records, share), self.trainer.num_devices, self.hparams.get("metric_workers"))
        # with each volume's per-slice Dice and Hausdorff (px), scored beside it in the same worker
        rows = volume_figures(records, datamodule.eval_target, lcc_channels, self.hparams.threshold, share, workers=workers,
                              with_slices=True)
        per_volume, slice_values = split_slice_figures(gather_volume_rows(rows))
        counts = {key: float(sum(figures[key] for figures in per_volume.values())) for key in COUNT_KEYS}
        return {**summarize_slices(records, slice_values), **mean_volume_figures(per_volume), **counts}, per_volume

    # -- whole volumes (the cascade) -------------------------------------------------------------
    def is_cascade_sample(self, batch: dict) -> bool:
        """Whether an evaluation batch is one whole volume to run the cascade on (2D ``VolumeDataset`` or 3D)."""
        return "roi_image" in batch or (batch["image"].ndim == 5 and self.evaluates_cascade)

    @staticmethod
    def sample_volume_index(sample: dict) -> int:
        """The volume index of a whole-volume sample: unbatched in 2D (``VolumeDataset``), a batch of one in 3D."""
        return int(sample["volume_index"] if sample["image"].ndim == 3 else sample["volume_index"][0])

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        if self.is_cascade_sample(batch):
            index = self.sample_volume_index(batch)
            result = self.predict_cascade(batch)
            volume = self.trainer.datamodule.volumes[index]
            truth = volume.label_full()
            self.volume_records[stage].update(index, case_figures(result["labels"], truth, volume.spacing))
            if self.global_rank == 0:
                self.overlays.keep_lesion_slice(stage, volume, truth, result["labels"])
        elif batch["image"].ndim == 5:  # a whole resampled volume (spatial_dims: 3)
            # a plain segmentation loss can be taken on the blended logits; another output (mask mining's) cannot
            evaluate_volume_3d(self, batch, stage, blend_logits=type(self).compute_losses is SegmentationTask.compute_losses)
        else:  # slices
            super()._evaluation_step(batch, stage)

    def compute_metrics(self, stage: str) -> dict[str, float]:
        per_volume = self.volume_records[stage].compute() if self.volume_records[stage].update_count else {}
        self.volume_records[stage].reset()
        if per_volume:
            self.per_volume[stage] = per_volume
            self._write_reports(stage, per_volume)
            return {f"{stage}/{k}": v for k, v in summarize_cascade_volumes(per_volume).items()}
        records = self.records[stage].compute()
        self.records[stage].reset()
        if len(records["volume_index"]) == 0:
            return {}
        figures, self.per_volume[stage] = self.summarize_records(records)
        self._write_reports(stage, self.per_volume[stage])
        return {f"{stage}/{k}": v for k, v in figures.items()}

    # -- reports ---------------------------------------------------------------------------------
    def _write_reports(self, stage: str, per_volume: dict[int, dict[str, float]]) -> None:
        samples = self.overlays.take(stage)
        if self.trainer.sanity_checking:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank makes it
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        write_per_volume_csv(folder / f"{stage}_per_volume.csv", per_volume, self.trainer.datamodule.volumes)
        if samples:
            title = f"validation predictions, epoch {self.current_epoch}" if stage == "val" else "test predictions"
            figure = overlay_figure(samples, title)
            save_figure(figure, folder / f"{stage}_overlays.png", self.loggers, f"{stage}/overlays", self.global_step)

    # -- lits predict --------------------------------------------------------------------------------
    @classmethod
    def predictor(cls, checkpoint: str, device: torch.device) -> Predictor:
        """``lits predict``'s foreground probability (B, 1, ...) of a checkpoint of this class: its network rebuilt from
        the weights alone (``read_base_checkpoint``; a mask-mining round needs no base checkpoint), frozen on ``device``."""
        arch, weights = read_base_checkpoint(checkpoint)
        model = frozen_model(arch, weights).to(device)
        return lambda image: rebuilt_model_probability(model, arch, image)

    @classmethod
    def cascade_predictor(cls, checkpoint: str, device: torch.device) -> Callable[[dict], tuple[Predictor, int, Predictor, int]] | None:
        """``lits predict``'s whole cascade (``cascade_networks``) when a checkpoint of this class holds both networks;
        None (here): it holds one network (``predictor``), and a lesion network names its liver network's checkpoint."""
        return None
