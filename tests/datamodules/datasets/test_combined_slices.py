"""sampling: combined: the combined model's liver network trains on what it is evaluated on (every whole resized
slice, liver-free ones included), its lesion network on full-resolution crops of the same slices, and augmentation
moves the crop with the slice."""

import numpy as np
import pytest
import torch

from datamodules import LiTSDataModule
from datamodules.datasets.combined_slices import CombinedSliceDataset, draw_affine, moved_origin, warp, warp_crop
from datamodules.datasets.liver_region import VolumeDataset
from datamodules.errors import ConfigError
from datamodules.settings import Augmentation, LiverRoi
from tests.synthetic import fitted_datamodule


def make(root, tmp_path, **kwargs):
    options = dict(split=[3, 1, 2], image_size=16, batch_size=4, target="both", sampling="combined",
                   liver_roi=LiverRoi(crop_size=16, crop_margin=0), augmentation=Augmentation(enabled=False))
    return fitted_datamodule(root, tmp_path, **(options | kwargs))


def test_the_liver_network_trains_on_every_whole_slice_at_the_evaluations_scale(tiny_lits, tmp_path):
    datamodule = make(tiny_lits, tmp_path, context_slices=1)
    train, test = datamodule.datasets["train"], datamodule.datasets["test"]
    assert isinstance(train, CombinedSliceDataset) and isinstance(test, VolumeDataset)
    evaluated = test[0]["image"]  # what the evaluation's liver network sees: the resized stack
    samples = [train[i] for i in range(len(train))]
    assert len(samples) == sum(v.num_slices for v in train.whole.volumes)  # every slice of the training volumes
    for (position, z), sample in zip(train.index, samples):
        volume = train.whole.volumes[position]
        assert sample["image"].shape == (3, *evaluated.shape[1:])
        np.testing.assert_array_equal(sample["image"][1].numpy(), volume.image[z].astype(np.float32))  # no crop, no rescaling
        assert sample["full_size"].tolist() == list(volume.full_shape[1:]) and sample["crop_image"].shape == (3, 16, 16)
        assert sample["crop_valid"].item() == float(sample["mask"][0].any())  # a crop exactly where the slice has liver
        if sample["crop_valid"]:  # the crop is the full-resolution slice at its origin
            y0, x0 = sample["crop_origin"].tolist()
            np.testing.assert_array_equal(sample["crop_image"][1].numpy(), volume.read_image(((z, z + 1), (y0, y0 + 16), (x0, x0 + 16)))[0])
            assert sample["crop_mask"][0].any()
    assert sum(not s["mask"][0].any() for s in samples) >= 2 * 3  # liver-free slices are trained on


def test_augmentation_moves_the_crop_with_the_slice(tiny_lits, tmp_path):
    flips = Augmentation(enabled=True, flip_prob=1.0, prob=0.0)  # both flips, no rotation or zoom: exact on pixels
    train = make(tiny_lits, tmp_path, augmentation=flips).datasets["train"]
    assert 0 < sum(train[i]["crop_valid"].item() for i in range(10)) < 10
    for i in range(10):  # the first volume's slices, with and without liver
        sample = train[i]
        position, z = train.index[i]
        volume = train.whole.volumes[position]
        np.testing.assert_allclose(sample["image"][0].numpy(), volume.image[z][::-1, ::-1].astype(np.float32), atol=1e-6)
        if sample["crop_valid"]:
            y0, x0 = sample["crop_origin"].tolist()
            full = volume.read_image(((z, z + 1), (0, 32), (0, 32)))[0][::-1, ::-1]
            padded = np.pad(full, 16)  # the crop may reach beyond the slice: zeros there
            np.testing.assert_allclose(sample["crop_image"][0].numpy(), padded[y0 + 16 : y0 + 32, x0 + 16 : x0 + 32], atol=1e-6)
            assert sample["crop_mask"][0].any()  # the flipped crop still shows the (flipped) liver


def test_batch_augmentation_is_refused(tiny_lits, tmp_path):
    with pytest.raises(ConfigError, match="applied_to=sample"):
        LiTSDataModule(root=str(tiny_lits), target="both", sampling="combined", augmentation=Augmentation(applied_to="batch"))


def test_a_rotated_and_zoomed_crop_is_the_warped_slice_at_its_origin():
    torch.manual_seed(0)
    theta = draw_affine(Augmentation(flip_prob=0.5, rotate_degrees=30.0, zoom_range=(0.8, 1.2), prob=1.0))
    full = torch.rand(2, 40, 48)
    warped = warp(full, theta, "bilinear")
    for origin in [(0, 0), (10, 17), (30, 40), (-4, 44)]:
        padded = torch.nn.functional.pad(warped, [16] * 4)
        expected = padded[:, origin[0] + 16 : origin[0] + 32, origin[1] + 16 : origin[1] + 32]
        torch.testing.assert_close(warp_crop(full, theta, origin, 16, "bilinear"), expected, rtol=0, atol=1e-5)
    # the window that shows what the unwarped window showed: its centre maps back onto the old centre
    y0, x0 = moved_origin((10, 17), 16, (40, 48), theta)
    centre = torch.tensor([(2 * (x0 + 8)) / 48 - 1, (2 * (y0 + 8)) / 40 - 1, 1.0])
    back = theta @ centre
    assert abs((back[0] + 1) * 24 - (17 + 8)) <= 1 and abs((back[1] + 1) * 20 - (10 + 8)) <= 1
