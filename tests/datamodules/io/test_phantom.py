"""Tests for the synthetic LiTS-like phantom (datamodules/phantom.py)."""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from datamodules.io.phantom import (FOV_SCALE_RANGE, LESION_RADIUS_MM, PHANTOM_VERSION, lesion_statistics,
                                    make_phantom_volume, phantom_spacing, write_phantom_dataset)

SMALL = (64, 64, 24)
SMALL_SPACING = (6.0, 6.0, 10.0)  # same field of view as the default 192 x 192 x 48 at 2 x 2 x 5 mm


def best_window_dice(hu, label, lo_min=-200, hi_max=300, step=5):
    """Best liver Dice over all HU windows [lo, hi] on a 5 HU grid, from cumulative histograms."""
    liver = label >= 1
    h = hu.astype(np.int64)
    inside = (h >= lo_min) & (h <= hi_max)
    n = hi_max - lo_min + 1
    cum_liver = np.concatenate([[0], np.bincount(h[liver & inside] - lo_min, minlength=n).cumsum()])
    cum_other = np.concatenate([[0], np.bincount(h[~liver & inside] - lo_min, minlength=n).cumsum()])
    grid = np.arange(lo_min, hi_max + 1, step)
    lo, hi = np.meshgrid(grid, grid, indexing="ij")
    lo, hi = lo[hi >= lo], hi[hi >= lo]
    tp = cum_liver[hi - lo_min + 1] - cum_liver[lo - lo_min]
    fp = cum_other[hi - lo_min + 1] - cum_other[lo - lo_min]
    return float((2 * tp / (liver.sum() + tp + fp)).max())


def world_centroid_x(img, mask):
    """Mean world x (RAS mm) of the voxels in ``mask`` (indexed like ``img``'s stored array)."""
    ijk = np.argwhere(mask)
    return float(nib.affines.apply_affine(img.affine, ijk)[:, 0].mean())


def test_version_is_int():
    assert isinstance(PHANTOM_VERSION, int)


def test_deterministic_per_seed_and_seeds_differ():
    hu_a, lab_a = make_phantom_volume(3, SMALL, SMALL_SPACING)
    hu_b, lab_b = make_phantom_volume(3, SMALL, SMALL_SPACING)
    assert hu_a.tobytes() == hu_b.tobytes() and lab_a.tobytes() == lab_b.tobytes()
    hu_c, lab_c = make_phantom_volume(4, SMALL, SMALL_SPACING)
    assert not np.array_equal(hu_a, hu_c)
    assert not np.array_equal(lab_a, lab_c)


