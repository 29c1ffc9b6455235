"""The lesion network's data path: full-resolution crops around the liver, and whole volumes for evaluation."""

import numpy as np
import pytest
import torch

from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import read_box
from datamodules.io.preprocess import PreprocessSettings
from datamodules.augment.sample import training_augmentation
from datamodules.io.nifti import discover
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset, crop_start
from tests.synthetic import tiny_volume, write_pair

# 64 x 64 x 10 volumes: a liver ~28 x 32 px on slices 2..7, cached with an 8 px / 1 slice margin (ROI ~44 x 48 px)
SETTINGS = PreprocessSettings(-100.0, 600.0, 32, roi_margin_px=8, roi_margin_slices=1)
SAMPLE_KEYS = {"image", "mask", "label", "volume_index", "slice_index", "volume", "crop_origin"}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("roi")
    for i in range(3):
        write_pair(root / "data", str(i), *tiny_volume(i, shape=(64, 64, 10)))
    return [CachedVolume(e) for e in build_cache(discover(root / "data"), root / "cache", SETTINGS, workers=1, progress=False)]


def cached_full(volume):
    """The cached full-resolution image as a whole volume: roi_image inside roi_box, 0 elsewhere."""
    full = np.zeros(volume.full_shape, dtype=np.float32)
    full[tuple(slice(a, b) for a, b in volume.roi_box)] = volume.roi_image
    return full


def window_at(array, origin, size, pad=64):
    """array[..., y0:y0+size, x0:x0+size] with zeros beyond the array."""
    padded = np.pad(array, [(0, 0)] * (array.ndim - 2) + [(pad, pad)] * 2)
    y0, x0 = (int(v) + pad for v in origin)
    return padded[..., y0 : y0 + size, x0 : x0 + size]


def test_one_sample_per_liver_slice_and_sample_layout(volumes):
    dataset = LiverCropDataset(volumes, [5, 6, 7], target="both", context_slices=1, crop_size=32, crop_margin=4)
    expected = [(p, z) for p, v in enumerate(volumes) for z in range(v.num_slices) if (v.label_full()[z] >= 1).any()]
    assert [tuple(row) for row in dataset.index] == expected and len(dataset) == len(expected)
    sample = dataset[0]
    assert set(sample) == SAMPLE_KEYS
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (2, 32, 32) and sample["mask"].dtype == torch.float32
    assert sample["label"].shape == () and sample["label"].dtype == torch.float32
    assert sample["crop_origin"].shape == (2,) and sample["crop_origin"].dtype == torch.int64
    assert (sample["volume_index"], sample["slice_index"], sample["volume"]) == (5, expected[0][1], volumes[0].volume_id)
    assert torch.all(sample["mask"][1] <= sample["mask"][0])  # lesions inside the liver


def test_centres_are_uniform_in_the_grown_liver_box(volumes):
    margin = 4
    dataset = LiverCropDataset(volumes, range(3), crop_size=32, crop_margin=margin)
    torch.manual_seed(0)
    for position, volume in enumerate(volumes):
        draws = np.array([dataset.draw_crop(position) for _ in range(3000)])
        (_, _), (ly0, ly1), (lx0, lx1) = volume.liver_box
        for axis, (low, high) in ((0, (ly0 - margin, ly1 + margin)), (1, (lx0 - margin, lx1 + margin))):
            centres = draws[:, axis]
            assert centres.min() == low and centres.max() == high - 1  # the whole grown box (it lies inside the ROI here)
            counts = np.bincount(centres - low, minlength=high - low)
            assert counts.min() > 0.4 * counts.mean() and counts.max() < 1.8 * counts.mean()  # roughly uniform


def test_crops_lie_inside_the_roi_when_it_fits_and_contain_the_centre(volumes):
    dataset = LiverCropDataset(volumes, range(3), crop_size=32, crop_margin=30)  # centres reach the ROI's edges
    torch.manual_seed(1)
    for position, volume in enumerate(volumes):
        _, (ry0, ry1), (rx0, rx1) = volume.roi_box
        assert ry1 - ry0 >= 32 and rx1 - rx0 >= 32
        draws = np.array([dataset.draw_crop(position) for _ in range(500)])
        cy, cx, y0, x0 = draws.T
        assert (ry0 <= cy).all() and (cy < ry1).all() and (rx0 <= cx).all() and (cx < rx1).all()  # clipped to the ROI
        assert (y0 >= ry0).all() and (y0 + 32 <= ry1).all() and (x0 >= rx0).all() and (x0 + 32 <= rx1).all()
        assert (y0 <= cy).all() and (cy < y0 + 32).all() and (x0 <= cx).all() and (cx < x0 + 32).all()
        assert {ry0, ry1 - 32} <= set(y0.tolist())  # shifted inward at both edges


