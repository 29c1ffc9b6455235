"""3D training crops of volumes thinner than the crop (issue 21, section 5): padded as nnU-Net and MONAI's SpatialPad
do, the image with air and the labels with background; crops that fit are read as before."""

import numpy as np
import pytest
import torch

from datamodules.datasets.crops3d import AIR, BACKGROUND, Crop3DDataset
from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.nifti import discover
from datamodules.io.preprocess import PreprocessSettings, window
from tests.synthetic import tiny_volume, write_pair

SETTINGS = PreprocessSettings(-100.0, 600.0, 32)
# 10 slices of 5 mm resample to 19 slices of 2.5 mm: a thin slab against a 32-slice crop that fits in-plane
SLAB_SLICES, CROP = 19, (32, 16, 16)


@pytest.fixture(scope="module")
def slabs(tmp_path_factory):
    """Two thin slabs: volume 0 with air around the body, volume 1 all body (its windowed minimum is above 0)."""
    root = tmp_path_factory.mktemp("crops3d")
    for i in range(2):
        hu, label = tiny_volume(i, shape=(32, 32, 10))
        write_pair(root / "data", str(i), np.maximum(hu, 0) if i else hu, label, affine=np.diag([1.5, 1.5, 5.0, 1.0]))
    return [CachedVolume(e) for e in build_cache(discover(root / "data"), root / "cache", SETTINGS, workers=1, progress=False)]


def test_air_is_what_windowing_gives_the_lowest_hu():
    assert window(np.array([-1024.0, SETTINGS.hu_min], dtype=np.float32), SETTINGS).tolist() == [AIR, AIR]


@pytest.mark.parametrize("target", ["liver", "both", "lesion"])
def test_thin_slab_is_padded_with_air_and_background(slabs, target):
    dataset = Crop3DDataset(slabs, [0, 1], crop_size=CROP, target=target, positive_fraction=0.5, samples_per_volume=4)
    channels = 2 if target == "both" else 1
    assert [v.shape[0] for v in dataset.volumes] == [SLAB_SLICES] * 2
    assert dataset.volumes[1].image_min > AIR  # air, not the volume's own minimum, fills the padding
    torch.manual_seed(0)
    for i in range(len(dataset)):
        sample, resampled = dataset[i], dataset.volumes[i // 4]
        assert sample["image"].shape == (1, *CROP) and sample["mask"].shape == (channels, *CROP)
        assert type(sample["image"]) is torch.Tensor and sample["image"].dtype == sample["mask"].dtype == torch.float32
        z0, y0, x0 = sample["crop_origin"].tolist()
        before = (CROP[0] - SLAB_SLICES) // 2
        assert z0 == -before  # centred on the slab, as MONAI's SpatialPad(method="symmetric") pads
        image, mask = sample["image"][0].numpy(), sample["mask"].numpy()
        inside = slice(before, before + SLAB_SLICES)
        outside = np.ones(CROP[0], bool)
        outside[inside] = False
        assert np.all(image[outside] == AIR) and np.all(mask[:, outside] == BACKGROUND)
        # in-plane the crop fits: the slab's voxels are the resampled volume's, unchanged
        np.testing.assert_array_equal(image[inside], resampled.image[:, y0 : y0 + CROP[1], x0 : x0 + CROP[2]])
        labels = resampled.label[:, y0 : y0 + CROP[1], x0 : x0 + CROP[2]]
        expected = (labels == 2) if target == "lesion" else (labels >= 1)
        np.testing.assert_array_equal(mask[0, inside], expected)
        assert float(sample["label"]) == float(mask.any())


def test_padded_crops_are_reproducible_and_augmentable(slabs):
    from datamodules.augment.sample import InPlaneAugmentation

    def run(seed):
        dataset = Crop3DDataset(slabs, [0, 1], crop_size=(32, 48, 48), target="both", transform=InPlaneAugmentation(prob=1.0))
        torch.manual_seed(seed)
        return [dataset[i] for i in range(len(dataset))]

    before = (32 - SLAB_SLICES) // 2
    for first, again in zip(run(5), run(5)):
        assert first["image"].shape == (1, 32, 48, 48) and first["mask"].shape == (2, 32, 48, 48)
        assert first["crop_origin"].tolist() == [-before, -8, -8]  # shorter on every axis: centred on each
        for key in ("image", "mask"):
            torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
        # the in-plane augmentation never mixes slices: the padded slices stay air and background
        padded = [*range(before), *range(before + SLAB_SLICES, 32)]
        assert torch.all(first["image"][:, padded] == AIR) and torch.all(first["mask"][:, padded] == BACKGROUND)


def test_crops_that_fit_are_not_padded(slabs, monkeypatch):
    """A crop inside the volume is read directly: the padding transform is never called."""
    dataset = Crop3DDataset(slabs, [0, 1], crop_size=(16, 16, 16), target="liver", samples_per_volume=3)
    monkeypatch.setattr(dataset, "padding", lambda sample: pytest.fail("a crop that fits was padded"))
    torch.manual_seed(1)
    for i in range(len(dataset)):
        sample, resampled = dataset[i], dataset.volumes[i // 3]
        z0, y0, x0 = sample["crop_origin"].tolist()
        assert min(z0, y0, x0) >= 0
        np.testing.assert_array_equal(sample["image"][0].numpy(), resampled.image[z0 : z0 + 16, y0 : y0 + 16, x0 : x0 + 16])