@pytest.mark.parametrize("seed", range(6))
def test_shapes_dtypes_labels_and_z_extent(seed):
    hu, label = make_phantom_volume(seed, SMALL, SMALL_SPACING)
    assert hu.shape == label.shape == SMALL
    assert hu.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2}
    assert -1024 <= hu.min() and hu.max() <= 3071
    assert hu[0, 0, 0] < -900  # air in the corner
    # LiTS labels lesions 2 instead of 1: each lesion is embedded in liver tissue and darker than it.
    lesions, n = ndimage.label(label == 2)
    for i in range(1, n + 1):
        assert (ndimage.binary_dilation(lesions == i) & (label == 1)).any()
    if n:
        assert np.median(hu[label == 2]) < np.median(hu[label == 1])
    per_slice = (label >= 1).sum(axis=(0, 1))
    assert per_slice[0] == 0 and per_slice[-1] == 0  # top and bottom slices have no liver
    assert per_slice[len(per_slice) // 2] > 0


def test_lesion_count_varies():
    counts = [int((make_phantom_volume(s, SMALL, SMALL_SPACING)[1] == 2).sum()) for s in range(12)]
    assert any(c > 0 for c in counts) and any(c == 0 for c in counts)


def test_anatomy_in_ras_frame():
    hu, label = make_phantom_volume(0, SMALL, SMALL_SPACING)
    liver = label >= 1
    body_x = np.argwhere(hu > -500)[:, 0].mean()
    assert np.argwhere(liver)[:, 0].mean() > body_x + 5  # patient's right = +x in RAS
    # Spine (bone) is posterior (low y) and present on every slice.
    bone = hu > 250
    assert bone.any(axis=(0, 1)).all()
    assert np.argwhere(bone)[:, 1].mean() < np.argwhere(hu > -500)[:, 1].mean()


def test_written_dataset(tmp_path):
    paths = write_phantom_dataset(tmp_path, volumes=2, seed=5, shape=SMALL, spacing=SMALL_SPACING)
    assert paths == [tmp_path / "volume-0.nii.gz", tmp_path / "volume-1.nii.gz"]
    expected_names = {f"{kind}-{i}.nii.gz" for kind in ("volume", "segmentation") for i in range(2)}
    assert {p.name for p in tmp_path.iterdir()} == expected_names
    for i in range(2):
        vol = nib.load(tmp_path / f"volume-{i}.nii.gz")
        seg = nib.load(tmp_path / f"segmentation-{i}.nii.gz")
        hu, label = make_phantom_volume(5 * 100003 + i, SMALL, SMALL_SPACING)
        for img, dtype in ((vol, np.int16), (seg, np.uint8)):
            assert img.get_data_dtype() == dtype
            assert np.allclose(img.header.get_zooms(), phantom_spacing(5 * 100003 + i, SMALL_SPACING))
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            assert img.header.get_xyzt_units()[0] == "mm"
            assert np.allclose(img.affine, seg.affine)
        assert abs(vol.affine[2, 3]) > 100  # realistic scanner origin, not 0
        canon_vol, canon_seg = nib.as_closest_canonical(vol), nib.as_closest_canonical(seg)
        assert np.array_equal(np.asanyarray(canon_vol.dataobj), hu)
        assert np.array_equal(np.asanyarray(canon_seg.dataobj), label)
        # Liver on the patient's right (world +x), from the stored (LPS) array and its own affine.
        stored_hu, stored_label = np.asanyarray(vol.dataobj), np.asanyarray(seg.dataobj)
        assert world_centroid_x(seg, stored_label >= 1) > world_centroid_x(vol, stored_hu > -500) + 20


def test_write_is_idempotent_and_completes_partial_pairs(tmp_path):
    write_phantom_dataset(tmp_path, volumes=2, seed=1, shape=SMALL, spacing=SMALL_SPACING)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    write_phantom_dataset(tmp_path, volumes=2, seed=1, shape=SMALL, spacing=SMALL_SPACING)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    # A pair whose volume is missing (e.g. a killed run) is written again; others are untouched.
    (tmp_path / "volume-1.nii.gz").unlink()
    write_phantom_dataset(tmp_path, volumes=2, seed=1, shape=SMALL, spacing=SMALL_SPACING)
    assert set(p.name for p in tmp_path.iterdir()) == set(mtimes)
    assert (tmp_path / "volume-0.nii.gz").stat().st_mtime_ns == mtimes["volume-0.nii.gz"]
    data = np.asanyarray(nib.as_closest_canonical(nib.load(tmp_path / "volume-1.nii.gz")).dataobj)
    assert np.array_equal(data, make_phantom_volume(1 * 100003 + 1, SMALL, SMALL_SPACING)[0])


def test_progress_bar_option(tmp_path):
    assert len(write_phantom_dataset(tmp_path, volumes=1, shape=SMALL, spacing=SMALL_SPACING, progress=True)) == 1


def test_not_solvable_by_a_hu_window():
    hu, label = make_phantom_volume(0)  # default size: the real use case
    liver_hu = hu[label == 1]
    assert 45 < np.median(liver_hu) < 130  # unenhanced ~60, portal-venous ~100-130
    # portal-venous CT makes the liver the biggest bright organ, as in real CT, but the spleen, kidneys and
    # vessels enhance as much or more: a window still misses a sixth of it or more
    assert best_window_dice(hu, label) < 0.85


def test_lesions_are_learnable_contrast_and_most_volumes_have_one():
    # lesions 20-70 HU below the liver, against 10-15 HU noise
    with_lesions = 0
    for seed in range(8):
        hu, label = make_phantom_volume(seed)
        if (label == 2).any():
            with_lesions += 1
            assert np.median(hu[label == 1]) - np.median(hu[label == 2]) > 15  # blur and partial volume shave a few HU
    assert with_lesions >= 5  # 1 in 8 is lesion-free by design


def test_parallel_writers_write_the_same_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_phantom_dataset(one, volumes=3, seed=2, shape=SMALL, spacing=SMALL_SPACING, workers=1)
    write_phantom_dataset(two, volumes=3, seed=2, shape=SMALL, spacing=SMALL_SPACING, workers=2)
    for name in sorted(p.name for p in one.iterdir()):
        a, b = nib.load(one / name), nib.load(two / name)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)) and np.allclose(a.affine, b.affine)


