"""Mask mining (Roth et al.): error masks, their two losses and the decoding back to a binary mask.

A trained segmentation U-Net is retrained on its own errors. Every pixel gets one of four error
classes against the ground truth, ``error = 2 * target + prediction``:

====  =====  ==========  ======
TN=0  FP=1   FN=2        TP=3
====  =====  ==========  ======

so ``error // 2`` is the ground truth. The network gets four extra 1x1-conv output channels,
logits of shape (B, 4, H, W), trained with one of two losses (``LOSSES``):

* ``"pwce"``: pixel-weighted cross-entropy over the 4 classes (softmax). Per-pixel weight =
  ``class_weights[error class]`` times, optionally, a U-Net distance weight map of the ground truth
  (:func:`unet_weight_map`). The binary mask is ``argmax // 2`` (:func:`decode_argmax`).
* ``"dice"``: multiclass Dice on :func:`dice_targets`, where the TP channel's target is replaced by the
  ground truth (FN | TP pixels). The FN and TP target channels then overlap on FN pixels, which softmax
  cannot fit (both channels would be capped at 0.5 and fight each other), so every channel is an
  independent sigmoid: MONAI ``DiceLoss(sigmoid=True, batch=True)``. The binary mask is the TP channel's
  ``sigmoid >= threshold`` (:func:`decode_tp_channel`).

:func:`error_head_probability` gives a per-pixel score in [0, 1] whose ``>= 0.5`` is exactly the decoded
mask of either loss, so the suite's probability-based metrics apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from lightning_modules.losses.segmentation import distance_weight_maps, weighted_mean

TN, FP, FN, TP = 0, 1, 2, 3
ERROR_CLASSES = ("TN", "FP", "FN", "TP")
LOSSES = ("dice", "pwce")
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))  # largest float32 < 0.5


def error_mask(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Error class of every pixel, ``2 * target + prediction``.

    prediction, target: (B, 1, *spatial) bool or {0, 1} tensors (any nonzero counts as foreground),
    e.g. (B, 1, H, W) slices or (B, 1, D, H, W) volumes. Returns a (B, *spatial) long tensor in {TN, FP, FN, TP}.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    if prediction.ndim < 3 or prediction.shape[1] != 1:
        raise ValueError(f"expected (B, 1, *spatial) masks with one channel, got shape {tuple(prediction.shape)}")
    return (2 * (target[:, 0] != 0).long() + (prediction[:, 0] != 0).long()).long()


def decode_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, 4, *spatial) logits -> (B, 1, *spatial) bool foreground = ``argmax // 2`` (FN or TP wins).

    torch.argmax returns the first maximal index, so background (TN, FP) wins ties with foreground.
    """
    return (logits.argmax(dim=1, keepdim=True) // 2).bool()


def decode_tp_channel(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, 4, *spatial) logits -> (B, 1, *spatial) bool foreground = ``sigmoid(logits[:, TP]) >= threshold``."""
    # sigmoid rather than `logit >= 0`: float32 sigmoid of a tiny negative logit rounds to 0.5, and the
    # decoding must agree bit for bit with error_head_probability.
    return torch.sigmoid(logits[:, TP : TP + 1]) >= threshold


def error_head_probability(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """(B, 4, *spatial) logits -> (B, 1, *spatial) score in [0, 1] with ``score >= 0.5`` == the decoded mask.

    "dice": ``sigmoid(logits[:, TP])``, the TP channel's probability of ground-truth foreground.
    "pwce": not ``p(FN) + p(TP)``, which disagrees with ``argmax // 2`` (softmax 0.3/0.3/0.4/0.0 decodes
    to FN = foreground, yet p(FN) + p(TP) = 0.4). Instead the probability of the best foreground class in a
    two-way contest with the best background class, ``p_fg / (p_fg + p_bg) = sigmoid(max fg logit - max bg
    logit)``: monotone in the margin, 0.5 only on a tie. Ties (and margins so small that float32 sigmoid
    rounds to 0.5) are mapped just below 0.5, because argmax lets background win ties.
    """
    if loss == "dice":
        return torch.sigmoid(logits[:, TP : TP + 1])
    if loss == "pwce":
        margin = logits[:, FN : TP + 1].amax(dim=1, keepdim=True) - logits[:, TN : FP + 1].amax(dim=1, keepdim=True)
        score = torch.sigmoid(margin)
        return torch.where(margin > 0, score.clamp(min=0.5), score.clamp(max=_BELOW_HALF))
    raise ValueError(f"unknown mask-mining loss {loss!r}; choose one of: {', '.join(LOSSES)}")


def dice_targets(errors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice target channels: one-hot of the error classes with the TP channel replaced by the ground truth.

    errors: (B, *spatial) long from :func:`error_mask`; target: (B, 1, *spatial) ground truth.
    Returns (B, 4, *spatial) float; channel TP is FN | TP, the ground-truth mask itself.
    """
    if target.shape[1:2] != (1,) or target[:, 0].shape != errors.shape:
        raise ValueError(f"expected errors (B, *spatial) and target (B, 1, *spatial), got "
                         f"{tuple(errors.shape)} and {tuple(target.shape)}")
    one_hot = F.one_hot(errors, num_classes=4).movedim(-1, 1).float()
    one_hot[:, TP] = (target[:, 0] != 0).float()
    return one_hot


