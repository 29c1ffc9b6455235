"""MaskMining: the appended error channels keep the base exactly, bad bases fail in one line, losses decompose, cross-mining folds."""

from types import SimpleNamespace

import pytest
import torch

from datamodules import DataError, LiTSDataModule
from lightning_modules import BaselineUNet, CheckpointError, CMUNet, EncoderPretraining, MaskMining
from lightning_modules.losses.error_masks import FN, FP, LOSSES, TN, TP, decode_argmax
from lightning_modules.losses.error_masks import error_head_probability

TINY = dict(base_channels=4)


def save(module, path, target="liver"):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"target": target}}, path)
    return str(path)


@pytest.fixture
def base_ckpt(tmp_path):
    torch.manual_seed(0)
    return save(BaselineUNet(), tmp_path / "base.ckpt")


# Every backbone variant: the paper's network at full width on 64 x 64 slices, the others tiny (base_channels 4;
# 16 x 32 slices, 16 x 16 x 32 volumes: the deepest features keep more than one element for instance norm).
DEFAULT_VARIANT = dict(spatial_dims=2, block="plain", se=False)
VARIANTS = [dict(spatial_dims=d, block=b, se=s) for d in (2, 3) for b in ("plain", "residual", "dense") for s in (False, True)]


def variant_id(variant: dict) -> str:
    return f"{variant['spatial_dims']}d-{variant['block']}{'-se' if variant['se'] else ''}"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_appended_channels_keep_the_base_output_exactly(tmp_path, request, variant):
    if variant == DEFAULT_VARIANT:
        path, width, spatial = request.getfixturevalue("base_ckpt"), 16, (64, 64)
    else:
        torch.manual_seed(0)
        path, width = save(BaselineUNet(**TINY, **variant), tmp_path / "variant.ckpt"), TINY["base_channels"]
        spatial = (16, 16, 32) if variant["spatial_dims"] == 3 else (16, 32)
    base = BaselineUNet(base_channels=width, **variant)
    base.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    mined = MaskMining(base_checkpoint=path, **variant)
    image = torch.randn(3, 1, *spatial)
    with torch.no_grad():
        outputs, reference = mined(image), base(image)
    assert torch.equal(outputs["seg"], reference["seg"])  # the original output, bit for bit
    assert outputs["errors"].shape == (3, 4, *spatial)
    # the appended channels start as the base's decision (whatever the loss that will retrain them), so the mask
    # decoded as either loss decodes it (MaskMining.foreground_probability) is the base's mask
    for loss in LOSSES:
        assert torch.equal(error_head_probability(outputs["errors"], loss) >= 0.5, torch.sigmoid(reference["seg"]) >= 0.5)
    assert torch.equal(mined.foreground_probability(outputs), error_head_probability(outputs["errors"], mined.hparams.loss))
    new = sum(p.numel() for p in mined.model.error_head.parameters())
    total = sum(p.numel() for p in mined.model.parameters())
    assert new == 4 * width + 4 and new / total < 0.001
    assert sum(p.numel() for p in base.parameters()) == total - new  # every other weight is the base's


def test_a_mined_model_is_a_base_for_the_next_round(tmp_path, base_ckpt):
    first = MaskMining(base_checkpoint=base_ckpt, loss="pwce")
    with torch.no_grad():
        first.model.error_head.weight.normal_()  # as if retrained
    second = MaskMining(base_checkpoint=save(first, tmp_path / "round1.ckpt"), loss="dice")
    assert second.base_architecture.has_error_head and second.base_architecture.loss == "pwce"
    image = torch.randn(2, 1, 32, 32)
    batch = {"image": image, "mask": torch.zeros(2, 1, 32, 32)}
    second.mine(batch, training=False)
    with torch.no_grad():  # round 2 mines with round 1's final mask (its error head, argmax // 2), not its old seg head
        expected = decode_argmax(first(image)["errors"])
    assert torch.equal(batch["base_probs"] >= 0.5, expected)
    assert torch.equal(batch["errors"], expected[:, 0].long())  # empty truth: the predicted pixels are FP = 1
    assert torch.equal(second.model.error_head.weight, first.model.error_head.weight)


