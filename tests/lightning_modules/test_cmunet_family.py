"""EncoderPretraining, PretrainedUNet (PU-Net) and CMUNet: losses, focal weights, encoder transfer, freezing, checkpoints."""

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from monai.losses import DiceLoss, FocalLoss
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader

from datamodules import LiTSDataModule
from lightning_modules import BaselineUNet, CheckpointError, CMUNet, EncoderPretraining, PretrainedUNet
from lightning_modules.losses.focal import focal_loss

TINY = dict(base_channels=4)


def batch(n=4, channels=1, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, size, size)
    for i in range(0, n, 2):  # every other slice holds a square of "liver"
        mask[i, 0, 8:20, 10:22] = 1
    return {
        "image": torch.randn(n, channels, size, size, generator=generator) + 2 * mask,
        "mask": mask,
        "label": mask.flatten(1).amax(1),
        "volume_index": torch.zeros(n, dtype=torch.long),
        "slice_index": torch.arange(n),
        "volume": ["v0"] * n,
    }


def loader(n=8, batch_size=4):
    data = batch(n)
    samples = [{k: v[i] for k, v in data.items()} for i in range(n)]
    return DataLoader(samples, batch_size=batch_size)


def fit(module, tmp_path=None, callbacks=(), **trainer_args):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path, **trainer_args,
    )
    trainer.fit(module, train_dataloaders=loader())
    return trainer


def encoder_state(module):
    return {k: v.clone() for k, v in module.model.encoder.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """A real EncoderPretraining checkpoint (1 training step), base_channels=4, in_channels=1, instance norm."""
    folder = tmp_path_factory.mktemp("pretraining")
    torch.manual_seed(0)
    trainer = fit(EncoderPretraining(**TINY), folder, max_steps=1)
    path = folder / "encoder.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


# -- one optimisation step each ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [EncoderPretraining, PretrainedUNet, CMUNet])
def test_one_step_each_module(cls):
    torch.manual_seed(0)
    module = cls(scheduler="none", **TINY)
    optimizer = module.configure_optimizers()
    # Adam's fused kernel on the CPU, over every parameter (a frozen encoder's too: it is unfrozen later)
    assert optimizer.defaults["fused"] and optimizer.param_groups[0]["params"] == list(module.parameters())
    before = [p.detach().clone() for p in module.parameters()]
    losses = module.compute_losses(module(batch()["image"]), batch())
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    if cls is EncoderPretraining:
        names = [name for name, _ in module.named_parameters()]
        assert module.model.decoder is None and module.model.segmentation_head is None
        assert not any("decoder" in n or "segmentation_head" in n for n in names)
        assert set(module(batch()["image"])) == {"cls"}


def test_cmunet_loss_is_weighted_sum_of_monai_losses():
    torch.manual_seed(0)
    module = CMUNet(seg_weight=0.3, cls_weight=1.7, focal_alpha=0.6, focal_gamma=1.5, **TINY)
    data = batch()
    outputs = module(data["image"])
    losses = module.compute_losses(outputs, data)
    assert set(losses) == {"loss", "dice", "focal"}
    dice = DiceLoss(sigmoid=True, batch=True)(outputs["seg"], data["mask"])
    focal = FocalLoss(gamma=1.5, alpha=0.6, use_softmax=False)(outputs["cls"], data["label"][:, None])
    assert torch.allclose(losses["dice"], dice) and torch.allclose(losses["focal"], focal)
    assert torch.allclose(losses["loss"], 0.3 * dice + 1.7 * focal)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.2])
def test_focal_alpha_weights_positive_slices(alpha):
    gamma = 2.0
    logits = torch.tensor([[2.0], [-1.0], [0.3], [-0.2], [1.5], [-3.0]])
    labels = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    p = torch.sigmoid(logits)
    hand = torch.where(
        labels == 1, -alpha * (1 - p) ** gamma * torch.log(p), -(1 - alpha) * p**gamma * torch.log(1 - p)
    ).mean()
    assert torch.allclose(focal_loss(alpha, gamma)(logits, labels), hand, atol=1e-6)


def test_classification_metrics():
    module = EncoderPretraining(**TINY)
    data = batch()
    module.update_metrics("val", {"cls": torch.tensor([[3.0], [-3.0], [2.0], [1.0]])}, data)  # labels 1 0 1 0
    assert module.compute_metrics("val") == pytest.approx({"val/accuracy": 0.75, "val/auroc": 1.0, "val/f1": 0.8})
    assert module.compute_metrics("val") == {}  # reset after compute
    assert EncoderPretraining.monitor == ("val/auroc", "max")


def test_cmunet_logs_both_tasks_on_a_datamodule(tiny_lits, tmp_path):
    datamodule = LiTSDataModule(root=str(tiny_lits), cache_dir=str(tmp_path / "cache"), split=[3, 1, 2], image_size=32,
                                batch_size=4, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2,
                         num_sanity_val_steps=0)
    trainer.fit(CMUNet(num_overlays=0, **TINY), datamodule=datamodule)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/dice", "train/focal", "val/loss", "val/dice", "val/focal"} <= logged
    assert {"val/dice_volume", "val/dice_slice", "val/accuracy", "val/auroc", "val/f1"} <= logged


