"""The baseline U-Net of the CMU-Net paper: segmentation only, trained with Dice loss."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from .segmentation import SegmentationTask


class BaselineUNet(SegmentationTask):
    """U-Net trained on segmentation alone with MONAI's Dice loss on sigmoid outputs.

    The Dice is computed over the whole batch (``batch=True``) rather than per slice, so slices
    without liver (a third or more of a CT volume) neither dominate nor destabilise the loss.
    """

    def configure_losses(self) -> None:
        self.dice_loss = DiceLoss(sigmoid=True, batch=True)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.dice_loss(outputs["seg"], batch["mask"])}
