"""Segmentation losses (``SegmentationTask``'s ``seg_loss``) and the U-Net pixel weights they share with mask mining.

Every loss takes sigmoid logits (B, C, H, W) and a {0, 1} ground truth of the same shape: each channel is an
independent binary problem (liver, lesion). With ``p = sigmoid(logits)``, ``t`` the ground truth and sums over
the batch, the pixels and (for the pixel-weighted terms) the channels:

* ``"dice"``: MONAI ``DiceLoss(sigmoid=True, batch=True)`` = ``1 - S``, the suite's original loss;
* ``"pwce"``: pixel-weighted binary cross-entropy
  ``L_pwce = sum(w * bce) / sum(w)``, ``bce = -(t log p + (1 - t) log(1 - p))``, with ``w = 1`` (plain mean
  BCE) or, with ``distance_weights``, ``w`` the U-Net weight map of the ground truth channel
  (:func:`unet_weight_map`, ``w_c = 1``). Normalised by ``sum(w)``, not the pixel count, so the scale stays that
  of plain BCE whatever ``w0`` (the same normalisation as mask mining's 4-class pwce);
* ``"pwce_over_dice"``: ``L = L_pwce / (S + eps)``, ``eps = 1e-5``: the mask-mining paper's lesion loss, which
  falls as the soft Dice score rises.

``S`` is the smooth (soft) Dice score of MONAI's DiceLoss: per channel ``c``,
``S_c = (2 sum(p t) + 1e-5) / (sum(p) + sum(t) + 1e-5)`` (sums over batch and pixels, ``smooth_nr = smooth_dr =
1e-5``), then ``S = mean_c S_c``. An empty channel predicted empty scores 1.

Distance weight maps are computed from the ground truth with scipy on the CPU, the slices (or, for a 3D network's
(B, C, D, H, W) crops, the whole crops: distances in voxels) spread over the torch threads, inside the loss (the data
pipeline hands over masks after augmentation, so they cannot be cached): a cost per training step that grows with
the objects in each slice or crop, one distance transform per object (docs/benchmarks.md). Without
``distance_weights`` nothing leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from scipy import ndimage

SEG_LOSSES = ("dice", "pwce", "pwce_over_dice")
EPS = 1e-5  # pwce_over_dice's guard against a zero Dice score


# -- pixel weights ---------------------------------------------------------------------------------------------
def unet_weight_map(target: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                    class_weights: Sequence[float] | None = None) -> np.ndarray:
    """U-Net (Ronneberger et al. 2015) weight map of one 2D ground-truth slice, or of one 3D crop.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))`` with d1, d2 the euclidean distances (pixels)
    to the nearest and second-nearest object (8-connected component, 26-connected in 3D; 0 inside the object
    itself), so pixels separating two close objects weigh most. A 3D crop is weighted as a whole, distances in
    voxels of its grid (the 3D network's resampled volume), so an object in the next slices counts as a neighbour.

    With fewer than two objects d2 does not exist; one object gets the border variant
    ``w0 * exp(-d(x)^2 / (2 sigma^2))``, d the distance to the object's boundary pixels (foreground pixels with
    a background 4-neighbour, 6-neighbour in 3D; the image edge is no boundary), so the weight peaks at w_c + w0 on
    the boundary.
    An empty slice (or one without boundary) gets w_c alone.

    ``w_c``: None -> 1 everywhere (class balance is left to the loss's per-error-class weights, not mixed into
    the map); otherwise ``(background, foreground)`` weights. target: (H, W) or (D, H, W) bool/{0,1}; returns float32
    of its shape.
    """
    mask = np.asarray(target) != 0
    if mask.ndim not in (2, 3):
        raise ValueError(f"unet_weight_map expects a 2D (H, W) slice or a 3D (D, H, W) crop, got shape {mask.shape}")
    w_background, w_foreground = (1.0, 1.0) if class_weights is None else class_weights
    weights = np.where(mask, w_foreground, w_background).astype(np.float64)
    labels, n_objects = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    reach = _reach(w0, sigma, min(w_background, w_foreground))
    if n_objects >= 2:
        # one distance transform per object, each over the object's box grown by `reach` only: beyond it d1 + d2 >
        # reach and the term vanishes in float32, and a 3D crop of many lesions would otherwise cost a whole-crop
        # transform per lesion
        d1, d2 = np.full(mask.shape, np.inf), np.full(mask.shape, np.inf)
        for k, box in enumerate(ndimage.find_objects(labels), 1):
            window = _grown(box, reach, mask.shape)
            d = ndimage.distance_transform_edt(labels[window] != k)
            d2[window] = np.minimum(d2[window], np.maximum(d1[window], d))
            d1[window] = np.minimum(d1[window], d)
        weights += w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    elif n_objects == 1:
        boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)
        if boundary.any():
            window = _grown(ndimage.find_objects(labels)[0], reach, mask.shape)
            d = ndimage.distance_transform_edt(~boundary[window])
            weights[window] += w0 * np.exp(-(d**2) / (2 * sigma**2))
    return weights.astype(np.float32)


def _reach(w0: float, sigma: float, floor: float) -> float:
    """The distance beyond which ``w0 * exp(-d^2 / (2 sigma^2))`` is below half a float32 step of ``floor``, the smallest
    class weight (so adding it changes no float32 weight); infinite when nothing is that small (``floor`` <= 0)."""
    if w0 <= 0:
        return 0.0
    if floor <= 0:
        return np.inf
    return float(sigma * np.sqrt(2 * np.log(w0 / (floor * 2.0**-25))))


def _grown(box: tuple[slice, ...], reach: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown by ``reach`` (rounded up) on every side, clipped to ``shape``."""
    grow = int(min(np.ceil(reach), max(shape)))
    return tuple(slice(max(0, b.start - grow), min(n, b.stop + grow)) for b, n in zip(box, shape))