def test_mining_builds_errors_against_the_truth(base_ckpt):
    mined = MaskMining(base_checkpoint=base_ckpt)
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        predicted = torch.sigmoid(mined._base[0](image)["seg"]) >= 0.5
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    batch = mined.mine({"image": image, "mask": mask}, training=True)
    truth = mask[:, 0] > 0.5
    pred = predicted[:, 0]
    assert torch.equal(batch["errors"] == TP, truth & pred) and torch.equal(batch["errors"] == FN, truth & ~pred)
    assert torch.equal(batch["errors"] == FP, ~truth & pred) and torch.equal(batch["errors"] == TN, ~truth & ~pred)
    assert "base_probs" not in batch


def test_joint_loss_with_the_classification_head_kept(tmp_path):
    cmunet = save(CMUNet(**TINY), tmp_path / "cmunet.ckpt")
    mined = MaskMining(base_checkpoint=cmunet, loss="dice", cls_weight=0.3)
    image, mask = torch.randn(4, 1, 32, 32), torch.zeros(4, 1, 32, 32)
    mask[:2, :, 4:20, 4:20] = 1
    batch = mined.mine({"image": image, "mask": mask, "label": torch.tensor([1.0, 1.0, 0.0, 0.0])}, training=True)
    outputs = mined(image)
    losses = mined.compute_losses(outputs, batch)
    assert set(losses) == {"loss", "dice", "focal"}
    assert torch.allclose(losses["loss"], losses["dice"] + 0.3 * losses["focal"])
    losses["loss"].backward()
    assert mined.model.error_head.weight.grad is not None and mined.model.classification_head[-1].weight.grad is not None
    plain = MaskMining(base_checkpoint=cmunet, loss="pwce", cls_weight=0.0)
    assert set(plain.compute_losses(plain(image), plain.mine(dict(batch), training=True))) == {"loss", "pwce"}


