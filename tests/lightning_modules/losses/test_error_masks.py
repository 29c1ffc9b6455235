"""Tests of lightning_modules.losses.error_masks on hand-made masks and hand-computed losses."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses.error_masks import (
    FN,
    FP,
    TN,
    TP,
    MulticlassErrorDice,
    PixelWeightedCrossEntropy,
    build_error_loss,
    decode_argmax,
    decode_tp_channel,
    dice_targets,
    error_class_counts,
    error_mask,
    error_head_probability,
)
from lightning_modules.losses.segmentation import unet_weight_map

# Every error class present: TN 6, FP 4, FN 3, TP 3.
TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()[None, None]
PREDICTION = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()[None, None]
EXPECTED_ERRORS = torch.tensor([[[TN, FP, FN, TP], [TN, FP, FN, TP], [FP, FP, TN, TN], [TP, FN, TN, TN]]])


def test_error_mask_hand_made():
    errors = error_mask(PREDICTION, TARGET)
    assert errors.dtype == torch.long and errors.shape == (1, 4, 4)
    assert torch.equal(errors, EXPECTED_ERRORS)
    # {0, 1} floats give the same classes as bools
    assert torch.equal(error_mask(PREDICTION.float(), TARGET.float()), EXPECTED_ERRORS)


def test_error_mask_3d():
    prediction = torch.tensor([[[0, 1], [0, 1]], [[1, 1], [0, 0]]])[None, None]  # (1, 1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [1, 1]], [[1, 0], [0, 1]]])[None, None]
    expected = torch.tensor([[[[TN, FP], [FN, TP]], [[TP, FP], [TN, FN]]]])
    assert torch.equal(error_mask(prediction, target), expected)


def test_error_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        error_mask(PREDICTION, TARGET[..., :3])
    with pytest.raises(ValueError, match="one channel"):
        error_mask(PREDICTION.expand(1, 2, 4, 4), TARGET.expand(1, 2, 4, 4))


def test_decode_argmax_hand_made():
    # pixels 0..3: class 0..3 wins; pixel 4: TN ties FN -> background (argmax takes the first index)
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5], [1, 0, 1, 0]]).T[None, :, None]
    assert torch.equal(decode_argmax(logits), torch.tensor([False, False, True, True, False])[None, None, None])


def test_one_hot_errors_decode_to_target():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.rand(3, 1, 8, 8, generator=generator) > 0.5
    target = torch.rand(3, 1, 8, 8, generator=generator) > 0.5
    logits = F.one_hot(error_mask(prediction, target), 4).movedim(-1, 1).float()
    assert torch.equal(decode_argmax(logits), target)


def test_dice_targets_hand_made():
    targets = dice_targets(EXPECTED_ERRORS, TARGET)
    assert targets.shape == (1, 4, 4, 4) and targets.dtype == torch.float32
    assert torch.equal(targets[:, TP], TARGET[:, 0].float())
    for cls in (TN, FP, FN):
        assert torch.equal(targets[:, cls], (EXPECTED_ERRORS == cls).float())
    # TP channel is FN | TP, not the TP one-hot
    assert targets[0, TP, 1, 2] == 1 and targets[0, FN, 1, 2] == 1


def random_logits_with_ties() -> torch.Tensor:
    """(1000, 4, 1, 1): half small integers (many exact ties), half continuous, plus near-ties and zeros."""
    generator = torch.Generator().manual_seed(1)
    integers = torch.randint(-2, 3, (500, 4), generator=generator).float()
    continuous = torch.randn(490, 4, generator=generator) * 3
    below_one = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    near_ties = torch.tensor([[1.0, 0, below_one, 0], [0, below_one, 0, 1.0], [0, 0, 0, -1e-9], [0, 0, 0, 1e-9]] * 2 +
                             [[0.0, 0, 0, 0], [-1e-30, 0, 0, 0]])
    return torch.cat([integers, continuous, near_ties])[:, :, None, None]


def test_error_head_probability_thresholds_like_decoding():
    logits = random_logits_with_ties()
    for loss, decoded in (("pwce", decode_argmax(logits)), ("dice", decode_tp_channel(logits))):
        probability = error_head_probability(logits, loss)
        assert probability.shape == (1000, 1, 1, 1)
        assert ((probability >= 0) & (probability <= 1)).all()
        assert torch.equal(probability >= 0.5, decoded), loss
    assert 0 < decode_argmax(logits).float().mean() < 1  # both outcomes occur


def test_error_head_probability_pwce_follows_argmax_not_summed_probability():
    logits = torch.log(torch.tensor([0.3, 0.3, 0.4, 1e-6]))[None, :, None, None]
    assert decode_argmax(logits).item()
    assert error_head_probability(logits, "pwce").item() == pytest.approx(0.4 / 0.7, rel=1e-5)
    with pytest.raises(ValueError, match="unknown mask-mining loss"):
        error_head_probability(logits, "bce")


def test_pwce_without_weights_is_cross_entropy():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, 5, generator=generator)
    errors = torch.randint(0, 4, (2, 5, 5), generator=generator)
    target = (errors // 2)[:, None].bool()
    loss = PixelWeightedCrossEntropy()(logits, errors, target)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, errors).item(), rel=1e-6)


def test_pwce_class_weights_hand_computed():
    # pixel A: class TN, uniform logits -> ce = ln 4; pixel B: class TP, softmax p(TP) = 5/8 -> ce = ln(8/5)
    logits = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, math.log(5)]]).T[None, :, None]  # (1, 4, 1, 2)
    errors = torch.tensor([[[TN, TP]]])
    target = torch.tensor([[[[0, 1]]]])
    weighted = PixelWeightedCrossEntropy(class_weights=[1, 1, 1, 3])(logits, errors, target)
    assert weighted.item() == pytest.approx((math.log(4) + 3 * math.log(1.6)) / 4, rel=1e-6)
    plain = PixelWeightedCrossEntropy()(logits, errors, target)
    assert plain.item() == pytest.approx((math.log(4) + math.log(1.6)) / 2, rel=1e-6)


@pytest.mark.parametrize("class_weights", [[1, 1, 1], [1, -1, 1, 1], [1, 1, float("nan"), 1]])
def test_pwce_rejects_invalid_class_weights(class_weights):
    with pytest.raises(ValueError, match="class_weights"):
        PixelWeightedCrossEntropy(class_weights=class_weights)


def two_close_squares() -> np.ndarray:
    """32x32, two 8x8 squares in rows 4..11, columns 4..11 and 14..21: a 2-pixel gap (columns 12, 13)."""
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:12, 4:12] = True
    mask[4:12, 14:22] = True
    return mask


def test_unet_weight_map_peaks_between_close_objects():
    weights = unet_weight_map(two_close_squares())
    assert weights.shape == (32, 32) and weights.dtype == np.float32
    # boundary column 11 (d1 = 0, d2 = 3) and gap columns 12, 13 (d1 = 1, d2 = 2): d1 + d2 = 3
    peak = 1 + 10 * math.exp(-9 / 50)
    for column in (11, 12, 13, 14):
        assert weights[8, column] == pytest.approx(peak, rel=1e-6)
    assert weights.max() == pytest.approx(peak, rel=1e-6)
    assert weights[31, 31] == pytest.approx(1.0, abs=1e-6)  # far away: w_c


def test_unet_weight_map_single_object_border_variant():
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:20, 10:20] = True
    weights = unet_weight_map(mask, w0=10.0, sigma=5.0)
    assert weights[10, 15] == pytest.approx(11.0)  # on the boundary
    assert weights[7, 15] == pytest.approx(1 + 10 * math.exp(-9 / 50), rel=1e-6)  # 3 px outside
    assert weights.max() == pytest.approx(11.0)
    # 12 px from the square's corner (19, 19) in both directions
    assert weights[31, 31] == pytest.approx(1 + 10 * math.exp(-(12**2 + 12**2) / 50), rel=1e-6)
    # the image edge is no object boundary: an object touching it peaks only at its inner boundary
    edge = np.zeros((32, 32), dtype=bool)
    edge[0:10, 10:20] = True
    assert unet_weight_map(edge)[0, 15] == pytest.approx(1 + 10 * math.exp(-16 / 50), rel=1e-6)  # 4 px from column 19
    assert np.array_equal(unet_weight_map(np.ones((5, 5))), np.ones((5, 5), dtype=np.float32))  # no boundary at all
    # (background, foreground) class weights shift the foreground by the difference only
    balanced = unet_weight_map(mask, class_weights=(1.0, 3.0))
    np.testing.assert_allclose(balanced - weights, 2.0 * mask, atol=1e-5)


def test_unet_weight_map_empty_is_ones():
    weights = unet_weight_map(np.zeros((6, 7)))
    assert weights.shape == (6, 7) and weights.dtype == np.float32
    assert np.array_equal(weights, np.ones((6, 7), dtype=np.float32))


def test_pwce_distance_weights_use_the_weight_map():
    target = torch.from_numpy(two_close_squares())[None, None].expand(2, 1, 32, 32)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 32, 32, generator=generator)
    errors = error_mask(torch.rand(2, 1, 32, 32, generator=generator) > 0.5, target)
    loss = PixelWeightedCrossEntropy(class_weights=[1, 2, 3, 4], distance_weights=True)(logits, errors, target)
    weights = torch.tensor([1.0, 2, 3, 4])[errors] * torch.from_numpy(unet_weight_map(two_close_squares()))
    ce = F.cross_entropy(logits, errors, reduction="none")
    assert loss.item() == pytest.approx(((weights * ce).sum() / weights.sum()).item(), rel=1e-5)
    without_map = PixelWeightedCrossEntropy([1, 2, 3, 4])(logits, errors, target)
    assert loss.item() != pytest.approx(without_map.item(), rel=1e-3)


def test_pwce_3d_without_distance_weights():
    logits = torch.randn(1, 4, 2, 3, 3)
    errors = torch.randint(0, 4, (1, 2, 3, 3))
    loss = PixelWeightedCrossEntropy()(logits, errors, (errors // 2)[:, None])
    assert loss.item() == pytest.approx(F.cross_entropy(logits, errors).item(), rel=1e-6)


def test_multiclass_error_dice():
    targets = dice_targets(EXPECTED_ERRORS, TARGET)
    dice = MulticlassErrorDice()
    perfect = dice(20 * (2 * targets - 1), EXPECTED_ERRORS, TARGET)
    wrong = dice(-20 * (2 * targets - 1), EXPECTED_ERRORS, TARGET)
    assert perfect.item() < 1e-3
    assert wrong.item() > 0.9
    logits = torch.randn(1, 4, 4, 4, requires_grad=True)
    dice(logits, EXPECTED_ERRORS, TARGET).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_error_class_counts_hand_made():
    assert error_class_counts(PREDICTION, TARGET) == {"TN": 6, "FP": 4, "FN": 3, "TP": 3}


def test_build_error_loss():
    assert isinstance(build_error_loss("dice"), MulticlassErrorDice)
    pwce = build_error_loss("pwce", class_weights=[1, 2, 3, 4])
    assert isinstance(pwce, PixelWeightedCrossEntropy) and pwce.class_weights.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=re.escape("unknown mask-mining loss 'x'; choose one of: dice, pwce")):
        build_error_loss("x")
