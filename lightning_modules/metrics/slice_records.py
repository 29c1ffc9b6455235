"""``SliceRecords``: what the evaluation loop keeps of every slice, gathered over DDP ranks (a torchmetrics Metric).

The per-slice and per-volume figures are computed from these records after the epoch (``lightning_modules.metrics.slice_volume``);
the loop itself only stores them, so it costs a fraction of a millisecond per slice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

RECORD_KEYS = ("volume_index", "slice_index", "probs_u8", "pred_bits", "target_bits")
MASK_KEYS = ("pred_bits", "target_bits")  # the slice masks, bit-packed along the width (``_pack_bits``)


def check_mask_pair(pred: torch.Tensor, target: torch.Tensor, ndim: int) -> None:
    if pred.shape != target.shape or pred.ndim != ndim:
        raise ValueError(f"expected pred and target of the same {ndim}-D shape, got {pred.shape}, {target.shape}")


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (..., W) -> uint8 (..., ceil(W / 8)) on the mask's device: ``np.packbits(mask, axis=-1)`` (the first
    pixel of each group of 8 in the highest bit; zeros past the width)."""
    bits = F.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8))
    packed = bits[..., 0::8] << 7
    for bit in range(1, 8):
        packed |= bits[..., bit::8] << (7 - bit)
    return packed


def unpack_bits(bits: torch.Tensor, width: int) -> np.ndarray:
    """``_pack_bits``' inverse: uint8 (..., ceil(W / 8)) -> bool (..., W) numpy array (on the CPU)."""
    return np.unpackbits(bits.cpu().numpy(), axis=-1, count=width).view(bool)


class SliceRecords(Metric):
    """Per evaluated slice: volume index, slice index, the foreground probabilities quantised to uint8 at the training
    resolution, so volumes can be reassembled after the epoch even when a volume's slices were spread over DDP ranks,
    and the slice's thresholded prediction and target at that resolution, bit-packed along the width
    (``pred_bits``, ``target_bits``), which the per-slice Dice and Hausdorff are computed on after the epoch
    (``volume_figures(..., with_slices=True)``, ``slice_figures``). States are lists gathered with
    ``dist_reduce_fx='cat'``. ``update`` stays on the probabilities' device and computes nothing else, so the
    evaluation loop does not wait for the per-slice figures' CPU work.

    Under DDP every rank must call ``update`` at least once before ``compute`` (Lightning's
    DistributedSampler guarantees it by padding): torchmetrics replaces an empty rank's state by a 1-D
    float tensor, which cannot be concatenated with the others.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in RECORD_KEYS:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        volume_index: torch.Tensor,
        slice_index: torch.Tensor,
        threshold: float = 0.5,
    ) -> None:
        """probs float (B, C, H, W) in [0, 1]; target bool or {0, 1} (B, C, H, W); indices long (B,)."""
        probs = probs.detach()
        if probs.ndim != 4:
            raise ValueError("probs must be (B, C, H, W) probabilities in [0, 1] (not logits, no NaN)")
        device = probs.device  # states live on the metric's device so NCCL can gather them
        if isinstance(target, np.ndarray):
            target = np.ascontiguousarray(target)  # torch refuses negative strides (e.g. flipped NIfTI arrays)
        target = torch.as_tensor(target).detach().to(device)
        check_mask_pair(probs, target, 4)
        checks = [torch.ones((), dtype=torch.bool, device=device)]  # an empty batch (aminmax refuses it)
        if probs.numel():
            low, high = torch.aminmax(probs)  # one pass; NaN propagates to both
            checks = [(low >= 0) & (high <= 1)]
        if target.dtype != torch.bool:
            checks.append(((target == 0) | (target == 1)).all())
            target = target != 0
        probs_ok, *target_ok = torch.stack(checks).tolist()  # one synchronisation for both checks
        if not probs_ok:
            raise ValueError("probs must be (B, C, H, W) probabilities in [0, 1] (not logits, no NaN)")
        if not all(target_ok):
            raise ValueError("binary masks must be bool or contain only 0 and 1")
        volume_index, slice_index = torch.as_tensor(volume_index).reshape(-1), torch.as_tensor(slice_index).reshape(-1)
        if not len(volume_index) == len(slice_index) == len(probs):
            raise ValueError("volume_index and slice_index must give one index per slice of the batch")
        self.volume_index.append(volume_index.to(device=device, dtype=torch.long))
        self.slice_index.append(slice_index.to(device=device, dtype=torch.long))
        self.probs_u8.append(torch.round(probs.float() * 255).to(torch.uint8))
        # the masks of the per-slice figures: the float probabilities thresholded here, as the figures always were
        # (the uint8 values would agree at 0.5 only), and the target at the training resolution
        self.pred_bits.append(_pack_bits(probs >= threshold))
        self.target_bits.append(_pack_bits(target))

    def compute(self) -> dict[str, torch.Tensor]:
        """Records sorted by (volume_index, slice_index), one per slice (DistributedSampler padding repeats
        samples). With no records, empty tensors (``probs_u8`` and the bits of shape (0, 0, 0, 0))."""
        if isinstance(self.volume_index, list) and len(self.volume_index) == 0:
            empty = {key: torch.zeros(0, dtype=torch.long, device=self.device) for key in RECORD_KEYS[:2]}
            return empty | {key: torch.zeros((0, 0, 0, 0), dtype=torch.uint8, device=self.device) for key in RECORD_KEYS[2:]}
        records = {key: dim_zero_cat(getattr(self, key)) for key in RECORD_KEYS}
        volumes, slices = records["volume_index"], records["slice_index"]
        if not all(len(v) == len(volumes) for v in records.values()):
            raise RuntimeError("SliceRecords states have inconsistent lengths")
        # Lexicographic sort with two stable sorts; the first of duplicate slices is kept (they are identical
        # predictions of the same sample).
        order = torch.argsort(slices, stable=True)
        order = order[torch.argsort(volumes[order], stable=True)]
        v, s = volumes[order], slices[order]
        first = torch.ones_like(v, dtype=torch.bool)
        first[1:] = (v[1:] != v[:-1]) | (s[1:] != s[:-1])
        keep = order[first]
        return {key: value[keep] for key, value in records.items()}
