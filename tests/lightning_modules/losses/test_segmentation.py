"""lightning_modules.losses.segmentation on hand-computed cases, and the seg_loss choice through the modules and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.losses import DiceLoss

from lightning_modules import BaselineUNet, CheckpointError, CMUNet, MaskMining, PretrainedUNet
from lightning_modules.losses.segmentation import (
    EPS,
    SEG_LOSSES,
    PixelWeightedBCE,
    PwceOverDice,
    SmoothDiceScore,
    build_segmentation_loss,
    distance_weight_maps,
    unet_weight_map,
)

TINY = dict(base_channels=4)
UNKNOWN_SEG_LOSS = "unknown segmentation loss 'focal'; choose one of: dice, pwce, pwce_over_dice (--model.init_args.seg_loss)"
LOGIT = {0.25: -math.log(3), 0.5: 0.0, 0.75: math.log(3)}  # sigmoid(LOGIT[p]) == p


def probabilities(*rows):
    """(1, 1, H, W) logits whose sigmoid is ``rows``."""
    return torch.logit(torch.tensor(rows, dtype=torch.float64))[None, None]


def mask(*rows):
    return torch.tensor(rows, dtype=torch.float64)[None, None]


# -- values by hand ------------------------------------------------------------------------------------------
# p = [[0.5, 0.75], [0.25, 0.5]] against t = [[1, 1], [0, 0]]
HAND_LOGITS = probabilities([0.5, 0.75], [0.25, 0.5])
HAND_TARGET = mask([1, 1], [0, 0])
HAND_BCE = (2 * math.log(2) - 2 * math.log(0.75)) / 4  # two pixels at p = 0.5, two at 0.75 on the right side
HAND_DICE_SCORE = (2 * (0.5 + 0.75) + 1e-5) / ((0.5 + 0.75 + 0.25 + 0.5) + 2 + 1e-5)  # MONAI's smooth_nr = smooth_dr = 1e-5


def test_dice_is_one_minus_the_smooth_dice_score():
    loss = build_segmentation_loss("dice")(HAND_LOGITS, HAND_TARGET)
    assert float(loss) == pytest.approx(1 - HAND_DICE_SCORE, rel=1e-9)
    assert float(SmoothDiceScore()(HAND_LOGITS, HAND_TARGET)) == pytest.approx(HAND_DICE_SCORE, rel=1e-9)


def test_pwce_without_weights_is_the_mean_bce():
    loss = build_segmentation_loss("pwce")(HAND_LOGITS, HAND_TARGET)
    assert float(loss) == pytest.approx(HAND_BCE, rel=1e-9)


def test_pwce_over_dice_by_hand():
    loss = build_segmentation_loss("pwce_over_dice")(HAND_LOGITS, HAND_TARGET)
    assert EPS == 1e-5
    assert float(loss) == pytest.approx(HAND_BCE / (HAND_DICE_SCORE + 1e-5), rel=1e-9)


def test_dice_score_averages_channels_pooled_over_the_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 6, generator=generator, dtype=torch.float64)
    target = (torch.rand(3, 2, 5, 6, generator=generator) > 0.6).double()
    p, t = torch.sigmoid(logits).numpy(), target.numpy()
    per_channel = [(2 * (p[:, c] * t[:, c]).sum() + 1e-5) / (p[:, c].sum() + t[:, c].sum() + 1e-5) for c in range(2)]
    assert float(SmoothDiceScore()(logits, target)) == pytest.approx(np.mean(per_channel), rel=1e-9)


def brute_force_weight_map(target: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The U-Net weight map of a slice holding two or more objects, by brute force over every pair of pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(target, structure=np.ones((3, 3)))
    assert n >= 2
    grid = np.stack(np.meshgrid(*map(np.arange, target.shape), indexing="ij"), -1).reshape(-1, 2)
    distances = np.stack([np.sqrt(((grid[:, None] - np.argwhere(labels == k)[None]) ** 2).sum(-1)).min(1) for k in range(1, n + 1)])
    d = np.sort(distances, axis=0)
    return (1 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))).reshape(target.shape)


def two_objects(gap: int, size=(7, 16)) -> np.ndarray:
    target = np.zeros(size, dtype=bool)
    target[2:5, 2:5] = True
    target[2:5, 5 + gap : 8 + gap] = True
    return target


def test_pwce_with_distance_weights_by_hand():
    target_np = two_objects(gap=2)
    weights = brute_force_weight_map(target_np, w0=10.0, sigma=5.0)
    assert np.allclose(distance_weight_maps(torch.from_numpy(target_np)[None, None], 10.0, 5.0)[0, 0].numpy(), weights, atol=1e-5)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, *target_np.shape, generator=generator, dtype=torch.float64)
    target = torch.from_numpy(target_np)[None, None].double()
    p = torch.sigmoid(logits)[0, 0].numpy()
    bce = -(target_np * np.log(p) + (1 - target_np) * np.log(1 - p))
    expected = (weights * bce).sum() / weights.sum()  # normalised by the weights, not the pixel count
    assert float(PixelWeightedBCE(distance_weights=True)(logits, target)) == pytest.approx(expected, rel=1e-5)
    assert float(PwceOverDice(distance_weights=True)(logits, target)) == pytest.approx(
        expected / (float(SmoothDiceScore()(logits, target)) + 1e-5), rel=1e-5)


def test_distance_weights_raise_pixels_between_close_objects():
    close = distance_weight_maps(torch.from_numpy(two_objects(gap=2))[None, None])[0, 0]
    far = distance_weight_maps(torch.from_numpy(two_objects(gap=9))[None, None])[0, 0]
    between, outside = (3, 6), (3, 14)  # in the gap of the close pair / beyond both objects
    assert close[between] > 5 and close[between] > 2 * close[outside] and close[between] > 2 * far[3, 6]
    # the same error costs more between the objects than away from them
    target = torch.from_numpy(two_objects(gap=2))[None, None].double()
    correct = (2 * target - 1) * 6.0
    loss = PixelWeightedBCE(distance_weights=True)
    error_between, error_outside = correct.clone(), correct.clone()
    error_between[..., 3, 6] = 6.0
    error_outside[..., 3, 14] = 6.0
    assert loss(error_between, target) > 2 * loss(error_outside, target)
    plain = PixelWeightedBCE()
    assert float(plain(error_between, target)) == pytest.approx(float(plain(error_outside, target)))


@pytest.mark.parametrize("threads", [1, 2])
def test_distance_weight_maps_per_sample_and_channel(threads):
    generator = torch.Generator().manual_seed(2)
    target = torch.rand(3, 2, 12, 10, generator=generator) > 0.7
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the slices go to a thread pool, in order
    try:
        maps = distance_weight_maps(target, 4.0, 2.0)
    finally:
        torch.set_num_threads(previous)
    assert maps.shape == target.shape and maps.dtype == torch.float32
    for b in range(3):
        for c in range(2):
            assert np.array_equal(maps[b, c].numpy(), unet_weight_map(target[b, c].numpy(), 4.0, 2.0))
    with pytest.raises(ValueError, match="need 2D slices"):
        distance_weight_maps(target[:, 0])  # no channel axis


# -- directions and gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEG_LOSSES)
@pytest.mark.parametrize("distance_weights", [False, True])
def test_a_better_prediction_gives_a_lower_loss(name, distance_weights):
    target = torch.from_numpy(two_objects(gap=2)).double()[None, None].repeat(2, 1, 1, 1)
    target[1] = 0  # an empty slice too
    loss = build_segmentation_loss(name, distance_weights=distance_weights)
    signs = 2 * target - 1
    values = [float(loss(confidence * signs, target)) for confidence in (-2.0, 0.0, 1.0, 3.0)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4


def test_pwce_over_dice_rises_when_the_dice_score_falls_with_pwce_fixed():
    target = mask([1, 1, 0, 0])
    # the same four BCE terms (-log 0.9 three times, -log 0.4 once), the poor pixel moved from background to foreground
    a, b = probabilities([0.9, 0.9, 0.1, 0.6]), probabilities([0.9, 0.4, 0.1, 0.1])
    pwce, score, ratio = PixelWeightedBCE(), SmoothDiceScore(), PwceOverDice()
    assert float(pwce(a, target)) == pytest.approx(float(pwce(b, target)), rel=1e-12)
    assert float(score(a, target)) == pytest.approx(3.6 / 4.5, rel=1e-5) and float(score(b, target)) == pytest.approx(2.6 / 3.5, rel=1e-5)
    assert float(ratio(b, target)) > float(ratio(a, target))
    assert float(ratio(b, target)) / float(ratio(a, target)) == pytest.approx((3.6 / 4.5) / (2.6 / 3.5), rel=1e-4)


@pytest.mark.parametrize("name", SEG_LOSSES)
@pytest.mark.parametrize("distance_weights", [False, True])
def test_gradients_flow(name, distance_weights):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 16, 16, generator=generator, requires_grad=True)
    target = (torch.rand(2, 2, 16, 16, generator=generator) > 0.5).float()
    build_segmentation_loss(name, distance_weights=distance_weights)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match=r"unknown segmentation loss 'focal'; choose one of: dice, pwce, pwce_over_dice"):
        build_segmentation_loss("focal")


# -- through the modules ---------------------------------------------------------------------------------------
def batch(n=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, 1, size, size)
    target[::2, :, 8:20, 10:22] = 1
    return {"image": torch.randn(n, 1, size, size, generator=generator) + 2 * target, "mask": target, "label": target.flatten(1).amax(1)}


@pytest.mark.parametrize("name", SEG_LOSSES)
def test_every_segmentation_module_trains_with_the_chosen_loss(name):
    data = batch()
    options = dict(seg_loss=name, distance_weights=True, distance_w0=3.0, distance_sigma=2.0)
    reference = build_segmentation_loss(name, distance_weights=True, w0=3.0, sigma=2.0)
    for cls in (BaselineUNet, PretrainedUNet, CMUNet):
        torch.manual_seed(0)
        module = cls(**TINY, **options)
        outputs = module(data["image"])
        losses = module.compute_losses(outputs, data)
        seg = reference(outputs["seg"], data["mask"])
        if cls is CMUNet:  # the segmentation term is logged under the loss's name; the focal term is unchanged
            assert set(losses) == {"loss", name, "focal"} and torch.allclose(losses[name], seg)
            assert torch.allclose(losses["loss"], 0.5 * seg + 0.5 * losses["focal"])
        else:
            assert set(losses) == {"loss"} and torch.allclose(losses["loss"], seg)
        losses["loss"].backward()
        assert all(p.grad is not None for p in module.model.decoder.parameters())


def test_the_default_is_the_original_dice_loss():
    data = batch()
    module = BaselineUNet(**TINY)
    assert isinstance(module.segmentation_loss, DiceLoss)
    outputs = module(data["image"])
    assert torch.equal(module.compute_losses(outputs, data)["loss"], DiceLoss(sigmoid=True, batch=True)(outputs["seg"], data["mask"]))
    assert not list(module.segmentation_loss.parameters()) and not list(module.segmentation_loss.buffers())


def test_mask_mining_trains_its_error_head_with_its_own_loss(tmp_path):
    base = tmp_path / "base.ckpt"
    unet = BaselineUNet(**TINY)
    torch.save({"state_dict": unet.state_dict(), "hyper_parameters": dict(unet.hparams)}, base)
    mined = MaskMining(base_checkpoint=str(base), loss="pwce", distance_weights=True, distance_w0=3.0)
    assert not hasattr(mined, "segmentation_loss")  # seg_loss is not used
    assert mined.error_loss.distance_weights and mined.error_loss.w0 == 3.0  # the distance settings weight its pwce


@pytest.mark.parametrize("cls", [BaselineUNet, CMUNet, MaskMining])
def test_unknown_seg_loss_fails_in_one_line(cls):
    with pytest.raises(CheckpointError) as error:
        cls(seg_loss="focal", **({} if cls is MaskMining else TINY))
    assert str(error.value) == UNKNOWN_SEG_LOSS


# -- through the CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BaselineUNet, CMUNet])
def test_seg_loss_reaches_the_module_through_the_cli(cls, tmp_path):
    from experiments.commands.cli import LitsCLI

    common = ["--model.init_args.base_channels=4", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = LitsCLI(args=[f"--model=lightning_modules.{cls.__name__}", "--model.init_args.seg_loss=pwce_over_dice", *common], run=False)
    assert type(cli.model) is cls and cli.model.hparams.seg_loss == "pwce_over_dice"
    assert isinstance(cli.model.segmentation_loss, PwceOverDice)
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": f"lightning_modules.{cls.__name__}",
                                                "init_args": {"seg_loss": "pwce", "distance_weights": True, "distance_sigma": 3.0}}}))
    cli = LitsCLI(args=["--config", str(config), *common], run=False)
    loss = cli.model.segmentation_loss
    assert isinstance(loss, PixelWeightedBCE) and loss.distance_weights and (loss.w0, loss.sigma) == (10.0, 3.0)


@pytest.mark.parametrize("model", ["BaselineUNet", "CMUNet"])
def test_unknown_seg_loss_is_one_line_through_the_cli(model, tmp_path, capsys, monkeypatch):
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        main(["fit", f"--model=lightning_modules.{model}", "--model.init_args.seg_loss=focal", "--trainer.logger=false"])
    assert exit_code.value.code == 2 and capsys.readouterr().err.strip() == f"lits: error: {UNKNOWN_SEG_LOSS}"  # no traceback


def test_bce_matches_torch():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 8, 8, generator=generator)
    target = (torch.rand(2, 2, 8, 8, generator=generator) > 0.5).float()
    assert torch.allclose(PixelWeightedBCE()(logits, target), F.binary_cross_entropy_with_logits(logits, target))
