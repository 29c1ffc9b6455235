"""The LiTS DataModule on tiny volumes: samples, splits by volume, options, augmentation, and the phantom default."""

import numpy as np
import pytest
import torch

from datamodules import DataError, LiTSDataModule
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset
from datamodules.settings import Augmentation, LiverRoi, Phantom
from tests.synthetic import tiny_volume, write_pair
from datamodules.errors import ConfigError


def make(root, tmp_path, **kwargs):
    options = dict(root=str(root), cache_dir=str(tmp_path / "cache"), split=[3, 1, 2], image_size=16, batch_size=4, num_workers=0)
    datamodule = LiTSDataModule(**(options | kwargs))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_samples_and_class_labels(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, augmentation=Augmentation(enabled=True))
    for name, dataset in datamodule.datasets.items():
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample["image"].shape == (1, 16, 16) and sample["mask"].shape == (1, 16, 16)
            assert sample["label"].item() == float(sample["mask"].bool().any())  # CMU-Net's C = max(Y)
            assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    # top and bottom slices of these volumes have no liver, middle ones do
    labels = [datamodule.datasets["test"][i]["label"].item() for i in range(len(datamodule.datasets["test"]))]
    assert 0 < sum(labels) < len(labels)


def test_splits_are_by_volume(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path)
    seen = {name: {s["volume"] for s in ds} for name, ds in datamodule.datasets.items()}
    assert seen == {name: set(ids) for name, ids in datamodule.splits.items()}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    # evaluation splits cover every slice of their volumes
    assert len(datamodule.datasets["test"]) == 2 * 10


def test_targets_context_and_foreground_margin(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, target="both", context_slices=2, foreground_margin=0, augmentation=Augmentation(enabled=False))
    sample = datamodule.datasets["train"][0]
    assert sample["image"].shape == (5, 16, 16) and sample["mask"].shape == (2, 16, 16)
    # lesion channel is inside the liver channel
    assert torch.all(sample["mask"][1] <= sample["mask"][0])
    # margin 0 keeps only slices with liver in training
    assert all(s["label"] == 1 for s in datamodule.datasets["train"])
    assert datamodule.num_target_channels == 2
    # neighbours: channel 2 is the slice itself
    position, z = datamodule.datasets["train"].index[0]
    volume = datamodule.datasets["train"].volumes[position]
    np.testing.assert_array_equal(sample["image"][2].numpy(), volume.image[z].astype(np.float32))


def test_eval_target_is_at_original_resolution(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path)
    target, spacing = datamodule.eval_target(0)
    assert target.shape == (1, 10, 32, 32) and target.dtype == bool
    assert spacing == (4.0, 1.5, 1.5)


def test_positive_fraction_sampler(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, positive_fraction=0.9, augmentation=Augmentation(enabled=False), batch_size=64)
    torch.manual_seed(0)
    labels = torch.cat([batch["label"] for _ in range(10) for batch in datamodule.train_dataloader()])
    assert 0.82 < labels.mean().item() < 0.97


def test_batches_collate(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path)
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["volume_index"].dtype == torch.int64
    assert isinstance(batch["volume"], list)


def test_split_larger_than_dataset_fails_before_preprocessing(tiny_lits, tmp_path):
    datamodule = LiTSDataModule(root=str(tiny_lits), cache_dir=str(tmp_path / "cache"), split=[10, 2, 5], image_size=16)
    with pytest.raises(ConfigError, match="asks for 17 volumes .* has 6"):
        datamodule.prepare_data()
    assert not (tmp_path / "cache" / "preprocessed").exists()


