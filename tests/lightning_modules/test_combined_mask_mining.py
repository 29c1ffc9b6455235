"""CombinedMaskMining: both networks keep the base combined model exactly before retraining, mining gives liver and
lesion error masks, the loss weighs the two, bad bases fail in one line."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules import BaselineUNet, CheckpointError, CombinedLiverLesion, CombinedMaskMining
from lightning_modules.losses.error_masks import build_error_loss, error_mask

TINY = dict(base_channels=4)


def save(module, path, target="both"):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"target": target},
                "pytorch-lightning_version": pl.__version__}, path)
    return str(path)


@pytest.fixture
def base(tmp_path):
    """A combined model whose weights are not the initial ones (logits of both signs everywhere)."""
    torch.manual_seed(0)
    model = CombinedLiverLesion(**TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval(), save(model, tmp_path / "combined.ckpt")


@pytest.mark.parametrize("loss", ["dice", "pwce"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_decoded_masks_are_the_base_combined_models_before_retraining(base, loss, scale):
    model, path = base
    mined = CombinedMaskMining(base_checkpoint=path, loss=loss).eval()
    model.liver_scale = mined.liver_scale = scale
    image = torch.randn(3, 1, 64, 64)  # seen at 32 x 32 by the liver network at scale 0.5
    with torch.no_grad():
        outputs, reference = mined(image), model(image)
        assert outputs["errors"].shape == (3, 8, 64, 64) and outputs["seg"].shape == (3, 2, 64, 64)
        probability = mined.foreground_probability(outputs)
        assert probability.shape == (3, 2, 64, 64)
        # The error head's TP channel is the segmentation head's 1x1 conv computed inside a 4-channel conv: the same
        # sums, but the kernel may add them in another order (it does with one thread), so equal to float rounding.
        decided = (torch.sigmoid(reference["seg"]) - 0.5).abs() > 1e-4
        assert torch.equal((probability >= 0.5)[decided], (torch.sigmoid(reference["seg"]) >= 0.5)[decided])  # liver and lesion masks
        torch.testing.assert_close(outputs["seg"], reference["seg"], rtol=1e-5, atol=1e-5)  # the lesion network saw the same liver probability
        # the cascade's predictors (liver on resized slices, both networks on the region) keep the base's masks too
        sample = {"image": torch.rand(4, 32, 32), "full_shape": torch.tensor([4, 64, 64])}  # liver scale 0.5 on regions
        for own, theirs in zip(mined.cascade_networks(sample)[::2], model.cascade_networks(sample)[::2]):
            ours, reference_probability = own(image), theirs(image)
            decided = (reference_probability - 0.5).abs() > 1e-4
            assert torch.equal((ours >= 0.5)[decided], (reference_probability >= 0.5)[decided])
    assert torch.equal(mined._base[0].model.segmentation_head.weight, model.model.segmentation_head.weight)
    new = sum(p.numel() for net in (mined.liver_model, mined.model) for p in net.error_head.parameters())
    assert new == 2 * (4 * 4 + 4) and sum(p.numel() for p in mined.parameters()) - new == sum(p.numel() for p in model.parameters())


def test_mining_gives_a_liver_and_a_lesion_error_mask(base):
    model, path = base
    mined = CombinedMaskMining(base_checkpoint=path)
    mined.liver_scale = model.liver_scale = 0.5  # the base mines at the batch's liver resolution
    image, mask = torch.randn(2, 1, 64, 64), torch.zeros(2, 2, 64, 64)
    mask[:, 0, 8:56, 8:56] = 1
    mask[:, 1, 24:40, 24:40] = 1
    with torch.no_grad():
        predicted = torch.sigmoid(model(image)["seg"]) >= 0.5
    batch = mined.mine({"image": image, "mask": mask}, training=True)
    assert batch["errors"].shape == (2, 2, 64, 64)
    for channel in (0, 1):
        expected = error_mask(predicted[:, channel : channel + 1], mask[:, channel : channel + 1])
        assert torch.equal(batch["errors"][:, channel], expected)
    assert len(batch["errors"][:, 0].unique()) == 4 and len(batch["errors"][:, 1].unique()) >= 2


@pytest.mark.parametrize("loss", ["dice", "pwce"])
def test_loss_weighs_the_liver_and_lesion_error_losses(base, loss):
    _, path = base
    mined = CombinedMaskMining(base_checkpoint=path, loss=loss, liver_weight=0.3, lesion_weight=2.0, distance_weights=loss == "pwce")
    image, mask = torch.randn(2, 1, 32, 32), torch.zeros(2, 2, 32, 32)
    mask[:, 0, 4:28, 4:28] = 1
    mask[:, 1, 12:20, 12:20] = 1
    batch = mined.mine({"image": image, "mask": mask}, training=True)
    outputs = mined(image)
    losses = mined.compute_losses(outputs, batch)
    assert set(losses) == {"loss", "liver_loss", "lesion_loss"}
    assert torch.allclose(losses["loss"], 0.3 * losses["liver_loss"] + 2.0 * losses["lesion_loss"])
    reference = build_error_loss(loss, **({"distance_weights": True} if loss == "pwce" else {}))
    assert torch.allclose(losses["lesion_loss"], reference(outputs["errors"][:, 4:], batch["errors"][:, 1], mask[:, 1:]))
    losses["loss"].backward()
    assert mined.liver_model.error_head.weight.grad.abs().sum() > 0 and mined.model.error_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mined._base[0].parameters())  # the frozen base does not train


def test_checkpoints_are_told_apart_and_rebuilt(base, tmp_path):
    _, path = base
    mined = CombinedMaskMining(base_checkpoint=path, loss="pwce", lr=0.5)
    assert (mined.hparams.lr, mined.hparams.weight_decay, mined.hparams.scheduler, mined.hparams.step_size) == (0.5, 1e-5, "step", 10)
    with torch.no_grad():
        mined.liver_model.error_head.weight.normal_()  # as if retrained
    saved = save(mined, tmp_path / "mined.ckpt")
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert "liver_model.error_head.weight" in state and not any(k.startswith("_base") for k in state)
    restored = CombinedMaskMining.load_from_checkpoint(saved)
    assert torch.equal(restored.liver_model.error_head.weight, mined.liver_model.error_head.weight)
    assert restored.monitor == ("val/lesion/dice", "max") and restored.output_channels == 2


def test_bad_bases_and_settings_fail_in_one_line(tmp_path, base):
    _, path = base
    mined = save(CombinedMaskMining(base_checkpoint=path), tmp_path / "mined.ckpt")
    cases = [
        (dict(base_checkpoint=save(BaselineUNet(**TINY), tmp_path / "unet.ckpt", "liver")), "is not a combined model"),
        (dict(base_checkpoint=str(tmp_path / "absent.ckpt")), "does not exist"),
        (dict(base_checkpoint=mined), "is already mask-mined"),
        (dict(base_checkpoint=path, in_channels=3), "in_channels=1 but this run has in_channels=3"),
        (dict(base_checkpoint=path, loss="focal"), "unknown mask-mining loss 'focal'"),
        (dict(base_checkpoint=path, miner_checkpoints=[path]), "mined by its own base"),
        (dict(base_checkpoint=path, cls_weight=0.5), "no classification head"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            CombinedMaskMining(**kwargs)
        assert "\n" not in str(error.value)
