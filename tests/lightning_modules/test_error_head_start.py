"""Mask mining's start state read off the weights (not through the decoded mask, which cannot see it): the error head's
TP channel is the base's segmentation head, TN its negation, FP and FN zero, every other weight the base's."""

from __future__ import annotations

import pytest
import torch

from lightning_modules import BaselineUNet, MaskMining
from lightning_modules.losses.error_masks import FN, FP, TN, TP
from lightning_modules.mask_mining import load_with_error_head
from lightning_modules.networks.unet import UNet


def randomised(model: UNet) -> UNet:
    """The heads drawn at random, biases included (a fresh conv's small biases could hide a sign); the other weights
    keep their own initialisation, which differs from model to model."""
    with torch.no_grad():
        for head in (model.segmentation_head, model.error_head):
            for parameter in head.parameters() if head is not None else ():
                parameter.normal_()
    return model


def check_start_state(mined: UNet, base: UNet) -> None:
    head, errors = base.segmentation_head, mined.error_head
    assert errors.weight.shape == (4, *head.weight.shape[1:]) and errors.bias.shape == (4,)
    assert torch.equal(errors.weight[TP], head.weight[0]) and torch.equal(errors.bias[TP], head.bias[0])
    assert torch.equal(errors.weight[TN], -head.weight[0]) and torch.equal(errors.bias[TN], -head.bias[0])
    for channel in (FP, FN):
        assert not errors.weight[channel].any() and errors.bias[channel].item() == 0.0
    base_state = base.state_dict()
    for name, value in mined.state_dict().items():
        if not name.startswith("error_head."):
            assert torch.equal(value, base_state[name]), name


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_error_head_starts_as_the_segmentation_head(spatial_dims):
    torch.manual_seed(spatial_dims)
    variant = dict(base_channels=4, spatial_dims=spatial_dims)
    base = randomised(UNet(**variant))
    mined = randomised(UNet(**variant, num_error_classes=4))  # the error head's own draw must be overwritten
    load_with_error_head(mined, base.state_dict())
    check_start_state(mined, base)
    # and the logits follow: TN = -seg, FP = FN = 0, TP = seg, at every pixel
    image = torch.randn(2, 1, *(16, 32) if spatial_dims == 2 else (16, 16, 32))
    with torch.no_grad():
        seg, logits = base(image)["seg"][:, 0], mined(image)["errors"]
    # (a 4-channel 1x1 conv may sum in another order than the 1-channel head: equal up to float rounding)
    torch.testing.assert_close(logits[:, TP], seg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, TN], -seg, rtol=1e-5, atol=1e-5)
    assert not logits[:, FP].any() and not logits[:, FN].any()


def test_a_base_with_an_error_head_keeps_its_own():
    torch.manual_seed(0)
    earlier_round = randomised(UNet(base_channels=4, num_error_classes=4))
    mined = UNet(base_channels=4, num_error_classes=4)
    load_with_error_head(mined, earlier_round.state_dict())
    assert torch.equal(mined.error_head.weight, earlier_round.error_head.weight)
    assert torch.equal(mined.error_head.bias, earlier_round.error_head.bias)


def test_mask_mining_builds_that_start_state_from_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    base = BaselineUNet(base_channels=4)
    randomised(base.model)
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": base.state_dict(), "hyper_parameters": dict(base.hparams),
                "datamodule_hyper_parameters": {"target": "liver"}}, path)
    check_start_state(MaskMining(base_checkpoint=str(path)).model, base.model)
