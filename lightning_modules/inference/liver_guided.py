"""The combined model's link between its two networks: the liver network's probability on a whole resized slice,
resized back to the original in-plane size exactly as the cascade resizes it (``cascade_2d.upsample_probabilities``:
bilinear, ``align_corners=False``) and cut at the lesion network's full-resolution pixels.

Training (a crop at a known origin) and evaluation (the predicted liver's region) cut the same resized-back map, so
the lesion network's extra input channel holds at training exactly what it holds at evaluation for the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


class LiverGuided:
    """A lesion predictor whose last input channel is the liver network's resized-back probability at its pixels
    (``cascade_2d.predict_volume`` adds that channel to the region's CT channels)."""

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor]):
        self.predict = predict

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict(image)


def resized_back(probability: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, 1, h, w) probabilities at the liver network's scale -> (N, 1, H, W) at the original in-plane ``size``."""
    if tuple(probability.shape[-2:]) == tuple(size):
        return probability
    return F.interpolate(probability, size=tuple(int(n) for n in size), mode="bilinear", align_corners=False)


def crop_probability(probability: torch.Tensor, origins: torch.Tensor, full_sizes: torch.Tensor, crop_size: int) -> torch.Tensor:
    """(B, 1, h, w) whole-slice liver probabilities -> (B, 1, c, c) at the full-resolution crops whose top-left
    corners are ``origins`` (B, 2) in slices of ``full_sizes`` (B, 2); 0 where a crop reaches beyond its slice
    (the CT reads 0 there too). Differentiable: the lesion loss reaches the liver network through it."""
    crops = []
    for prob, (y0, x0), (height, width) in zip(probability, origins.tolist(), full_sizes.tolist()):
        full = F.pad(resized_back(prob[None], (height, width)), [crop_size] * 4)
        crops.append(full[..., y0 + crop_size : y0 + 2 * crop_size, x0 + crop_size : x0 + 2 * crop_size])
    return torch.cat(crops) if crops else probability.new_zeros((0, 1, crop_size, crop_size))


def region_probability(probability: torch.Tensor, full_size: Sequence[int], box: Sequence[Sequence[int]], chunk: int = 32) -> torch.Tensor:
    """(Z, 1, h, w) liver probabilities of a volume -> (Zr, Hr, Wr) at the full-resolution ``box`` (inside the volume),
    resized back ``chunk`` slices at a time."""
    (z0, z1), (y0, y1), (x0, x1) = box
    parts = [resized_back(probability[z : min(z + chunk, z1)].float(), full_size)[:, 0, y0:y1, x0:x1] for z in range(z0, z1, chunk)]
    return torch.cat(parts) if parts else probability.new_zeros((0, y1 - y0, x1 - x0))
