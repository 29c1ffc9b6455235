"""The training augmentation on the batch (``augmentation.applied_to: batch``): MONAI's parameter distributions, MONAI's
geometry, seeded and resumable random stream, independent ranks, and the data module's hooks."""

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monai import transforms as mt

from datamodules import LiTSDataModule
from datamodules.augment.batch import BatchAugmentation
from datamodules.settings import Augmentation, LiverRoi
from lightning_modules import BaselineUNet
from lightning_modules.callbacks.random_state import RandomStateCheckpoint
from tests.synthetic import tiny_volume, write_pair
from datamodules.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Six tiny LiTS volumes (32x32x10) and their preprocessed cache, shared by the tests of this file."""
    folder = tmp_path_factory.mktemp("batch_augmentation")
    for i in range(6):
        write_pair(folder / "lits", str(i), *tiny_volume(i))
    LiTSDataModule(root=str(folder / "lits"), cache_dir=str(folder / "cache"), split=[3, 1, 2], image_size=32).prepare_data()
    return folder


def make(folder, **kwargs):
    options = dict(root=str(folder / "lits"), cache_dir=str(folder / "cache"), split=[3, 1, 2], image_size=32, batch_size=4,
                   num_workers=0, augmentation=Augmentation(applied_to="batch"))
    datamodule = LiTSDataModule(**(options | kwargs))
    datamodule.setup("fit")
    return datamodule


def params(n=1, flip=(False, False), angle=None, zoom=None) -> dict:
    """Fixed parameters for ``BatchAugmentation.apply``: the same for ``n`` samples."""
    return {
        "flip": torch.tensor([flip] * n),
        "rotated": torch.full((n,), angle is not None),
        "angle": torch.full((n,), float(angle or 0.0), dtype=torch.float64),
        "zoomed": torch.full((n,), zoom is not None),
        "zoom": torch.full((n,), float(zoom or 1.0), dtype=torch.float64),
    }


def smooth_image(size=32, channels=1) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = 0.5 + 0.3 * torch.sin(2.1 * x + 0.7) * torch.cos(1.7 * y - 0.3) + 0.2 * x * y
    return image.expand(channels, size, size).clone()


def disc(size=32, centre=(12.0, 19.0), radius=7.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return (((y - centre[0]) ** 2 + (x - centre[1]) ** 2) < radius**2).float()[None]


# -- the parameter distributions are MONAI's ----------------------------------------------------------
def test_drawn_parameters_follow_the_configured_distributions():
    n = 20000
    for flip_prob, degrees, zoom_range, prob in ((0.5, 15.0, (0.9, 1.1), 0.5), (0.2, 30.0, (0.8, 1.0), 0.8)):
        augmentation = BatchAugmentation(flip_prob, degrees, zoom_range, prob)
        p = augmentation.draw(n)
        limit = math.radians(degrees)
        tolerance = 4 * math.sqrt(0.25 / n)  # four standard deviations of a frequency
        assert p["flip"].shape == (n, 2)
        assert p["flip"].double().mean(0).tolist() == pytest.approx([flip_prob] * 2, abs=tolerance)
        assert abs(torch.corrcoef(p["flip"].double().T)[0, 1]) < 0.05  # the two axes are drawn independently
        for applied, value, identity in ((p["rotated"], p["angle"], 0.0), (p["zoomed"], p["zoom"], 1.0)):
            assert applied.double().mean().item() == pytest.approx(prob, abs=tolerance)
            assert (value[~applied] == identity).all()
        angles, zooms = p["angle"][p["rotated"]], p["zoom"][p["zoomed"]]
        assert -limit <= angles.min() < -0.99 * limit and 0.99 * limit < angles.max() <= limit
        assert angles.mean().item() == pytest.approx(0.0, abs=4 * limit / math.sqrt(3 * len(angles)))
        assert angles.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.03)  # uniform, not e.g. normal
        low, high = zoom_range
        assert low <= zooms.min() < low + 0.01 * (high - low) and high - 0.01 * (high - low) < zooms.max() <= high
        assert zooms.mean().item() == pytest.approx((low + high) / 2, abs=0.01 * (high - low))


def test_monai_draws_the_same_distributions():
    """MONAI's RandRotate and RandZoom (as training_augmentation sets them up) against the batch draws."""
    limit, n = math.radians(15.0), 4000
    rotate = mt.RandRotate(range_x=limit, prob=0.5).set_random_state(seed=0)
    zoom = mt.RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5).set_random_state(seed=0)
    angles, zooms = [], []
    for _ in range(n):
        rotate.randomize(None)
        if rotate._do_transform:
            angles.append(rotate.x)
        zoom.randomize(torch.zeros(1, 4, 4))
        if zoom._do_transform:
            assert zoom._zoom[0] == zoom._zoom[1]  # one factor for both axes
            zooms.append(zoom._zoom[0])
    ours = BatchAugmentation(0.5, 15.0, (0.9, 1.1), 0.5).draw(n)
    for theirs, mine in ((torch.tensor(angles), ours["angle"][ours["rotated"]]), (torch.tensor(zooms), ours["zoom"][ours["zoomed"]])):
        assert len(theirs) / n == pytest.approx(len(mine) / n, abs=0.05)
        quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        spread = (mine.max() - mine.min()).item()
        assert torch.quantile(theirs.double(), quantiles).tolist() == pytest.approx(torch.quantile(mine, quantiles).tolist(), abs=0.05 * spread)


