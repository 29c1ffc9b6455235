"""The slices a segmentation task draws in its overlay figure (``figures.overlay_figure``), chosen while it evaluates.

Per stage, up to ``limit`` volumes, each with one slice: the one with the most liver seen so far (slices, and whole
volumes mapped back onto their original slices), or for a cascade the one with the most lesion (else liver), cropped
to the cached region around the liver. Only rank 0 keeps samples: the callers check.
"""

from __future__ import annotations

import numpy as np
import torch


class OverlaySamples:
    """``kept[stage][volume] = (area, caption, image (H, W), truth bool (H, W), prediction bool (H, W))``."""

    def __init__(self, limit: int, stages: tuple[str, ...]):
        self.limit = limit
        self.kept: dict[str, dict] = {stage: {} for stage in stages}

    def keep_slices(self, stage: str, batch: dict, probs: torch.Tensor, threshold: float) -> None:
        """Keep, for up to ``limit`` volumes, the slice of ``batch`` with the most liver (mask channel 0) seen so far."""
        kept = self.kept[stage]
        areas = batch["mask"][:, 0].flatten(1).sum(1)
        for i in torch.nonzero(areas).flatten().tolist():
            volume, area = batch["volume"][i], float(areas[i])
            if (volume not in kept and len(kept) < self.limit) or (volume in kept and area > kept[volume][0]):
                image = batch["image"][i, batch["image"].shape[1] // 2].detach().cpu().clone()
                kept[volume] = (area, f"{volume} z={int(batch['slice_index'][i])}", image,
                                batch["mask"][i, 0].cpu() > 0.5, probs[i, 0].cpu() >= threshold)

    def keep_lesion_slice(self, stage: str, volume, truth: np.ndarray, labels: np.ndarray) -> None:
        """For up to ``limit`` volumes, the slice with the most lesion (else liver) of a cascade's label maps, cropped
        to the cached region (``volume``: the ``CachedVolume``; its full-resolution region around the ground-truth liver)."""
        if len(self.kept[stage]) >= self.limit:
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
        self.kept[stage][volume.volume_id] = (
            float(area[z]), f"{volume.volume_id} z={box[0][0] + z} ({'lesion' if part == 2 else 'liver'})", image,
            truth[region][z] >= part, labels[region][z] >= part,
        )

    def take(self, stage: str) -> list[tuple]:
        """The stage's samples as ``overlay_figure`` draws them (caption, image, truth, prediction); forgotten here."""
        samples, self.kept[stage] = [sample[1:] for sample in self.kept[stage].values()], {}
        return samples