def distance_weight_maps(target: torch.Tensor, w0: float = 10.0, sigma: float = 5.0) -> torch.Tensor:
    """:func:`unet_weight_map` (``w_c = 1``) of every slice of a (B, C, H, W) ground truth, or of every crop of a
    (B, C, D, H, W) one: float32 of its shape on its device.

    scipy on the CPU, the (sample, channel) slices or crops spread over ``torch.get_num_threads()`` threads (scipy's
    transforms release the GIL; the maps are the same); see the module docstring for the cost.
    """
    if target.ndim not in (4, 5):
        raise ValueError(f"distance weights need 2D slices (B, C, H, W) or 3D crops (B, C, D, H, W), got a target of "
                         f"shape {tuple(target.shape)}")
    masks = target.detach().cpu().numpy()
    slices = [mask for sample in masks for mask in sample]
    threads = min(torch.get_num_threads(), len(slices))

    def weights(mask: np.ndarray) -> np.ndarray:
        return unet_weight_map(mask, w0, sigma)

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            maps = list(pool.map(weights, slices))
    else:
        maps = [weights(mask) for mask in slices]
    return torch.from_numpy(np.stack(maps).reshape(masks.shape)).to(target.device)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * values) / sum(weights)``; all-zero weights give 0, not NaN."""
    return (weights * values).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


# -- segmentation losses ---------------------------------------------------------------------------------------
class PixelWeightedBCE(torch.nn.Module):
    """``"pwce"`` for sigmoid outputs: ``sum(w * bce) / sum(w)`` over batch, channels and pixels (module docstring)."""

    def __init__(self, distance_weights: bool = False, w0: float = 10.0, sigma: float = 5.0):
        super().__init__()
        self.distance_weights, self.w0, self.sigma = distance_weights, w0, sigma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits, target (B, C, H, W) or (B, C, D, H, W) -> scalar loss."""
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if not self.distance_weights:
            return bce.mean()  # w = 1: sum(w * bce) / sum(w) is the mean
        return weighted_mean(bce, distance_weight_maps(target, self.w0, self.sigma).to(bce.dtype))


class SmoothDiceScore(torch.nn.Module):
    """The soft Dice score ``S = 1 - DiceLoss(sigmoid=True, batch=True)`` in [0, 1], higher is better (module docstring)."""

    def __init__(self):
        super().__init__()
        self.dice_loss = DiceLoss(sigmoid=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1 - self.dice_loss(logits, target)


class PwceOverDice(torch.nn.Module):
    """``"pwce_over_dice"``: ``L_pwce / (S + eps)``, eps = 1e-5 (module docstring)."""

    def __init__(self, distance_weights: bool = False, w0: float = 10.0, sigma: float = 5.0):
        super().__init__()
        self.pwce = PixelWeightedBCE(distance_weights, w0, sigma)
        self.dice_score = SmoothDiceScore()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.pwce(logits, target) / (self.dice_score(logits, target) + EPS)


def build_segmentation_loss(name: str, distance_weights: bool = False, w0: float = 10.0, sigma: float = 5.0) -> torch.nn.Module:
    """The segmentation loss ``name`` (one of ``SEG_LOSSES``): a module ``(logits, target) -> scalar``.

    ``distance_weights``, ``w0`` and ``sigma`` weight the pwce term; the plain Dice loss ignores them.
    """
    if name == "dice":
        return DiceLoss(sigmoid=True, batch=True)
    if name == "pwce":
        return PixelWeightedBCE(distance_weights, w0, sigma)
    if name == "pwce_over_dice":
        return PwceOverDice(distance_weights, w0, sigma)
    raise ValueError(f"unknown segmentation loss {name!r}; choose one of: {', '.join(SEG_LOSSES)}")