# -- the geometry is MONAI's ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fixed, monai_transform",
    [
        (dict(angle=0.3), lambda mode: mt.Rotate(0.3, mode=mode, padding_mode="border")),
        (dict(angle=-0.2), lambda mode: mt.Rotate(-0.2, mode=mode, padding_mode="border")),
        (dict(zoom=1.25), lambda mode: mt.Zoom(1.25, mode=mode, padding_mode="edge")),  # 32 -> 40 pixels: MONAI's size is exact
        (dict(zoom=0.75), lambda mode: mt.Zoom(0.75, mode=mode, padding_mode="edge")),
        (dict(flip=(True, False)), lambda mode: mt.Flip(spatial_axis=0)),
        (dict(flip=(False, True)), lambda mode: mt.Flip(spatial_axis=1)),
    ],
    ids=["rotate+", "rotate-", "zoom-in", "zoom-out", "flip-rows", "flip-columns"],
)
def test_a_fixed_draw_matches_the_monai_transform(fixed, monai_transform):
    image, mask = smooth_image(channels=3), disc()
    out = BatchAugmentation().apply({"image": image[None], "mask": mask[None]}, params(**fixed))
    expected_image = torch.as_tensor(monai_transform("bilinear")(image)).as_subclass(torch.Tensor)
    expected_mask = torch.as_tensor(monai_transform("nearest")(mask)).as_subclass(torch.Tensor)
    interior = (slice(None), slice(5, -5), slice(5, -5))  # MONAI pads a zoomed-out image with its zoomed edge
    torch.testing.assert_close(out["image"][0][interior], expected_image[interior], atol=2e-5, rtol=0)
    differ = out["mask"][0] != expected_mask
    # MONAI's nearest-neighbour zoom rounds source positions down, grid_sample to the nearest: mask
    # boundaries may move by one pixel, nothing else
    boundary = F.max_pool2d(expected_mask[None], 3, 1, 1)[0] != -F.max_pool2d(-expected_mask[None], 3, 1, 1)[0]
    assert not (differ & ~boundary).any() and differ.double().mean() <= (0.0 if "flip" in fixed else 0.05)
    assert out["label"].tolist() == [1.0]


def test_a_combined_draw_matches_monai_applied_in_sequence():
    """Flip, rotation and zoom together, as training_augmentation applies them (MONAI resamples twice, here once)."""
    image = smooth_image(channels=1)
    out = BatchAugmentation().apply({"image": image[None]}, params(flip=(True, True), angle=0.25, zoom=1.25))
    sequence = mt.Compose([mt.Flip(0), mt.Flip(1), mt.Rotate(0.25, padding_mode="border"), mt.Zoom(1.25, mode="bilinear", padding_mode="edge")])
    expected = torch.as_tensor(sequence(image)).as_subclass(torch.Tensor)
    torch.testing.assert_close(out["image"][0][:, 5:-5, 5:-5], expected[:, 5:-5, 5:-5], atol=0.01, rtol=0)