def test_crop_wider_than_the_roi_is_centred_and_zero_padded(volumes):
    dataset = LiverCropDataset(volumes, range(3), crop_size=64, crop_margin=4)
    assert crop_start(10, 64, 5, 49) == 5 - (64 - 44) // 2
    torch.manual_seed(2)
    for i in range(0, len(dataset), 3):
        sample = dataset[i]
        volume = volumes[dataset.index[i, 0]]
        _, (ry0, ry1), (rx0, rx1) = volume.roi_box
        y0, x0 = sample["crop_origin"].tolist()
        assert (y0, x0) == (ry0 - (64 - (ry1 - ry0)) // 2, rx0 - (64 - (rx1 - rx0)) // 2)
        image = sample["image"][0].numpy()
        assert not image[: ry0 - y0].any() and not image[ry1 - y0 :].any() and not image[:, : rx0 - x0].any()
        np.testing.assert_array_equal(image, window_at(cached_full(volume)[sample["slice_index"]], (y0, x0), 64))


@pytest.mark.parametrize("target", ["liver", "lesion", "both"])
def test_crop_content_matches_the_full_resolution_arrays_at_crop_origin(volumes, target):
    dataset = LiverCropDataset(volumes, range(3), target=target, crop_size=32, crop_margin=16)
    torch.manual_seed(3)
    for i in range(len(dataset)):
        sample = dataset[i]
        position, z = dataset.index[i]
        volume = volumes[position]
        origin = sample["crop_origin"]
        np.testing.assert_array_equal(sample["image"][0].numpy(), window_at(cached_full(volume)[z], origin, 32))
        labels = window_at(volume.label_full()[z], origin, 32)
        expected = {"liver": [labels >= 1], "lesion": [labels == 2], "both": [labels >= 1, labels == 2]}[target]
        np.testing.assert_array_equal(sample["mask"].numpy(), np.stack(expected).astype(np.float32))
        assert sample["label"].item() == float(sample["mask"].any())
        assert sample["volume_index"] == position and sample["slice_index"] == z


def test_context_channels_repeat_the_volume_ends_and_read_zero_beyond_the_roi(volumes):
    context = 3
    dataset = LiverCropDataset(volumes, range(3), crop_size=32, context_slices=context)
    full = cached_full(volumes[0])
    torch.manual_seed(4)
    for i in np.flatnonzero(dataset.index[:, 0] == 0):
        sample = dataset[i]
        z = dataset.index[i, 1]
        neighbours = np.clip(np.arange(z - context, z + context + 1), 0, volumes[0].num_slices - 1)
        np.testing.assert_array_equal(sample["image"].numpy(), window_at(full[neighbours], sample["crop_origin"], 32))
    first = dataset[int(np.flatnonzero(dataset.index[:, 0] == 0)[0])]
    assert first["slice_index"] == 2 and volumes[0].roi_box[0][0] == 1
    assert not first["image"][:2].any() and first["image"][2].any()  # slice 0 (twice, clipped) lies outside the ROI


def test_reproducible_under_torch_manual_seed(volumes):
    dataset = LiverCropDataset(volumes, range(3), crop_size=32, crop_margin=16)

    def origins(seed):
        torch.manual_seed(seed)
        return torch.stack([dataset[i]["crop_origin"] for i in range(len(dataset))])

    assert torch.equal(origins(0), origins(0))
    assert not torch.equal(origins(0), origins(1))


def test_slice_labels(volumes):
    dataset = LiverCropDataset(volumes, range(3), target="lesion", crop_size=32)
    expected = [bool((volumes[p].label_full()[z] == 2).any()) for p, z in dataset.index]
    assert dataset.slice_labels().tolist() == expected and 0 < sum(expected) < len(expected)
    assert LiverCropDataset(volumes, range(3), target="liver", crop_size=32).slice_labels().all()


def test_augmented_crops(volumes):
    dataset = LiverCropDataset(volumes, range(3), target="both", crop_size=32, transform=training_augmentation(prob=1.0))
    torch.manual_seed(5)
    for i in range(0, len(dataset), 4):
        sample = dataset[i]
        assert type(sample["image"]) is torch.Tensor and sample["image"].shape == (1, 32, 32)
        assert sample["mask"].shape == (2, 32, 32) and set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert sample["label"].item() == float(sample["mask"].bool().any())


def test_volume_dataset(volumes):
    dataset = VolumeDataset(volumes, [4, 8, 9])
    assert len(dataset) == 3
    for i, volume in enumerate(volumes):
        sample = dataset[i]
        assert set(sample) == {"image", "roi_image", "roi_box", "full_shape", "spacing", "volume_index", "volume"}
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (10, 32, 32)
        np.testing.assert_array_equal(sample["image"].numpy(), volume.image.astype(np.float32))
        assert sample["roi_image"].dtype == torch.float32
        np.testing.assert_array_equal(sample["roi_image"].numpy(), volume.roi_image.astype(np.float32))
        assert sample["roi_box"].dtype == torch.int64 and sample["roi_box"].tolist() == [list(a) for a in volume.roi_box]
        assert sample["roi_image"].shape == tuple((sample["roi_box"][:, 1] - sample["roi_box"][:, 0]).tolist())
        assert sample["full_shape"].dtype == torch.int64 and sample["full_shape"].tolist() == [10, 64, 64]
        assert sample["spacing"].dtype == torch.float64 and sample["spacing"].tolist() == [4.0, 1.5, 1.5]
        assert (sample["volume_index"], sample["volume"]) == ([4, 8, 9][i], volume.volume_id)
        # the model can read any full-resolution box from the unbatched sample as from the cache
        box = ((1, 6), (-5, 40), (20, 70))
        np.testing.assert_array_equal(read_box(sample["roi_image"].numpy(), sample["roi_box"].tolist(), box, np.float32), volume.read_image(box))
