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

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_modules.networks.unet import UNet
from lightning_modules.base import BaseTask
from datamodules import DataError
from datamodules.datasets.slices import target_channels
from datamodules.io.volume3d import original_positions, to_original_slices

from lightning_modules.inference.cascade_2d import CASCADE_DEFAULTS, Predictor, liver_mask, mask_box, slice_probabilities
from lightning_modules.inference.cascade_3d import predict_volume_3d, window_probabilities
from lightning_modules.inference.cascade_evaluation import FIGURE_KEYS, LiverNetwork, case_figures, predict_sample
from lightning_modules.inference.cascade_evaluation import summarize_volumes as summarize_cascade
from datamodules.errors import CheckpointError
from lightning_modules.classification import check_backbone_variant
from lightning_modules.reports.figures import overlay_figure, save_figure
from lightning_modules.losses.segmentation import SEG_LOSSES, build_segmentation_loss
from lightning_modules.metrics.slice_volume import COUNT_KEYS, split_slice_figures, summarize_slices
from lightning_modules.metrics.volume_scoring import mean_volume_figures, metric_workers, record_volumes, share_voxels, volume_figures
from lightning_modules.metrics.slice_records import SliceRecords
from lightning_modules.metrics.volume_records import VolumeRecords, gather_volume_rows, volume_share

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
            between close objects weigh most; ignored by ``dice``). Computed on the CPU with scipy at every
            step: some 5 ms per 256x256 slice holding one object.
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
            (``data.crop_size_3d``, two windows per forward pass) over each whole resampled volume.
        sw_mode: how overlapping windows are blended: ``gaussian`` (default) or ``constant``.
        metric_workers: worker processes that score a rank's share of the volumes after each validation and test
            epoch (reassembly at full resolution, largest component, surface distances: CPU work, while the CPU cores
            of a GPU machine idle). ``null`` (default): automatic, the cores this process may use divided among the
            machine's ranks, capped by the share's volumes; in-process for a single volume or a small share (see
            ``volume_scoring.metric_workers``). 1: always in-process. Forked, Linux only (elsewhere in-process). The figures
            are the same to the last bit whatever the count.

    With ``spatial_dims: 3`` (``data.spatial_dims: 3``) validation and test predict each whole resampled volume
    with the sliding window, log the loss on it, map the foreground probabilities back onto the original slices
    (``to_original_slices``) and score them per slice and per volume exactly as the 2D path does. A 3D lesion
    network with a (3D) ``liver_checkpoint`` is evaluated as the 3D cascade (``cascade_3d.predict_volume_3d``) with
    the LiTS metrics, like the 2D cascade; its training crops (``data.target: lesion``) lie in and around the liver.
    """

    supports_3d = True  # with data.spatial_dims 3 (a subclass that is 2D only says False)

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
        if distance_weights and self.hparams.spatial_dims == 3:
            raise CheckpointError("distance_weights are 2D (U-Net weight maps per slice); set --model.init_args.distance_weights=false for a 3D network")
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

    def predict_cascade(self, sample: dict, lesion: Predictor | None = None) -> dict[str, np.ndarray]:
        """The cascade on one volume sample; ``lesion`` replaces this network's lesion predictor (mask mining's base).

        A 2D sample (``VolumeDataset``) goes through ``cascade.predict_volume``; a whole resampled volume
        (``WholeVolume3DDataset``, 3D networks) through ``cascade_3d.predict_volume_3d``.
        """
        h = self.hparams
        liver, liver_channels, own, lesion_channels = self.cascade_networks(sample)
        if sample["image"].ndim == 5:
            data = self.trainer.datamodule.hparams
            volume = self.trainer.datamodule.volumes[self.sample_volume_index(sample)]
            return predict_volume_3d(liver, lesion or own, sample["image"][0, 0], original_positions(volume.num_slices, volume.spacing[0], data.slice_spacing_mm),
                                     volume.full_shape, data.crop_size_3d, h.sw_overlap, h.sw_mode, threshold=h.threshold,
                                     region_margin=h.region_margin, region_margin_slices=h.region_margin_slices,
                                     lesion_dilation=h.lesion_dilation)
        return predict_sample(liver, liver_channels, lesion or own, lesion_channels, sample, threshold=h.threshold,
                              region_margin=h.region_margin, region_margin_slices=h.region_margin_slices,
                              lesion_dilation=h.lesion_dilation)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and datamodule.hparams.get("sampling") == "liver_roi" and not self.evaluates_cascade:
            raise DataError("--data.sampling=liver_roi evaluates whole volumes as a cascade, which needs the liver network: "
                            "set --model.init_args.liver_checkpoint=<liver run>/checkpoints/best.ckpt")
        if datamodule is not None and self._liver_network:
            self._liver_network[0].check_data(datamodule.hparams)
        if stage == "fit" and datamodule is not None and datamodule.hparams.get("roi_from") == "prediction":
            if not self._liver_network:
                raise DataError("--data.roi_from=prediction draws the training crops around a trained liver network's prediction: "
                                "it needs --model.init_args.liver_checkpoint (a cascade's lesion network)")
            datamodule.use_predicted_liver(self._predicted_liver_boxes(datamodule))

    @torch.no_grad()
    def _predicted_liver_boxes(self, datamodule) -> dict[int, list | None]:
        """The liver network's liver (largest component) box in each training volume, on the run's device."""
        liver = self._liver_network[0]
        device = self.trainer.strategy.root_device
        predict = liver.predictor(device)
        indices = datamodule.datasets["train"].volume_indices
        boxes = {}
        for index in tqdm(indices, desc="Predicting the liver of the training volumes", unit="vol", disable=not self.trainer.is_global_zero):
            volume = datamodule.volumes[index]
            image = torch.from_numpy(np.asarray(volume.image, dtype=np.float32)).to(device)
            probs = slice_probabilities(predict, image, liver.arch.in_channels)
            boxes[index] = mask_box(liver_mask(probs, tuple(volume.full_shape[1:]), self.hparams.threshold), 0, 0)
        return boxes

    def configure_losses(self) -> None:
        h = self.hparams
        # (seg logits, mask) -> scalar; it holds no weights, so checkpoints do not depend on the choice
        self.segmentation_loss = build_segmentation_loss(h.seg_loss, h.distance_weights, h.distance_w0, h.distance_sigma)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.segmentation_loss(outputs["seg"], batch["mask"])}

    def configure_metrics(self) -> None:
        self.records = nn.ModuleDict({stage: SliceRecords() for stage in STAGES})
        self.volume_records = nn.ModuleDict({stage: VolumeRecords(FIGURE_KEYS) for stage in STAGES})
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
            self._keep_lesion_overlay(stage, volume, truth, result["labels"])
        elif batch["image"].ndim == 5:  # a whole resampled volume (spatial_dims: 3)
            self._evaluate_volume_3d(batch, stage)
        else:  # slices
            super()._evaluation_step(batch, stage)

    def _evaluate_volume_3d(self, batch: dict, stage: str) -> None:
        """Sliding-window prediction of one whole resampled volume (batch of 1), scored on its original slices.

        The probabilities are mapped back onto the original slices (``to_original_slices``, linear in z) and
        recorded per slice against the cached 2D labels, so the per-volume reassembly at full resolution, the
        largest component and the DDP sharding are the 2D path's. A plain segmentation network blends its logits
        and logs its loss on the whole volume; a network with another output (mask mining's error head) blends
        its decoded probabilities and logs no loss (it would need the whole volume's error masks).
        """
        from monai.inferers import SlidingWindowInferer

        data = self.trainer.datamodule.hparams
        h, image = self.hparams, batch["image"]
        if image.shape[0] != 1:
            raise ValueError(f"3D evaluation takes one whole volume per batch, got {image.shape[0]}")
        if type(self).compute_losses is SegmentationTask.compute_losses:
            inferer = SlidingWindowInferer(roi_size=tuple(int(v) for v in data.crop_size_3d), sw_batch_size=2,
                                           overlap=h.sw_overlap, mode=h.sw_mode)
            outputs = {"seg": inferer(image, lambda window: self(window)["seg"])}
            losses = self.compute_losses(outputs, batch)
            self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=1)
            probs = self.foreground_probability(outputs).float()[0]  # (C, Z', S, S)
        else:
            probs = self.window_volume(lambda window: self.foreground_probability(self(window)), image)
        self.record_volume_3d(self.records[stage], probs, batch, stage)

    def window_volume(self, predict: Predictor, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, Z', S, S) resampled volume -> (1, Z', S, S) probabilities of ``predict`` by the sliding window."""
        h = self.hparams
        return window_probabilities(predict, image[0, 0], self.trainer.datamodule.hparams.crop_size_3d, h.sw_overlap, h.sw_mode)[None]

    def record_volume_3d(self, records: SliceRecords, probs: torch.Tensor, batch: dict, stage: str | None = None) -> None:
        """Record (C, Z', S, S) probabilities of a whole resampled volume on its original slices; overlays when ``stage``."""
        datamodule = self.trainer.datamodule
        h, data = self.hparams, datamodule.hparams
        index = int(batch["volume_index"][0])
        volume = datamodule.volumes[index]
        probs = to_original_slices(probs, volume, data.slice_spacing_mm).clamp_(0, 1).transpose(0, 1).contiguous()  # (Z, C, S, S)
        labels = np.asarray(volume.label)  # (Z, S, S), the cached 2D labels
        target = torch.from_numpy(target_channels(labels, data.target)).to(probs.device).transpose(0, 1)  # (Z, C, S, S)
        num_slices = probs.shape[0]
        volume_index = torch.full((num_slices,), index, dtype=torch.long, device=probs.device)
        slice_index = torch.arange(num_slices, device=probs.device)
        records.update(probs, target, volume_index, slice_index, h.threshold)
        if stage is not None and self.global_rank == 0 and h.num_overlays:  # the 2D path's overlay choice, over this volume's original slices
            slices = {"mask": target.float(), "volume": [batch["volume"][0]] * num_slices, "slice_index": slice_index,
                      "image": torch.from_numpy(np.asarray(volume.image, dtype=np.float32))[:, None]}
            self._keep_overlay_samples(stage, slices, probs)

    def _keep_lesion_overlay(self, stage: str, volume, truth: np.ndarray, labels: np.ndarray) -> None:
        """For up to ``num_overlays`` volumes, the slice with the most lesion (else liver), cropped to the cached region
        (``volume``: the ``CachedVolume``; its full-resolution region around the ground-truth liver)."""
        if self.global_rank != 0 or len(self._overlay_samples[stage]) >= self.hparams.num_overlays:
            return
        box = [list(axis) for axis in volume.roi_box]
        if box[0][1] <= box[0][0]:
            return
        region = tuple(slice(a, b) for a, b in box)
        area = (truth[region] == 2).sum(axis=(1, 2))
        part = 2 if area.any() else 1
        area = (truth[region] >= part).sum(axis=(1, 2))
        z = int(np.argmax(area))
        image = torch.from_numpy(np.asarray(volume.roi_image[z], dtype=np.float32))
        self._overlay_samples[stage][volume.volume_id] = (
            float(area[z]), f"{volume.volume_id} z={box[0][0] + z} ({'lesion' if part == 2 else 'liver'})", image,
            truth[region][z] >= part, labels[region][z] >= part,
        )

    def compute_metrics(self, stage: str) -> dict[str, float]:
        per_volume = self.volume_records[stage].compute() if self.volume_records[stage].update_count else {}
        self.volume_records[stage].reset()
        if per_volume:
            self.per_volume[stage] = per_volume
            self._write_reports(stage, per_volume)
            return {f"{stage}/{k}": v for k, v in summarize_cascade(per_volume).items()}
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