# -- seeds and ranks -------------------------------------------------------------------------------
def test_the_stream_follows_seed_everything(tiny_data):
    def draws(seed):
        pl.seed_everything(seed, verbose=False)
        augmentation = make(tiny_data).batch_augmentation
        return [augmentation.draw(8) for _ in range(3)]

    def same(a, b):
        return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    assert same(draws(0), draws(0))
    assert not same(draws(0), draws(1))
    first = draws(0)
    assert not torch.equal(first[0]["angle"], first[1]["angle"])  # batches of one stream differ too


def test_ranks_draw_independently(tiny_data):
    def draws(rank):
        pl.seed_everything(5, verbose=False)
        datamodule = LiTSDataModule(root=str(tiny_data / "lits"), cache_dir=str(tiny_data / "cache"), split=[3, 1, 2],
                                    image_size=32, augmentation=Augmentation(applied_to="batch"))
        datamodule.trainer = SimpleNamespace(global_rank=rank)
        datamodule.setup("fit")
        return datamodule.batch_augmentation.draw(64)

    rank0, rank1 = draws(0), draws(1)
    assert torch.equal(rank0["angle"], draws(0)["angle"])
    for key in ("flip", "rotated", "zoomed"):
        assert not torch.equal(rank0[key], rank1[key])
    both = rank0["rotated"] & rank1["rotated"]
    assert both.any() and (rank0["angle"][both] != rank1["angle"][both]).all()


# -- the class label and the other keys ------------------------------------------------------------------
def test_label_is_recomputed_from_the_augmented_mask_and_other_keys_pass_through():
    n = 64
    mask = torch.zeros(n, 2, 16, 16)
    mask[:, 0, 0, :2] = 1  # liver at the border: a zoom in or a rotation can push it out of the image
    mask[::3, 1, 7:9, 7:9] = 1  # a lesion in the centre of every third slice stays
    batch = {
        "image": torch.rand(n, 3, 16, 16),
        "mask": mask,
        "label": torch.full((n,), 0.5),
        "volume": [f"v{i}" for i in range(n)],
        "volume_index": torch.arange(n),
        "crop_origin": torch.zeros(n, 2, dtype=torch.int64),
    }
    augmentation = BatchAugmentation(flip_prob=0.5, rotate_degrees=15.0, zoom_range=(1.1, 1.3), prob=1.0)
    out = augmentation(batch)
    assert out["label"].dtype == torch.float32 and out["label"].tolist() == (out["mask"] > 0.5).flatten(1).any(1).float().tolist()
    assert 0 < out["label"].sum() < n  # some borders pushed out, the lesions kept
    assert out["image"].shape == (n, 3, 16, 16) and out["mask"].shape == (n, 2, 16, 16)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    for key in ("volume", "volume_index", "crop_origin"):
        assert out[key] is batch[key]
    assert batch["label"].eq(0.5).all()  # the input batch is not modified

    same_channels = torch.rand(4, 1, 16, 16).expand(4, 3, 16, 16)
    out = augmentation({"image": same_channels})  # context channels: one map for all
    assert torch.equal(out["image"][:, 0], out["image"][:, 1]) and torch.equal(out["image"][:, 0], out["image"][:, 2])
    assert "label" not in out


