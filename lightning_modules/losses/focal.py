"""The slice-classification loss of the CMU-Net paper: MONAI's sigmoid focal loss on whether a slice holds liver."""

from __future__ import annotations

import torch
from monai.losses import FocalLoss


def focal_loss(alpha: float, gamma: float) -> FocalLoss:
    """Sigmoid focal loss on (B, 1) logits, mean over the batch.

    ``alpha`` weights the positive slices and ``1 - alpha`` the negative ones: MONAI's
    ``sigmoid_focal_loss`` multiplies each term by ``target * alpha + (1 - target) * (1 - alpha)``.
    The paper's "weights 0.8 and 0.2 for positive and negative examples" is therefore ``alpha=0.8``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal alpha (weight of positive slices) must be in [0, 1], got {alpha}")
    return FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="mean")


def slice_labels(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's slice labels (B,) shaped and typed like the (B, 1) classification logits."""
    return batch["label"].reshape(like.shape).to(like.dtype)