def test_phantom_is_the_default(tmp_path):
    datamodule = LiTSDataModule(
        cache_dir=str(tmp_path), split=[2, 1, 1], phantom=Phantom(volumes=4, shape=(48, 48, 12)), image_size=32, num_workers=0
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert sorted(p.name for p in datamodule.data_root.iterdir() if p.name.startswith("volume-")) == [f"volume-{i}.nii.gz" for i in range(4)]
    assert sum(len(v) for v in datamodule.splits.values()) == 4
    assert datamodule.datasets["train"][0]["image"].shape == (1, 32, 32)


def test_augmentation_without_metadata_tracking_gives_the_same_samples(tiny_lits, tmp_path):
    """The training set augments with MONAI's metadata tracking off (speed): the same samples, the global setting restored."""
    import copy

    from monai.data import get_track_meta

    dataset = make(tiny_lits, tmp_path, augmentation=Augmentation(enabled=True)).datasets["train"]
    tracked = copy.deepcopy(dataset.transform)  # the same random state, run with tracking on
    assert get_track_meta()
    for i in range(len(dataset)):
        untracked = dataset[i]
        position, z = dataset.index[i]
        volume = dataset.volumes[position]
        image = torch.from_numpy(np.array(volume.image[z : z + 1])).float()
        mask = torch.from_numpy(np.array(volume.label[z] > 0)[None].astype(np.float32))
        expected = tracked({"image": image, "mask": mask})
        assert torch.equal(untracked["image"], torch.as_tensor(expected["image"]).as_subclass(torch.Tensor))
        assert torch.equal(untracked["mask"], torch.as_tensor(expected["mask"]).as_subclass(torch.Tensor))
    assert get_track_meta()


# -- liver_roi: the lesion network's full-resolution crops and whole evaluation volumes ---------------------
ROI = dict(sampling="liver_roi", liver_roi=LiverRoi(crop_size=16, crop_margin=2, roi_margin_px=4, roi_margin_slices=1))


def test_liver_roi_loaders_give_crops_for_training_and_unbatched_volumes_for_evaluation(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, target="both", context_slices=1, augmentation=Augmentation(enabled=False), **ROI)
    assert isinstance(datamodule.datasets["train"], LiverCropDataset)
    assert all(isinstance(datamodule.datasets[name], VolumeDataset) for name in ("val", "test"))
    assert datamodule.settings.roi_margin_px == 4 and datamodule.settings.roi_margin_slices == 1
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 2, 16, 16)
    assert batch["crop_origin"].shape == (4, 2) and batch["crop_origin"].dtype == torch.int64
    assert batch["label"].tolist() == [float(m.any()) for m in batch["mask"]]
    for name, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        samples = list(loader)
        assert [s["volume"] for s in samples] == datamodule.splits[name]  # unbatched, in split order
        for sample in samples:
            volume = datamodule.volumes[sample["volume_index"]]
            assert isinstance(sample["volume_index"], int) and isinstance(sample["volume"], str)
            assert sample["image"].shape == (10, 16, 16) and sample["full_shape"].tolist() == [10, 32, 32]
            assert sample["roi_box"].tolist() == [list(axis) for axis in volume.roi_box]
            assert sample["roi_image"].shape == volume.roi_image.shape
    target, spacing = datamodule.eval_target(0)  # evaluation ground truth as in "slices" mode
    assert target.shape == (2, 10, 32, 32) and spacing == (4.0, 1.5, 1.5)


def test_liver_roi_with_workers_and_positive_fraction(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, target="lesion", num_workers=1, positive_fraction=0.5, **ROI)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16)
    sample = next(iter(datamodule.val_dataloader()))
    assert sample["roi_image"].ndim == 3 and sample["volume"] == datamodule.splits["val"][0]


def test_lesion_target_needs_lesion_labels(tmp_path):
    for i in range(3):
        hu, label = tiny_volume(i)
        write_pair(tmp_path / "data", str(i), hu, np.minimum(label, 1))  # liver only, no lesion label
    options = dict(split=[2, 1, 0], image_size=16, num_workers=0)
    for sampling in ("slices", "liver_roi"):
        with pytest.raises(DataError, match=r"no lesion voxel \(label 2\); lesion training needs LiTS labels") as error:
            make(tmp_path / "data", tmp_path, target="lesion", sampling=sampling, liver_roi=LiverRoi(crop_size=16), **options)
        assert "\n" not in str(error.value) and str(tmp_path / "data") in str(error.value)
    make(tmp_path / "data", tmp_path, target="liver", sampling="liver_roi", liver_roi=LiverRoi(crop_size=16), **options)  # liver alone is fine


def test_liver_roi_needs_liver_slices_in_training(tmp_path):
    for i in range(3):
        hu, label = tiny_volume(i)
        write_pair(tmp_path / "data", str(i), hu, np.zeros_like(label))
    with pytest.raises(DataError, match="no liver slice") as error:
        make(tmp_path / "data", tmp_path, split=[2, 1, 0], sampling="liver_roi", liver_roi=LiverRoi(crop_size=16))
    assert "\n" not in str(error.value)
    make(tmp_path / "data", tmp_path, split=[2, 1, 0], sampling="slices")  # the slice path does not need one


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(liver_roi=LiverRoi(crop_size=100)), "--data.liver_roi.crop_size=100 must be a positive multiple of 16"),
        (dict(sampling="crops"), "sampling='crops' is not one of slices, liver_roi"),
    ],
)
def test_bad_liver_roi_options(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        LiTSDataModule(**options)
    assert "\n" not in str(error.value)


def test_the_augmentation_stream_follows_seed_everything(tiny_lits, tmp_path):
    # MONAI's DataLoader seeds the dataset's random transforms from torch's generator when it is built, so
    # each seed of a study draws its own augmentations, and the same seed the same ones
    import pytorch_lightning as pl

    from lightning_modules.callbacks.random_state import randomizables

    def transform_states(seed):
        pl.seed_everything(seed, verbose=False)
        loader = make(tiny_lits, tmp_path, augmentation=Augmentation(enabled=True)).train_dataloader()
        transforms = randomizables(loader.dataset, [], set())
        assert transforms  # flips, rotation, zoom and their Compose
        return [tuple(t.R.get_state()[1][:4]) for t in transforms]

    assert transform_states(0) == transform_states(0)
    assert transform_states(0) != transform_states(1)
