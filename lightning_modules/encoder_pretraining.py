"""Encoder pretraining: the first phase of the CMU-Net paper's pre-trained U-Net (PU-Net).

The backbone's encoder and classification head alone (no decoder) learn whether a slice contains
liver, from labels made of the segmentation masks (C = max(Y)), with focal loss. The checkpoint's
``model.encoder.*`` weights then initialise ``PretrainedUNet`` or the two-stage ``CMUNet``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.unet import UNet
from lightning_modules.base import BaseTask
from lightning_modules.losses.focal import focal_loss, slice_labels
from lightning_modules.metrics.classification import classification_metrics, compute_classification, update_classification

STAGES = ("val", "test")


class EncoderPretraining(BaseTask):
    """Slice classification on the U-Net encoder with focal loss.

    Other arguments: ``BaseTask``'s. A U-Net that loads this encoder must use the same in_channels,
    base_channels, norm, spatial_dims, block and se; the paper pretrains with Adam 0.01 and cosine warm restarts every 10 epochs.

    Args:
        focal_alpha: focal loss weight of positive slices (negatives get ``1 - focal_alpha``); the
            paper uses 0.5 and 0.5 for pretraining.
        focal_gamma: focal loss focusing exponent.
    """

    monitor = ("val/auroc", "max")

    def __init__(self, focal_alpha: float = 0.5, focal_gamma: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        h = self.hparams
        self.model = UNet(h.in_channels, base_channels=h.base_channels, norm=h.norm, num_classes=1, decoder=False,
                          spatial_dims=h.spatial_dims, block=h.block, se=h.se)

    def configure_losses(self) -> None:
        self.focal_loss = focal_loss(self.hparams.focal_alpha, self.hparams.focal_gamma)

    def configure_metrics(self) -> None:
        self.classification = nn.ModuleDict({stage: classification_metrics(stage) for stage in STAGES})

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.focal_loss(outputs["cls"], slice_labels(batch, outputs["cls"]))}

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        update_classification(self.classification[stage], outputs["cls"], batch)

    def compute_metrics(self, stage: str) -> dict[str, float]:
        return compute_classification(self.classification[stage])