# -- encoder transfer and freezing --------------------------------------------------------------------
def test_pretrained_encoder_is_loaded(encoder_ckpt):
    state = torch.load(encoder_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for module in (PretrainedUNet(encoder_checkpoint=encoder_ckpt, **TINY), CMUNet(encoder_checkpoint=encoder_ckpt, **TINY)):
        for key, value in module.model.encoder.state_dict().items():
            assert torch.equal(value, state[f"model.encoder.{key}"])
    head = CMUNet(encoder_checkpoint=encoder_ckpt, **TINY).model.classification_head.state_dict()
    assert all(torch.equal(v, state[f"model.classification_head.{k}"]) for k, v in head.items())


class EpochSnapshots(Callback):
    def __init__(self):
        self.states, self.training, self.requires_grad = [], [], []

    def on_train_batch_start(self, trainer, module, *args):
        self.training.append(module.model.encoder.training)
        self.requires_grad.append(all(p.requires_grad for p in module.model.encoder.parameters()))

    def on_train_epoch_end(self, trainer, module):
        self.states.append(encoder_state(module))


def test_encoder_frozen_for_the_whole_run(tmp_path):
    torch.manual_seed(0)
    module = PretrainedUNet(norm="batch", freeze_encoder_epochs=-1, **TINY)  # batch norm: eval mode must hold
    encoder, decoder = encoder_state(module), {k: v.clone() for k, v in module.model.decoder.state_dict().items()}
    snapshots = EpochSnapshots()
    fit(module, tmp_path, [snapshots], max_steps=3, limit_val_batches=0)
    assert same(encoder, encoder_state(module))  # weights and running statistics
    assert not same(decoder, module.model.decoder.state_dict())
    assert snapshots.training == [False] * 3 and snapshots.requires_grad == [False] * 3


def test_encoder_frozen_for_the_first_epoch_only(tmp_path):
    torch.manual_seed(0)
    module = PretrainedUNet(norm="batch", freeze_encoder_epochs=1, **TINY)
    initial = encoder_state(module)
    snapshots = EpochSnapshots()
    fit(module, tmp_path, [snapshots], max_epochs=2, limit_val_batches=0)
    assert same(initial, snapshots.states[0]) and not same(initial, snapshots.states[1])
    assert snapshots.training == [False, False, True, True] and snapshots.requires_grad == [False, False, True, True]
    with pytest.raises(ValueError, match="freeze_encoder_epochs"):
        PretrainedUNet(freeze_encoder_epochs=-2)


def test_partial_freezing_under_ddp_asks_for_find_unused_parameters():
    module = PretrainedUNet(freeze_encoder_epochs=1, **TINY)
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    module.on_fit_start()


# -- checkpoint errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_channels=8), "in_channels=1, base_channels=4 but this model has in_channels=1, base_channels=8"),
        (dict(in_channels=3, base_channels=4), "in_channels=1, base_channels=4 but this model has in_channels=3, base_channels=4"),
        (dict(norm="batch", base_channels=4), "missing in"),
    ],
)
def test_mismatched_encoder_checkpoint_fails_in_one_line(encoder_ckpt, kwargs, message):
    for cls in (PretrainedUNet, CMUNet):
        with pytest.raises(CheckpointError, match=message) as error:
            cls(encoder_checkpoint=encoder_ckpt, **kwargs)
        assert encoder_ckpt in str(error.value) and "\n" not in str(error.value)


def test_missing_or_foreign_checkpoint_fails_in_one_line(tmp_path):
    garbage, foreign, segmentation_only = tmp_path / "garbage.ckpt", tmp_path / "foreign.ckpt", tmp_path / "other.ckpt"
    garbage.write_bytes(b"not a checkpoint\n" * 10)
    torch.save({"weights": torch.zeros(3)}, foreign)
    torch.save({"state_dict": {"model.decoder.x": torch.zeros(3)}}, segmentation_only)
    cases = [(tmp_path / "absent.ckpt", "does not exist"), (garbage, "cannot read"),
             (foreign, "no state_dict"), (segmentation_only, "no encoder weights")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            PretrainedUNet(encoder_checkpoint=str(path), **TINY)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


# -- checkpoint round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, extra", [
    (EncoderPretraining, dict(focal_alpha=0.7, norm="batch")),
    (PretrainedUNet, dict(freeze_encoder_epochs=2, lr=0.002)),
    (CMUNet, dict(seg_weight=0.3, cls_weight=0.7, focal_gamma=1.0, threshold=0.4)),
    (BaselineUNet, dict(lr=0.002, threshold=0.4)),  # its own signature is only init_checkpoint and **kwargs
])
def test_load_from_checkpoint_round_trip(cls, extra, tmp_path, encoder_ckpt):
    if cls in (PretrainedUNet, CMUNet):
        extra = extra | dict(encoder_checkpoint=encoder_ckpt)
    module = cls(**TINY, **extra)
    trainer = fit(module, tmp_path, max_steps=1, limit_val_batches=0)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    restored = cls.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(module.hparams)
    assert same(module.state_dict(), restored.state_dict())
