"""Test-time mirroring and model ensembles, as nnU-Net predicts: foreground probabilities averaged over several
networks and over the mirror images of their input, each mirrored prediction flipped back before the average,
then thresholded once by the cascade.

Both wrap the cascades' predictors (``cascade_2d.Predictor``, ``cascade_3d.VolumePredictor``: a batch of slices or
windows -> probabilities of the same spatial size), so the 2D and 3D cascades, a combined model's own cascade and
the sliding window need no change: a 3D window is mirrored as nnU-Net mirrors its patches. The mirrored axes are
the in-plane ones, and for 3D networks the slice axis too; a 2.5D network's context channels are not reversed.

MONAI's ``TestTimeAugmentation`` (``monai.data``) is not used: it draws random invertible transforms per sample
dictionary, whereas mirroring is a fixed set of flips on a batch, exactly undone by flipping again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch

from lightning_modules.inference.cascade_2d import Predictor
from lightning_modules.inference.liver_guided import LiverGuided

#: a combined model's whole cascade for one volume sample: (liver predictor, its channels, lesion predictor, its channels)
CascadeNetworks = Callable[[dict], tuple[Predictor, int, Predictor, int]]


def mirror_axes(spatial_dims: int) -> tuple[int, ...]:
    """The axes of a (B, K, [D,] H, W) batch that test-time mirroring flips: rows and columns, and slices in 3D."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return (-3, -2, -1) if spatial_dims == 3 else (-2, -1)


def mirrorings(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the identity (``()``) first: 4 mirror images in 2D, 8 in 3D."""
    return [subset for size in range(len(axes) + 1) for subset in combinations(tuple(axes), size)]


class MeanPredictor:
    """The mean foreground probability of ``predictors`` over the mirror images of the input along ``axes``."""

    def __init__(self, predictors: Sequence[Predictor], axes: Sequence[int] = ()) -> None:
        if not predictors:
            raise ValueError("an ensemble needs at least one predictor")
        self.predictors = list(predictors)
        self.flips = mirrorings(axes)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        total = None
        for flip in self.flips:
            mirrored = image.flip(flip) if flip else image
            for predict in self.predictors:
                probability = predict(mirrored).float()
                probability = probability.flip(flip) if flip else probability
                # a new tensor either way: a predictor's output is never summed into in place
                total = probability.clone() if total is None else total.add_(probability)
        return total.div_(len(self.flips) * len(self.predictors))


def mean_predictor(predictors: Sequence[Predictor], axes: Sequence[int] = ()) -> Predictor:
    """``MeanPredictor``, or the one predictor itself when there is nothing to average (the same figures, no copy).

    Combined models' lesion networks (``LiverGuided``) stay guided: the cascade adds the liver probability channel to
    their input, mirrored with the CT. In an ensemble that channel is the ensemble's mean liver probability, the one
    the cascade thresholds, rather than each model's own."""
    if len(predictors) == 1 and not axes:
        return predictors[0]
    guided = {isinstance(predict, LiverGuided) for predict in predictors}
    if len(guided) > 1:
        raise ValueError("a combined model's lesion network (liver-guided) cannot be averaged with an unguided one")
    mean = MeanPredictor(predictors, axes)
    return LiverGuided(mean) if guided == {True} else mean


def mean_cascade(cascades: Sequence[CascadeNetworks], axes: Sequence[int] = ()) -> CascadeNetworks:
    """Several combined models' cascades as one: per volume sample, their liver predictors averaged, and their lesion
    predictors averaged (models of one input size: ``experiments.commands.predict_models.check_compatible``)."""
    if len(cascades) == 1 and not axes:
        return cascades[0]

    def networks(sample: dict) -> tuple[Predictor, int, Predictor, int]:
        members = [cascade(sample) for cascade in cascades]
        _, liver_channels, _, lesion_channels = members[0]
        return (mean_predictor([m[0] for m in members], axes), liver_channels,
                mean_predictor([m[2] for m in members], axes), lesion_channels)

    return networks