def test_bad_bases_and_settings_fail_in_one_line(tmp_path, base_ckpt):
    encoder = save(EncoderPretraining(**TINY), tmp_path / "encoder.ckpt")
    two = save(BaselineUNet(out_channels=2, **TINY), tmp_path / "two.ckpt")
    three = save(BaselineUNet(in_channels=3, **TINY), tmp_path / "three.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.decoder.x": torch.zeros(1), "model.segmentation_head.weight": torch.zeros(1, 4, 1, 1)},
                "hyper_parameters": {}}, foreign)
    cases = [
        (dict(base_checkpoint=encoder), "is not a segmentation model"),
        (dict(base_checkpoint=two), "out_channels=2; mask mining retrains one target channel"),
        (dict(base_checkpoint=three), "in_channels=3 but this run has in_channels=1"),
        (dict(base_checkpoint=str(foreign)), "does not hold this suite's U-Net"),
        (dict(base_checkpoint=str(tmp_path / "absent.ckpt")), "does not exist"),
        (dict(base_checkpoint=base_ckpt, loss="focal"), "unknown mask-mining loss 'focal'; choose one of: dice, pwce"),
        (dict(base_checkpoint=base_ckpt, cls_weight=0.5), "has no classification head"),
        (dict(base_checkpoint=base_ckpt, base_liver_checkpoint=base_ckpt), "base_liver_checkpoint is the unmined liver network"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            MaskMining(**kwargs)
        assert "\n" not in str(error.value)


def test_the_cascade_before_mining_runs_the_unmined_liver_network(tmp_path, monkeypatch):
    """Both networks of a cascade mined: after mining the cascade runs the mined liver network (liver_checkpoint),
    before it the trained one (base_liver_checkpoint) with the base lesion network."""
    base_ckpt = save(BaselineUNet(**TINY), tmp_path / "liver.ckpt")
    lesion = save(BaselineUNet(**TINY), tmp_path / "lesion.ckpt", target="lesion")
    mined_liver = save(MaskMining(base_checkpoint=base_ckpt), tmp_path / "mined_liver.ckpt")
    module = MaskMining(base_checkpoint=lesion, liver_checkpoint=mined_liver, base_liver_checkpoint=base_ckpt)
    assert module._liver_network[0].arch.has_error_head and not module._base_liver[0].arch.has_error_head
    seen = []
    monkeypatch.setattr(MaskMining, "predict_cascade", lambda self, sample, lesion=None, liver=None: seen.append(liver))
    module.predict_base_cascade({"image": torch.zeros(3, 16, 16)})
    assert seen == [module._base_liver[0]] and seen[0].path == base_ckpt
    without = MaskMining(base_checkpoint=lesion, liver_checkpoint=mined_liver)
    without.predict_base_cascade({"image": torch.zeros(3, 16, 16)})
    assert seen[-1] is None  # no unmined liver network named: before and after share the cascade's liver network


def attach(module, datamodule):
    module._trainer = SimpleNamespace(datamodule=datamodule, training=True)
    return module


def test_target_mismatch_and_empty_training_split_fail_before_training(tmp_path, tiny_lits, base_ckpt):
    lesion = MaskMining(base_checkpoint=save(BaselineUNet(), tmp_path / "lesion.ckpt", target="lesion"))
    data = LiTSDataModule(root=str(tiny_lits), cache_dir=str(tmp_path / "cache"), split=[4, 1, 1], image_size=32, preprocess_workers=1)
    data.setup()
    with pytest.raises(DataError, match="trained on target 'lesion' but this run has --data.target=liver"):
        attach(lesion, data).setup("fit")
    empty = LiTSDataModule(root=str(tiny_lits), cache_dir=str(tmp_path / "cache"), split=[0, 3, 3], image_size=32, preprocess_workers=1)
    empty.setup()
    with pytest.raises(DataError, match="nothing to mine: the training split of .* is empty"):
        attach(MaskMining(base_checkpoint=base_ckpt), empty).setup("fit")


def test_cross_mining_never_mines_a_slice_with_a_model_that_trained_on_it(tmp_path, tiny_lits):
    common = dict(root=str(tiny_lits), cache_dir=str(tmp_path / "cache"), split=[6, 0, 0], image_size=32, preprocess_workers=1, num_folds=3)
    full = LiTSDataModule(**common)
    full.setup()
    trained_on = {}
    for fold in range(3):  # what each fold model trains on
        holdout = LiTSDataModule(**common, holdout_fold=fold)
        holdout.setup()
        trained_on[fold] = set(holdout.splits["train"])
        assert len(trained_on[fold]) == 4
    assert set.union(*trained_on.values()) == set(full.splits["train"])
    # fold models that predict all-foreground (fold 0) or all-background (folds 1, 2): the errors reveal the miner
    paths = []
    for fold in range(3):
        model = BaselineUNet(**TINY)
        with torch.no_grad():
            model.model.segmentation_head.weight.zero_()
            model.model.segmentation_head.bias.fill_(50.0 if fold == 0 else -50.0)
        paths.append(save(model, tmp_path / f"fold{fold}.ckpt"))
    mined = attach(MaskMining(base_checkpoint=paths[1], miner_checkpoints=paths), full)
    mined.setup("fit")
    loader = full.train_dataloader()
    seen = set()
    for batch in loader:
        volumes = batch["volume_index"].tolist()
        batch = mined.mine(batch, training=True)
        for i, v in enumerate(volumes):
            fold = mined.miner_for(v)
            assert full.volumes[v].volume_id not in trained_on[fold]
            predicted_foreground = (batch["errors"][i] % 2 == 1)  # FP or TP
            assert bool(predicted_foreground.all()) == (fold == 0) and bool((~predicted_foreground).all()) == (fold != 0)
            seen.add(fold)
    assert seen == {0, 1, 2}
    two_folds = LiTSDataModule(**(common | {"num_folds": 2}))
    two_folds.setup()
    with pytest.raises(DataError, match="needs --data.num_folds=3"):
        attach(MaskMining(base_checkpoint=paths[1], miner_checkpoints=paths), two_folds).setup("fit")
