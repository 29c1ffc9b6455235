"""Test-time mirroring and ensembles: probabilities averaged over models and mirror images, each flipped back."""

import pytest
import torch

from lightning_modules.inference.cascade_2d import predict_volume
from lightning_modules.inference.ensemble import MeanPredictor, mean_cascade, mean_predictor, mirror_axes, mirrorings
from lightning_modules.inference.liver_guided import LiverGuided


def pixelwise(spatial_dims: int, seed: int = 0):
    """A flip-equivariant 'network': a 1x1 convolution and a sigmoid, so mirroring its input mirrors its output."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d)(3, 1, 1)
    return lambda image: torch.sigmoid(conv(image)).detach()


def test_mirror_images_are_every_subset_of_the_axes_identity_first():
    assert mirror_axes(2) == (-2, -1) and mirror_axes(3) == (-3, -2, -1)
    assert mirrorings(mirror_axes(2)) == [(), (-2,), (-1,), (-2, -1)]
    flips = mirrorings(mirror_axes(3))
    assert len(flips) == len(set(flips)) == 8 and flips[0] == () and (-3, -2, -1) in flips
    with pytest.raises(ValueError):
        mirror_axes(1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mirroring_a_flip_equivariant_network_gives_its_own_prediction(spatial_dims):
    """Every mirror image, flipped back, is the prediction itself: an input or an output not flipped, or not flipped
    back, would not average to it (the input is asymmetric along every axis)."""
    predict = pixelwise(spatial_dims)
    image = torch.rand(2, 3, *(5, 6, 7)[3 - spatial_dims:])
    mirrored = MeanPredictor([predict], mirror_axes(spatial_dims))
    assert len(mirrored.flips) == 2 ** spatial_dims
    assert torch.allclose(mirrored(image), predict(image), atol=1e-6)
    forgot_to_flip_back = torch.stack([predict(image.flip(f) if f else image) for f in mirrored.flips]).mean(0)
    assert not torch.allclose(forgot_to_flip_back, predict(image), atol=1e-3)


def test_mirroring_averages_the_predictions_flipped_back_by_hand():
    """A 'network' that ignores its input and predicts a ramp along the columns: flipped back, the two column
    mirrorings are the ramp and its reverse, whose mean is [0.5, 0.25, 0.5]; rows change nothing."""
    ramp = torch.tensor([0.0, 0.25, 1.0])

    def predict(image):
        return ramp.expand(image.shape[0], 1, *image.shape[2:]).clone()

    mean = MeanPredictor([predict], mirror_axes(2))(torch.zeros(1, 1, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.5, 0.25, 0.5]).expand(1, 1, 2, 3))
    assert torch.equal(MeanPredictor([predict], (-2,))(torch.zeros(1, 1, 2, 3)), predict(torch.zeros(1, 1, 2, 3)))


def test_an_ensemble_of_one_is_the_model_itself():
    predict = pixelwise(2)
    image = torch.rand(2, 3, 8, 8)
    assert mean_predictor([predict]) is predict
    assert torch.equal(MeanPredictor([predict])(image), predict(image))


def test_an_ensemble_of_two_is_the_mean_of_their_probabilities_by_hand():
    image = torch.tensor([[[[0.0, 1.0], [0.5, 0.2]]]])
    half = lambda x: 0.5 * x  # [[0, .5], [.25, .1]]
    inverse = lambda x: 1 - x  # [[1, 0], [.5, .8]]
    mean = mean_predictor([half, inverse])(image)
    assert torch.allclose(mean, torch.tensor([[[[0.5, 0.25], [0.375, 0.45]]]]))
    assert torch.allclose(mean_predictor([half, inverse], mirror_axes(2))(image), mean)  # both are pixelwise


def test_outputs_of_the_networks_are_not_changed_in_place():
    kept = []

    def predict(image):
        kept.append(image.sum(1, keepdim=True))
        return kept[-1]

    MeanPredictor([predict, predict])(torch.ones(1, 2, 2, 2))
    assert all(torch.equal(k, torch.full((1, 1, 2, 2), 2.0)) for k in kept)


def test_combined_models_cascades_are_averaged_per_network():
    def cascade(liver_value, lesion_value, channels=3):
        return lambda sample: (lambda x: torch.full_like(x[:, :1], liver_value), channels,
                               lambda x: torch.full_like(x[:, :1], lesion_value), channels)

    liver, liver_channels, lesion, lesion_channels = mean_cascade([cascade(0.2, 0.9), cascade(0.6, 0.3)])({"image": None})
    image = torch.zeros(1, 3, 4, 4)
    assert liver_channels == lesion_channels == 3
    assert torch.allclose(liver(image), torch.full((1, 1, 4, 4), 0.4)) and torch.allclose(lesion(image), torch.full((1, 1, 4, 4), 0.6))
    only = cascade(0.2, 0.9)
    assert mean_cascade([only]) is only


def test_the_cascade_thresholds_the_mean_once():
    """Two liver 'networks' each below the threshold on one half: neither alone finds the whole liver, their mean does
    (the mean is thresholded, not each model's mask)."""
    image = torch.zeros(3, 16, 16)
    left = lambda x: torch.cat([torch.full_like(x[:, :1, :, :8], 0.8), torch.full_like(x[:, :1, :, 8:], 0.3)], -1)
    right = lambda x: left(x).flip(-1)
    args = (lambda box: None, (3, 16, 16))
    alone = predict_volume(left, None, image, *args)["labels"]
    both = predict_volume(mean_predictor([left, right]), None, image, *args)["labels"]
    assert alone.sum() == 3 * 16 * 8 and both.sum() == 3 * 16 * 16


def test_liver_guided_lesion_networks_stay_guided():
    """A combined model's lesion network takes the liver probability as its last channel: averaged, it still does."""
    guided = [LiverGuided(lambda x: x[:, -1:] * 0.5), LiverGuided(lambda x: x[:, -1:])]
    mean = mean_predictor(guided, mirror_axes(2))
    assert isinstance(mean, LiverGuided)
    image = torch.cat([torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])], 1)
    assert torch.allclose(mean(image), torch.tensor([[[[0.15, 0.3], [0.45, 0.6]]]]))
    with pytest.raises(ValueError, match="liver-guided"):
        mean_predictor([guided[0], lambda x: x])
