"""3D training data: the z-resampled cache, the way back to the original slices, random 3D crops, in-plane augmentation."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from monai.transforms import Rotate

from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import PreprocessSettings, foreground_box
from datamodules.augment.sample import InPlaneAugmentation
from datamodules.datasets.crops3d import Crop3DDataset
from datamodules.errors import ConfigError
from datamodules.io.nifti import discover
from datamodules.io.volume3d import (
    interpolate_z,
    original_positions,
    resample_volume,
    resampled_positions,
    to_original_slices,
)
from tests.synthetic import tiny_volume, write_pair

# 40 x 40 x 20 voxels of 1.5 x 1.5 x 5 mm, cached at 32 x 32 in-plane: 39 slices at 2.5 mm
SETTINGS = PreprocessSettings(-100.0, 600.0, 32)
AFFINE_5MM = np.diag([1.5, 1.5, 5.0, 1.0])
CROP = (16, 16, 16)
SAMPLE_KEYS = {"image", "mask", "label", "volume_index", "volume", "crop_origin"}


def make_cache(root, count):
    for i in range(count):
        write_pair(root / "data", str(i), *tiny_volume(i, shape=(40, 40, 20)), affine=AFFINE_5MM)
    return [CachedVolume(e) for e in build_cache(discover(root / "data"), root / "cache", SETTINGS, workers=1, progress=False)]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    volumes = make_cache(tmp_path_factory.mktemp("volume3d"), 2)
    assert all(v.label_counts[2] for v in volumes)  # each has a lesion at this size
    return volumes


def test_z_grid_starts_on_the_first_slice_and_covers_the_last():
    positions = resampled_positions(20, 5.0, 2.5)
    assert len(positions) == 39  # ceil(19 * 5 / 2.5) + 1: slice centres, not the 100 mm extent (40)
    np.testing.assert_array_equal(positions[::2], np.arange(20))  # original slice i is resampled slice 2i
    positions = resampled_positions(10, 4.0, 2.5)
    assert len(positions) == 16 and positions[-1] == 9.375  # one slice past the last, none missing
    np.testing.assert_allclose(np.diff(positions) * 4.0, 2.5)
    assert len(resampled_positions(1, 5.0, 2.5)) == 1
    np.testing.assert_array_equal(resampled_positions(7, 2.5, 2.5), np.arange(7))
    for num_slices, sz, s in ((20, 5.0, 2.5), (10, 4.0, 2.5), (300, 0.7, 2.5)):
        back = original_positions(num_slices, sz, s)
        assert back[0] == 0 and back[-1] <= len(resampled_positions(num_slices, sz, s)) - 1  # no extrapolation


def test_resampled_volume_shape_dtype_and_content(volumes):
    volume = volumes[0]
    resampled = resample_volume(volume)  # 2.5 mm by default
    assert resampled.shape == resampled.image.shape == resampled.label.shape == (39, 32, 32)
    assert isinstance(resampled.image, np.memmap) and resampled.image.dtype == np.float16 and resampled.label.dtype == np.uint8
    image, label = np.asarray(resampled.image, np.float32), np.asarray(resampled.label)
    source = np.asarray(volume.image, np.float32)
    np.testing.assert_allclose(image[::2], source, atol=1e-3)  # on the original slices
    np.testing.assert_allclose(image[1::2], (source[:-1] + source[1:]) / 2, atol=1e-3)  # linear halfway
    np.testing.assert_array_equal(label[::2], volume.label)
    np.testing.assert_array_equal(label[1::2], volume.label[1:])  # a tie (x.5) takes the upper slice
    np.testing.assert_array_equal(resampled.z_positions, resampled_positions(20, 5.0, 2.5))
    assert resampled.liver_box == tuple(map(tuple, foreground_box(label >= 1)))
    assert resampled.image_min == image.min()
    np.testing.assert_array_equal(resampled.slice_voxels["lesion"], (label == 2).sum(axis=(1, 2)))
    coarse = resample_volume(volume, 7.5)  # another spacing, beside it
    assert coarse.shape == (math.ceil(19 * 5 / 7.5) + 1, 32, 32) == (14, 32, 32)
    assert {"image3d_2.5mm.npy", "label3d_2.5mm.npy", "volume3d_2.5mm.json", "image3d_7.5mm.npy"} <= {
        p.name for p in volume.entry.iterdir()
    }


def test_built_once_reused_and_rebuilt_when_missing_or_killed(tmp_path, monkeypatch):
    volume = make_cache(tmp_path, 1)[0]
    first = resample_volume(volume, 2.5)
    files = [volume.entry / name for name in ("image3d_2.5mm.npy", "label3d_2.5mm.npy", "volume3d_2.5mm.json")]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = resample_volume(volume, 2.5)
    assert [f.stat().st_mtime_ns for f in files] == stamps and again.meta == first.meta  # not rewritten

    files[0].unlink()
    (volume.entry / ".tmp-image3d_2.5mm-deadbeef.npy").write_bytes(b"half")  # left by a killed build
    rebuilt = resample_volume(volume, 2.5)
    assert files[0].exists() and files[2].stat().st_mtime_ns != stamps[2]
    np.testing.assert_array_equal(rebuilt.image, first.image)
    assert not list(volume.entry.glob(".tmp-*"))

    class Killed(Exception):
        pass

    def dies_while_writing(path, array):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY half")
        raise Killed

    files[1].unlink()
    monkeypatch.setattr(np, "save", dies_while_writing)
    with pytest.raises(Killed):
        resample_volume(volume, 2.5)
    assert not files[1].exists() and not list(volume.entry.glob(".tmp-*"))  # no half-written file under any name
    monkeypatch.undo()
    np.testing.assert_array_equal(resample_volume(volume, 2.5).label, first.label)


def test_round_trip_to_original_slices(volumes):
    volume = volumes[1]
    resampled = resample_volume(volume)
    labels = to_original_slices(torch.from_numpy(np.array(resampled.label))[None], volume)
    assert labels.shape == (1, 20, 32, 32) and labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels[0].numpy(), volume.label)
    probabilities = to_original_slices(torch.from_numpy(np.array(resampled.image, np.float32))[None], volume)
    assert probabilities.dtype == torch.float32
    np.testing.assert_allclose(probabilities[0].numpy(), np.asarray(volume.image, np.float32), atol=2e-3)
    with pytest.raises(ValueError, match=r"not \(C, 39, S, S\)"):
        to_original_slices(torch.zeros(1, 40, 32, 32), volume)

    # the grid for other spacings, with uneven ratios: labels exact where the new spacing is not coarser
    generator = np.random.default_rng(0)
    for num_slices, sz, s in ((13, 4.0, 2.5), (11, 3.0, 2.5), (9, 2.5, 2.5), (17, 1.0, 0.7)):
        labels = torch.from_numpy(generator.integers(0, 3, (1, num_slices, 3, 3), dtype=np.uint8))
        there = interpolate_z(labels, resampled_positions(num_slices, sz, s), "nearest")
        assert torch.equal(interpolate_z(there, original_positions(num_slices, sz, s), "nearest"), labels)
        z = torch.arange(num_slices, dtype=torch.float64)[None, :, None, None]
        smooth = torch.sin(z / num_slices * 2.0).expand(2, num_slices, 3, 3).float()
        there = interpolate_z(smooth, resampled_positions(num_slices, sz, s), "linear")
        back = interpolate_z(there, original_positions(num_slices, sz, s), "linear")
        np.testing.assert_allclose(back.numpy(), smooth.numpy(), atol=1e-2)  # two linear interpolations: second-order error


def test_crop_sample_layout(volumes):
    dataset = Crop3DDataset(volumes, [4, 7], crop_size=CROP, target="both", samples_per_volume=3)
    assert len(dataset) == 6
    torch.manual_seed(0)
    sample = dataset[4]
    assert set(sample) == SAMPLE_KEYS
    assert sample["image"].shape == (1, 16, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (2, 16, 16, 16) and sample["mask"].dtype == torch.float32
    assert sample["label"].shape == () and sample["label"].dtype == torch.float32
    assert sample["crop_origin"].shape == (3,) and sample["crop_origin"].dtype == torch.int64
    assert (sample["volume_index"], sample["volume"]) == (7, volumes[1].volume_id)
    assert torch.all(sample["mask"][1] <= sample["mask"][0])
    resampled = resample_volume(volumes[1])
    (z0, y0, x0), (d, h, w) = sample["crop_origin"].tolist(), CROP
    np.testing.assert_array_equal(sample["image"][0].numpy(), resampled.image[z0 : z0 + d, y0 : y0 + h, x0 : x0 + w])
    assert float(sample["label"]) == float(sample["mask"].any())
    copy = pickle.loads(pickle.dumps(dataset))  # as DataLoader workers receive it: no arrays inside
    assert len(pickle.dumps(dataset)) < 50_000 and copy[0]["image"].shape == (1, 16, 16, 16)


def test_volume_smaller_than_the_crop_is_padded(volumes):
    dataset = Crop3DDataset(volumes[:1], [0], crop_size=(48, 48, 48), target="liver")
    resampled = dataset.volumes[0]
    sample = dataset[0]
    assert sample["crop_origin"].tolist() == [-4, -8, -8]  # (39, 32, 32) centred in (48, 48, 48)
    image, mask = sample["image"][0].numpy(), sample["mask"][0].numpy()
    np.testing.assert_array_equal(image[4:43, 8:40, 8:40], resampled.image)
    inside = np.zeros(image.shape, bool)
    inside[4:43, 8:40, 8:40] = True
    assert np.all(image[~inside] == resampled.image_min) and not mask[~inside].any()
    np.testing.assert_array_equal(mask[inside].reshape(39, 32, 32), resampled.label >= 1)


def test_positive_fraction_and_foreground_centres(volumes):
    always = Crop3DDataset(volumes, [0, 1], crop_size=CROP, target="liver", positive_fraction=1.0, samples_per_volume=5)
    torch.manual_seed(0)
    assert all(always[i]["label"] == 1 and always[i]["mask"].any() for i in range(len(always)))

    half = Crop3DDataset(volumes, [0, 1], crop_size=CROP, target="liver", positive_fraction=0.5)
    resampled = half.volumes[0]
    label = np.asarray(resampled.label)
    draws = [half.draw_crop(0) for _ in range(1500)]
    positives = np.array([centre for centre, _, positive in draws if positive])
    negatives = np.array([centre for centre, _, positive in draws if not positive])
    assert 0.45 < len(positives) / len(draws) < 0.55
    assert np.all(label[tuple(positives.T)] >= 1)
    # uniform over the foreground voxels: slices drawn in proportion to their liver voxels
    expected = len(positives) * resampled.slice_voxels["liver"] / resampled.slice_voxels["liver"].sum()
    observed = np.bincount(positives[:, 0], minlength=len(expected))
    assert np.all(np.abs(observed - expected) < 4 * np.sqrt(expected) + 3)
    # the rest anywhere: every position on every axis, background included
    assert [(negatives[:, a].min(), negatives[:, a].max()) for a in range(3)] == [(0, 38), (0, 31), (0, 31)]
    assert np.any(label[tuple(negatives.T)] == 0)
    for (cz, cy, cx), (z0, y0, x0), _ in draws:  # the crop lies in the volume and holds its centre
        assert 0 <= z0 <= cz < z0 + 16 <= 39 and 0 <= y0 <= cy < y0 + 16 <= 32 and 0 <= x0 <= cx < x0 + 16 <= 32


def test_lesion_crops_are_centred_in_the_grown_liver_box(volumes):
    margin = 2
    dataset = Crop3DDataset(volumes, [0, 1], crop_size=CROP, target="lesion", positive_fraction=0.3, crop_margin=margin)
    torch.manual_seed(1)
    for position, resampled in enumerate(dataset.volumes):
        label = np.asarray(resampled.label)
        grown = [(max(0, a - margin), min(n, b + margin)) for (a, b), n in zip(resampled.liver_box, resampled.shape)]
        draws = [dataset.draw_crop(position) for _ in range(400)]
        centres = np.array([centre for centre, _, _ in draws])
        for axis, (low, high) in enumerate(grown):
            assert centres[:, axis].min() == low and centres[:, axis].max() == high - 1
        positives = np.array([centre for centre, _, positive in draws if positive])
        assert len(positives) > 60 and np.all(label[tuple(positives.T)] == 2)
    sample = dataset[0]
    assert sample["mask"].shape == (1, 16, 16, 16)


def blob_volume(depth=8, size=32):
    """(1, D, S, S) image: an off-centre ellipse per slice, its radius growing with the slice (smooth edges)."""
    z, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    radius = 5 + z * 0.6
    distance = np.sqrt(((y - 12) / 1.4) ** 2 + (x - 19) ** 2)
    return torch.from_numpy(np.clip(radius + 0.5 - distance, 0, 1).astype(np.float32))[None]


def test_augmentation_keeps_image_and_mask_aligned():
    image = blob_volume()
    augmentation = InPlaneAugmentation(flip_prob=0.5, rotate_degrees=40.0, zoom_range=(0.8, 1.2), prob=1.0)
    for _ in range(4):
        out = augmentation({"image": image.clone(), "mask": (image > 0.5).float()})
        assert out["image"].shape == (1, 8, 32, 32) and out["mask"].shape == (1, 8, 32, 32)
        assert not torch.equal(out["image"], image)  # rotated and zoomed
        assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
        # the bilinear image and the nearest mask agree up to two pixels at the edge: MONAI's nearest zoom rounds
        # source positions down (see batch_augmentation.py), up to 1.2 output pixels at zoom 1.2; the blob is
        # off-centre, so a flip or rotation applied to one of them only would move it much further
        inside, mask = out["image"] > 0.5, out["mask"][0]
        grown = torch.nn.functional.max_pool2d(mask, 5, 1, 2) > 0
        shrunk = torch.nn.functional.max_pool2d(1 - mask, 5, 1, 2) == 0
        assert torch.all(inside[0] <= grown) and torch.all(shrunk <= inside[0]) and shrunk.any()

    flips = InPlaneAugmentation(flip_prob=1.0, prob=0.0)({"image": image.clone(), "mask": (image > 0.5).float()})
    assert torch.equal(flips["image"], image.flip(-1, -2)) and torch.equal(flips["mask"], (image > 0.5).float().flip(-1, -2))


def test_augmentation_never_mixes_slices():
    depth = 8
    # every slice constant, each its own value: an in-plane transform keeps them, one across slices would not
    levels = torch.linspace(0.1, 0.9, depth)
    image = levels[None, :, None, None].expand(1, depth, 24, 24).clone()
    mask = (torch.arange(depth) % 2).float()[None, :, None, None].expand(2, depth, 24, 24).clone()
    augmentation = InPlaneAugmentation(flip_prob=0.5, rotate_degrees=45.0, zoom_range=(0.7, 1.3), prob=1.0)
    for _ in range(3):
        out = augmentation({"image": image.clone(), "mask": mask.clone()})
        np.testing.assert_allclose(out["image"].numpy(), image.numpy(), atol=1e-5)
        assert torch.equal(out["mask"], mask)
    # the check sees mixing: MONAI's 3D rotation of (D, H, W) by its first angle stays in-plane, by the others it does not
    in_plane, across = Rotate(angle=(0.7, 0.0, 0.0), padding_mode="border"), Rotate(angle=(0.0, 0.7, 0.0), padding_mode="border")
    assert (in_plane(image) - image).abs().max() < 1e-5 and (across(image) - image).abs().max() > 0.1


def test_same_seed_same_samples(volumes):
    def run(seed):
        dataset = Crop3DDataset(volumes, [0, 1], crop_size=CROP, target="both", samples_per_volume=2, transform=InPlaneAugmentation(prob=1.0))
        torch.manual_seed(seed)
        return [dataset[i] for i in range(len(dataset))]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["crop_origin"], b["crop_origin"])
    assert any(not torch.equal(a["crop_origin"], b["crop_origin"]) for a, b in zip(first, other))


@pytest.mark.parametrize("crop_size", [(64, 128, 120), (8, 16, 16), (0, 16, 16), (16, 16)])
def test_crop_size_not_divisible_by_16_is_a_one_line_error(volumes, crop_size):
    with pytest.raises(ConfigError) as error:
        Crop3DDataset(volumes, [0, 1], crop_size=crop_size)
    message = str(error.value)
    assert "\n" not in message and "divisible by 16" in message and str(tuple(crop_size)) in message


def test_json_records_the_grid(volumes):
    meta = json.loads((volumes[0].entry / "volume3d_2.5mm.json").read_text())
    assert meta["shape"] == [39, 32, 32] and len(meta["z_positions"]) == 39 and meta["z_positions"][2] == 1.0
    assert meta["source"]["num_slices"] == 20 and meta["source"]["slice_spacing_mm"] == 5.0
