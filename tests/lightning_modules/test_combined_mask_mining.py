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


def batch_of() -> dict:
    """Whole 32 px slices of 64 px volumes (liver scale 0.5), a 32 px crop on three of them."""
    mask = torch.zeros(3, 2, 32, 32)
    mask[:2, 0, 4:28, 4:28] = 1
    crop_mask = torch.zeros(3, 2, 32, 32)
    crop_mask[:2, 0, 4:28, 4:28] = 1
    crop_mask[:2, 1, 12:20, 12:20] = 1
    return {"image": torch.randn(3, 1, 32, 32), "mask": mask, "crop_image": torch.randn(3, 1, 32, 32), "crop_mask": crop_mask,
            "crop_origin": torch.tensor([[8, 8], [30, 0], [0, 0]]), "crop_valid": torch.tensor([1.0, 1.0, 0.0]),
            "full_size": torch.tensor([[64, 64]] * 3)}


def joint(model, batch):
    liver = model(batch["image"])
    return {"liver": liver, "lesion": model.lesion_outputs(batch, liver)}


@pytest.mark.parametrize("loss", ["dice", "pwce"])
def test_decoded_masks_are_the_base_combined_models_before_retraining(base, loss):
    model, path = base
    mined = CombinedMaskMining(base_checkpoint=path, loss=loss).eval()
    torch.manual_seed(1)
    batch = batch_of()
    with torch.no_grad():
        outputs, reference = joint(mined, batch), joint(model, batch)
        assert outputs["liver"]["errors"].shape == (3, 4, 32, 32) and outputs["lesion"]["errors"].shape == (2, 4, 32, 32)
        for part in ("liver", "lesion"):
            probability, base_probability = mined.foreground_probability(outputs[part]), torch.sigmoid(reference[part]["seg"])
            # The error head's TP channel is the segmentation head's 1x1 conv computed inside a 4-channel conv: the same
            # sums, but the kernel may add them in another order (it does with one thread), so equal to float rounding.
            decided = (base_probability - 0.5).abs() > 1e-4
            assert torch.equal((probability >= 0.5)[decided], (base_probability >= 0.5)[decided]), part
        torch.testing.assert_close(outputs["lesion"]["seg"], reference["lesion"]["seg"], rtol=1e-5, atol=1e-5)  # the same liver guide
        # the cascade's predictors (liver on resized slices, the guided lesion network on the region) keep the base's masks too
        sample = {"image": torch.rand(4, 32, 32), "full_shape": torch.tensor([4, 64, 64])}
        inputs = (batch["image"], torch.cat([batch["crop_image"], torch.rand(3, 1, 32, 32)], dim=1))
        for own, theirs, image in zip(mined.cascade_networks(sample)[::2], model.cascade_networks(sample)[::2], inputs):
            ours, reference_probability = own(image), theirs(image)
            decided = (reference_probability - 0.5).abs() > 1e-4
            assert torch.equal((ours >= 0.5)[decided], (reference_probability >= 0.5)[decided])
    assert torch.equal(mined._base[0].model.segmentation_head.weight, model.model.segmentation_head.weight)
    new = sum(p.numel() for net in (mined.liver_model, mined.model) for p in net.error_head.parameters())
    assert new == 2 * (4 * 4 + 4) and sum(p.numel() for p in mined.parameters()) - new == sum(p.numel() for p in model.parameters())


def test_the_liver_part_is_mined_on_whole_slices_then_the_lesion_part_on_guided_crops(base):
    model, path = base
    mined = CombinedMaskMining(base_checkpoint=path)
    torch.manual_seed(2)
    batch = batch_of()
    with torch.no_grad():
        liver = model(batch["image"])
        predicted_liver = torch.sigmoid(liver["seg"]) >= 0.5
        predicted_lesion = torch.sigmoid(model.lesion_outputs(batch, liver)["seg"]) >= 0.5
    batch = mined.mine(batch, training=True)
    # the liver network's errors at its own scale and field of view: every whole slice, the liver-free one too
    assert batch["liver_errors"].shape == (3, 32, 32)
    assert torch.equal(batch["liver_errors"], error_mask(predicted_liver, batch["mask"][:, :1] > 0.5))
    assert len(batch["liver_errors"].unique()) == 4
    assert torch.equal(batch["lesion_errors"], error_mask(predicted_lesion, batch["crop_mask"][:2, 1:] > 0.5))
    # the liver error head learns from the liver errors
    losses = mined.compute_losses(joint(mined, batch), batch)
    losses["liver_loss"].backward()
    assert mined.liver_model.error_head.weight.grad.abs().sum() > 0
    batch["liver_errors"] = torch.full_like(batch["liver_errors"], 3)
    assert not torch.isclose(mined.compute_losses(joint(mined, batch), batch)["liver_loss"], losses["liver_loss"])


@pytest.mark.parametrize("loss", ["dice", "pwce"])
def test_loss_weighs_the_liver_and_lesion_error_losses(base, loss):
    _, path = base
    mined = CombinedMaskMining(base_checkpoint=path, loss=loss, liver_weight=0.3, lesion_weight=2.0, distance_weights=loss == "pwce")
    batch = mined.mine(batch_of(), training=True)
    outputs = joint(mined, batch)
    losses = mined.compute_losses(outputs, batch)
    assert set(losses) == {"loss", "liver_loss", "lesion_loss"}
    assert torch.allclose(losses["loss"], 0.3 * losses["liver_loss"] + 2.0 * losses["lesion_loss"])
    reference = build_error_loss(loss, **({"distance_weights": True} if loss == "pwce" else {}))
    assert torch.allclose(losses["lesion_loss"], reference(outputs["lesion"]["errors"], batch["lesion_errors"], batch["crop_mask"][:2, 1:]))
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
        (dict(base_checkpoint=path, base_liver_checkpoint=path), "mined by its own base"),
        (dict(base_checkpoint=path, cls_weight=0.5), "no classification head"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            CombinedMaskMining(**kwargs)
        assert "\n" not in str(error.value)