def test_field_of_view_varies_and_the_spacing_says_so():
    """The same body fills more or less of the slice, as across LiTS' scanners; the written spacing is what
    makes a body's width in mm the same whatever the field of view."""
    seeds = range(12)
    scales = [phantom_spacing(s, (2.0, 2.0, 5.0))[0] / 2.0 for s in seeds]
    assert FOV_SCALE_RANGE[0] <= min(scales) and max(scales) <= FOV_SCALE_RANGE[1]
    assert max(scales) - min(scales) > 0.2
    assert all(phantom_spacing(s, (2.0, 2.0, 5.0))[2] == 5.0 for s in seeds)
    widths_px, widths_mm = [], []
    for seed in (scales.index(min(scales)), scales.index(max(scales))):
        hu, _ = make_phantom_volume(seed, SMALL, SMALL_SPACING)
        body = np.argwhere((hu[:, :, SMALL[2] // 2] > -500))[:, 0]
        widths_px.append(body.max() - body.min() + 1)
        widths_mm.append(widths_px[-1] * phantom_spacing(seed, SMALL_SPACING)[0])
    assert widths_px[0] > widths_px[1] * 1.15  # the small field of view shows a bigger body
    assert abs(widths_mm[0] - widths_mm[1]) < 0.15 * widths_mm[0]  # bodies are 300-340 mm wide in both


def test_contrast_phase_moves_the_spleen_past_the_liver():
    """Unenhanced, the spleen is darker than the liver; portal-venous, both are ~100+ HU and the spleen can be
    the brighter: neither HU nor its order tells them apart, only position and shape."""
    liver_minus_spleen, liver_hu = [], []
    for seed in range(10):
        hu, label = make_phantom_volume(seed, SMALL, SMALL_SPACING)
        x = np.arange(SMALL[0])[:, None, None]
        left = (x < SMALL[0] * 0.4) & (label == 0) & (hu > 30) & (hu < 250)  # the spleen and its neighbours
        liver_hu.append(np.median(hu[label == 1]))
        liver_minus_spleen.append(liver_hu[-1] - np.median(hu[left]))
    assert min(liver_hu) < 75 and max(liver_hu) > 95
    assert np.ptp(liver_minus_spleen) > 20


def test_lesions_follow_the_lits_ranges():
    stats = lesion_statistics(range(8), shape=(96, 96, 24), spacing=(4.0, 4.0, 10.0))
    assert 0 < stats["lesion_free_share"] < 0.5
    assert stats["lesions_max"] >= 3
    small = 4 / 3 * np.pi * (2 * LESION_RADIUS_MM[0]) ** 3 / 1000  # cm3: twice the smallest radius
    assert stats["lesion_cm3_min"] < small and stats["lesion_cm3_max"] > 20