class PixelWeightedCrossEntropy(torch.nn.Module):
    """Pixel-weighted cross-entropy over the four error classes (the "pwce" loss).

    ``loss = sum(w * ce) / sum(w)``, ``w(x) = class_weights[errors(x)] * m(x)`` with m the U-Net distance map
    of the ground truth (:func:`unet_weight_map`, w_c = 1) when ``distance_weights`` else 1. Normalising by
    sum(w) rather than the pixel count keeps the scale of plain cross-entropy whatever the weights; with
    class weights alone it equals ``F.cross_entropy(weight=class_weights)``. Distance maps are computed per slice
    (2D) or per crop (3D) on the CPU with scipy.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, distance_weights: bool = False,
                 w0: float = 10.0, sigma: float = 5.0):
        super().__init__()
        weights = torch.ones(4) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights.shape != (4,) or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"class_weights must be 4 finite non-negative numbers (TN, FP, FN, TP), "
                             f"got {class_weights}")
        # not persistent: checkpoints of models holding this loss stay loadable whatever the weights
        self.register_buffer("class_weights", weights, persistent=False)
        self.distance_weights, self.w0, self.sigma = distance_weights, w0, sigma

    def forward(self, logits: torch.Tensor, errors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, 4, *spatial), errors (B, *spatial) long, target (B, 1, *spatial) ground truth -> scalar loss."""
        if logits.shape[1] != 4 or logits.shape[2:] != errors.shape[1:]:
            raise ValueError(f"expected logits (B, 4, *spatial) matching errors (B, *spatial), got "
                             f"{tuple(logits.shape)} and {tuple(errors.shape)}")
        ce = F.cross_entropy(logits, errors, reduction="none")
        weights = self.class_weights.to(logits.device, logits.dtype)[errors]
        if self.distance_weights:
            weights = weights * distance_weight_maps(target, self.w0, self.sigma)[:, 0].to(logits.dtype)
        # an all-zero weight (every present class weighted 0) gives 0, not NaN
        return weighted_mean(ce, weights)


class MulticlassErrorDice(torch.nn.Module):
    """Multiclass Dice on :func:`dice_targets` (the "dice" loss): MONAI ``DiceLoss(sigmoid=True, batch=True)``.

    Sigmoid because the TP target channel (the ground truth) overlaps the FN channel; ``batch=True`` pools
    the batch per channel, so a class absent from one slice (FN pixels usually are) does not dominate.
    Extra keyword arguments (smooth_nr, smooth_dr, ...) go to DiceLoss.
    """

    def __init__(self, **dice_kwargs):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True, **dice_kwargs)

    def forward(self, logits: torch.Tensor, errors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, 4, *spatial), errors (B, *spatial) long, target (B, 1, *spatial) -> scalar loss."""
        return self.dice(logits, dice_targets(errors, target))


def error_class_counts(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, int]:
    """Pixel count of each error class, ``{"TN": ..., "FP": ..., "FN": ..., "TP": ...}``, of (B, 1, ...) masks."""
    counts = torch.bincount(error_mask(prediction, target).flatten(), minlength=4)
    return {name: int(count) for name, count in zip(ERROR_CLASSES, counts.tolist())}


def build_error_loss(name: str, **kwargs) -> torch.nn.Module:
    """The mask-mining loss ``name`` ("dice" or "pwce"), built with ``kwargs``."""
    if name == "dice":
        return MulticlassErrorDice(**kwargs)
    if name == "pwce":
        return PixelWeightedCrossEntropy(**kwargs)
    raise ValueError(f"unknown mask-mining loss {name!r}; choose one of: {', '.join(LOSSES)}")
