"""The real-data path on one real abdominal CT with a liver mask (tests/data/real-ct-sample, see SOURCE.md)."""


import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import PreprocessSettings, to_display
from datamodules.io.nifti import discover, load_pair
from lightning_modules.metrics.slice_volume import volume_dice_hausdorff
from lightning_modules.metrics.volume_scoring import summarize_volumes
from lightning_modules.metrics.slice_records import SliceRecords
from tests.conftest import REAL_CT


@pytest.fixture(scope="module")
def real():
    pairs = discover(REAL_CT)
    assert [p.volume_id for p in pairs] == ["0"]
    return pairs[0], load_pair(pairs[0])


def test_loading_orientation_spacing_and_hu(real):
    _, (hu, label, spacing) = real
    assert hu.shape == label.shape == (122, 101, 30)
    assert spacing == (3.0, 3.0, 3.0)
    assert (hu.min(), hu.max()) == (-1100.0, 1207.0)
    assert set(np.unique(label)) == {0, 1} and int(label.sum()) == 38_634
    # plausible anatomy in canonical RAS: liver HU around 40-80, liver on the patient's right (high x)
    assert 30 < np.median(hu[label == 1]) < 90
    body = hu > -500
    assert np.argwhere(label == 1)[:, 0].mean() > np.argwhere(body)[:, 0].mean()


def test_reoriented_copy_loads_identically(real, tmp_path):
    files, (hu, label, spacing) = real
    for name in ("volume-0.nii.gz", "segmentation-0.nii.gz"):
        image = nib.load(REAL_CT / name)
        lps = image.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))  # store as L, P, S
        assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
        nib.save(lps, tmp_path / name)
    hu2, label2, spacing2 = load_pair(discover(tmp_path)[0])
    np.testing.assert_array_equal(hu2, hu)
    np.testing.assert_array_equal(label2, label)
    assert spacing2 == spacing


def test_cache_windowing(real, tmp_path):
    files, (hu, label, _) = real
    entry = build_cache([files], tmp_path, PreprocessSettings(-100.0, 600.0, 64), workers=1, progress=False)[0]
    volume = CachedVolume(entry)
    assert volume.image.shape == (30, 64, 64) and volume.spacing == (3.0, 3.0, 3.0)
    image = volume.image.astype(np.float32)
    assert image.min() == 0.0 and image.max() <= 1.0  # air clipped to the window's floor
    # liver pixels land where the window maps the liver's HU
    expected = (np.median(hu[label == 1]) + 100) / 700
    assert abs(np.median(image[np.asarray(volume.label) == 1]) - expected) < 0.03
    assert int(volume.label_full().sum()) == 38_634


def shifted(mask: np.ndarray, axis: int, k: int) -> np.ndarray:
    out = np.zeros_like(mask)
    source = [slice(None)] * mask.ndim
    target = [slice(None)] * mask.ndim
    source[axis], target[axis] = slice(0, mask.shape[axis] - k), slice(k, None)
    out[tuple(target)] = mask[tuple(source)]
    return out


def test_mask_against_itself(real):
    _, (_, label, _) = real
    truth = to_display(label >= 1)[None]
    figures = volume_dice_hausdorff(truth, truth, (3.0, 3.0, 3.0))
    assert figures == {"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0}


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_mask_against_a_shifted_copy(real, axis):
    _, (_, label, _) = real
    truth = to_display(label >= 1)[None]
    moved = shifted(truth, axis, 1)
    figures = volume_dice_hausdorff(moved, truth, (3.0, 3.0, 3.0))
    # one voxel of 3 mm: every surface point moves by exactly 3 mm or less, and some by exactly 3 mm
    assert figures["hd_volume_mm"] == pytest.approx(3.0)
    assert 0 < figures["hd95_volume_mm"] <= 3.0
    overlap = np.logical_and(moved, truth).sum()
    assert figures["dice_volume"] == pytest.approx(2 * overlap / (moved.sum() + truth.sum()), rel=1e-6)


def test_anisotropic_spacing_scales_distances(real):
    _, (_, label, _) = real
    truth = to_display(label >= 1)[None]
    moved = shifted(truth, 1, 1)  # along z
    assert volume_dice_hausdorff(moved, truth, (5.0, 0.7, 0.7))["hd_volume_mm"] == pytest.approx(5.0)


def test_pipeline_reassembly_on_real_volume(real, tmp_path):
    """Slices at training resolution -> records -> reassembled at 101x122 and compared with the real mask."""
    files, _ = real
    volume = CachedVolume(build_cache([files], tmp_path, PreprocessSettings(-100.0, 600.0, 128), workers=1, progress=False)[0])
    probs = torch.from_numpy((np.asarray(volume.label) >= 1).astype(np.float32))[:, None]
    records = SliceRecords()
    truth = probs > 0.5
    records.update(probs, truth, torch.zeros(30, dtype=torch.long), torch.arange(30))
    full = volume.label_full()[None] >= 1
    figures = summarize_volumes(records.compute(), lambda v: (full, volume.spacing), largest_component_channels=(0,))
    assert figures["dice_volume"] > 0.97
    assert figures["hd_volume_mm"] <= 3.0 * np.sqrt(2) + 1e-6  # resampling moves the boundary by at most a voxel
