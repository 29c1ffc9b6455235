"""Validation and test of a 3D segmentation network (``spatial_dims: 3``) on whole volumes, scored as the 2D path is.

Each evaluation sample is one whole resampled volume (a batch of one). The network predicts it with MONAI's sliding
window (``data.volume_3d.crop_size`` windows, ``sw_overlap``, ``sw_mode``; a volume thinner than a window is padded with
air and its output cropped back, ``cascade_3d.sliding_window``); the probabilities are mapped back onto the
volume's original slices (``to_original_slices``, linear in z) and recorded per slice against the cached 2D labels
(``SliceRecords``), so the per-volume reassembly at full resolution, the largest component and the DDP sharding are
the 2D path's, and so are the figures' definitions. The functions take the ``SegmentationTask`` being evaluated.
"""

from __future__ import annotations

import numpy as np
import torch

from datamodules.datasets.slices import target_channels
from datamodules.io.volume3d import to_original_slices
from lightning_modules.inference.cascade_2d import Predictor
from lightning_modules.inference.cascade_3d import sliding_window, window_probabilities
from lightning_modules.metrics.slice_records import SliceRecords


def evaluate_volume_3d(task, batch: dict, stage: str, blend_logits: bool) -> None:
    """Sliding-window prediction of one whole resampled volume (batch of 1), scored on its original slices.

    ``blend_logits``: a plain segmentation network blends its logits and logs its loss on the whole volume; a network
    with another output (mask mining's error head) blends its decoded probabilities and logs no loss (it would need
    the whole volume's error masks).
    """
    h, image = task.hparams, batch["image"]
    if image.shape[0] != 1:
        raise ValueError(f"3D evaluation takes one whole volume per batch, got {image.shape[0]}")
    if blend_logits:
        inferer = sliding_window(task.trainer.datamodule.volume_3d.crop_size, h.sw_overlap, h.sw_mode)
        outputs = {"seg": inferer(image, lambda window: task(window)["seg"])}
        losses = task.compute_losses(outputs, batch)
        task.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=1)
        probs = task.foreground_probability(outputs).float()[0]  # (C, Z', S, S)
    else:
        probs = window_volume(task, lambda window: task.foreground_probability(task(window)), image)
    record_volume_3d(task, task.records[stage], probs, batch, stage)


def window_volume(task, predict: Predictor, image: torch.Tensor) -> torch.Tensor:
    """(1, 1, Z', S, S) resampled volume -> (1, Z', S, S) probabilities of ``predict`` by the task's sliding window."""
    h = task.hparams
    return window_probabilities(predict, image[0, 0], task.trainer.datamodule.volume_3d.crop_size, h.sw_overlap, h.sw_mode)[None]


def record_volume_3d(task, records: SliceRecords, probs: torch.Tensor, batch: dict, stage: str | None = None) -> None:
    """Record (C, Z', S, S) probabilities of a whole resampled volume on its original slices; overlays when ``stage``."""
    datamodule = task.trainer.datamodule
    h, data = task.hparams, datamodule.hparams
    index = int(batch["volume_index"][0])
    volume = datamodule.volumes[index]
    probs = to_original_slices(probs, volume, data.slice_spacing_mm).clamp_(0, 1).transpose(0, 1).contiguous()  # (Z, C, S, S)
    labels = np.asarray(volume.label)  # (Z, S, S), the cached 2D labels
    target = torch.from_numpy(target_channels(labels, data.target)).to(probs.device).transpose(0, 1)  # (Z, C, S, S)
    num_slices = probs.shape[0]
    volume_index = torch.full((num_slices,), index, dtype=torch.long, device=probs.device)
    slice_index = torch.arange(num_slices, device=probs.device)
    records.update(probs, target, volume_index, slice_index, h.threshold)
    if stage is not None and task.global_rank == 0 and h.num_overlays:  # the 2D path's overlay choice, over this volume's original slices
        slices = {"mask": target.float(), "volume": [batch["volume"][0]] * num_slices, "slice_index": slice_index,
                  "image": torch.from_numpy(np.asarray(volume.image, dtype=np.float32))[:, None]}
        task.overlays.keep_slices(stage, slices, probs, h.threshold)