# -- the data module ---------------------------------------------------------------------------------------
class _Recording(BaselineUNet):
    """Records what its own on_after_batch_transfer sees (mask mining computes its error masks there)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        consistent = torch.equal(batch["label"], (batch["mask"] > 0.5).flatten(1).any(1).to(batch["label"].dtype))
        self.seen.append((self.trainer.training, consistent))
        return batch


def test_batch_mode_trains_through_on_after_batch_transfer_and_leaves_evaluation_alone(tiny_data, tmp_path):
    pl.seed_everything(0, verbose=False)
    datamodule = LiTSDataModule(root=str(tiny_data / "lits"), cache_dir=str(tiny_data / "cache"), split=[3, 1, 2], image_size=32,
                                batch_size=4, num_workers=0, augmentation=Augmentation(applied_to="batch", prob=1.0))
    model = _Recording(base_channels=4, num_overlays=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert datamodule.datasets["train"].transform is None  # the workers no longer augment
    assert datamodule.batch_augmentation.batches == 2  # the two training batches, no validation batch
    assert [training for training, _ in model.seen] == [True, True] + [False] * (len(model.seen) - 2) and len(model.seen) > 2
    assert all(consistent for _, consistent in model.seen)
    assert "val/dice_volume" in trainer.callback_metrics


def test_lesion_crops_are_augmented_on_the_batch_too(tiny_data):
    datamodule = make(tiny_data, target="lesion", sampling="liver_roi",
                      liver_roi=LiverRoi(crop_size=16, crop_margin=2, roi_margin_px=4, roi_margin_slices=1),
                      augmentation=Augmentation(applied_to="batch", prob=1.0))
    assert datamodule.datasets["train"].transform is None
    batch = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = SimpleNamespace(training=True, global_rank=0, lightning_module=pl.LightningModule())
    out = datamodule.on_after_batch_transfer(batch, 0)
    assert not torch.equal(out["image"], batch["image"]) and torch.equal(out["crop_origin"], batch["crop_origin"])
    assert torch.equal(out["label"], (out["mask"] > 0.5).flatten(1).any(1).float())
    datamodule.trainer.training = False  # validation, test and prediction batches are never augmented
    assert datamodule.on_after_batch_transfer(batch, 0) is batch


def test_sample_mode_is_unchanged_and_bad_values_fail():
    datamodule = LiTSDataModule(augmentation=Augmentation(applied_to="sample"))
    assert datamodule.batch_augmentation is None and datamodule.state_dict() == {}
    assert LiTSDataModule(augmentation=Augmentation(applied_to="batch", enabled=False)).batch_augmentation is None
    with pytest.raises(ConfigError, match="augmentation.applied_to must be one of sample, batch, got 'gpu'"):
        LiTSDataModule(augmentation=Augmentation(applied_to="gpu"))


# -- the stream in checkpoints ------------------------------------------------------------------------------
def test_state_dict_round_trip_restores_the_stream(tiny_data, tmp_path):
    pl.seed_everything(7, verbose=False)
    original = make(tiny_data)
    for _ in range(3):
        original.batch_augmentation.draw(4)
    torch.save({"LiTSDataModule": original.state_dict()}, tmp_path / "state.ckpt")
    expected = original.batch_augmentation.draw(4)

    pl.seed_everything(8, verbose=False)  # another run's seed: the checkpoint's wins
    restored = make(tiny_data)
    restored.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True)["LiTSDataModule"])
    drawn = restored.batch_augmentation.draw(4)
    assert all(torch.equal(drawn[k], expected[k]) for k in expected)


def test_a_resumed_fit_draws_the_uninterrupted_fits_augmentations(tiny_data, tmp_path):
    """Fit 2 epochs against fit 1 epoch and resume from its last checkpoint: the same weights (with random_state's callback)."""

    def fit(folder, epochs, ckpt_path=None):
        pl.seed_everything(3, verbose=False)
        datamodule = LiTSDataModule(root=str(tiny_data / "lits"), cache_dir=str(tiny_data / "cache"), split=[3, 1, 2], image_size=32,
                                    batch_size=4, num_workers=0, augmentation=Augmentation(applied_to="batch", prob=1.0))
        model = BaselineUNet(base_channels=4, num_overlays=0)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=folder, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=[checkpoint, RandomStateCheckpoint()])
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return model, datamodule

    whole, whole_data = fit(tmp_path / "whole", 2)
    fit(tmp_path / "killed", 1)
    saved = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["LiTSDataModule"]["batch_augmentation"]
    assert saved == {"seed": 3, "batches": whole_data.batch_augmentation.batches // 2}
    resumed, resumed_data = fit(tmp_path / "killed", 2, ckpt_path=tmp_path / "killed" / "last.ckpt")
    assert resumed_data.batch_augmentation.batches == whole_data.batch_augmentation.batches
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
