"""CMU-Net: the U-Net trained jointly on segmentation and slice classification (context-aware multitasking).

L = seg_weight * S(seg logits, mask) + cls_weight * Focal(cls logits, slice label), the paper's
``w_s d + w_c f`` with w_s = w_c = 0.5 and focal weights 0.8 / 0.2 for positive / negative slices.
S is the segmentation loss ``seg_loss``: the paper's Dice loss d by default.
The classification head (global average pooling + Linear on the deepest encoder features) only
shapes the shared encoder: segmentation metrics and inference use the decoder's output alone.
With ``encoder_checkpoint`` it is the paper's proposed two-stage process: pretrained encoder
(and head), then joint training.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.unet import UNet
from lightning_modules.losses.focal import focal_loss, slice_labels
from lightning_modules.metrics.classification import classification_metrics, compute_classification, update_classification
from lightning_modules.networks.checkpoints import load_encoder_weights
from lightning_modules.segmentation import STAGES, SegmentationTask


class CMUNet(SegmentationTask):
    """Joint segmentation and slice classification on one U-Net.

    Other arguments: ``SegmentationTask``'s and ``BaseTask``'s (the paper trains CMU-Net with lr 0.001
    and batch size 6).

    Args:
        seg_weight: weight of the segmentation term (``seg_loss``, logged under its name).
        cls_weight: weight of the focal (slice classification) term.
        focal_alpha: focal loss weight of positive slices (negatives get ``1 - focal_alpha``).
        focal_gamma: focal loss focusing exponent.
        encoder_checkpoint: optional checkpoint (e.g. ``EncoderPretraining``'s) whose encoder, and
            classification head when it has one, initialise the model before joint training.
    """

    supports_3d = False  # 2D only: refused in one line before any work (experiments/commands/lightning_cli.py)

    def __init__(
        self,
        seg_weight: float = 0.5,
        cls_weight: float = 0.5,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        encoder_checkpoint: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        h = self.hparams
        self.model = UNet(h.in_channels, h.out_channels, h.base_channels, h.norm, num_classes=1,
                          spatial_dims=h.spatial_dims, block=h.block, se=h.se)
        if h.encoder_checkpoint:
            load_encoder_weights(self.model, h.encoder_checkpoint, classification_head=True)

    def configure_losses(self) -> None:
        super().configure_losses()
        self.focal_loss = focal_loss(self.hparams.focal_alpha, self.hparams.focal_gamma)

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.classification = nn.ModuleDict({stage: classification_metrics(stage) for stage in STAGES})

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        h = self.hparams
        seg = self.segmentation_loss(outputs["seg"], batch["mask"])
        focal = self.focal_loss(outputs["cls"], slice_labels(batch, outputs["cls"]))
        return {"loss": h.seg_weight * seg + h.cls_weight * focal, h.seg_loss: seg, "focal": focal}

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        super().update_metrics(stage, outputs, batch)
        update_classification(self.classification[stage], outputs["cls"], batch)

    def compute_metrics(self, stage: str) -> dict[str, float]:
        return {**super().compute_metrics(stage), **compute_classification(self.classification[stage])}
