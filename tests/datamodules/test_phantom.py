"""The synthetic LiTS-like phantom: deterministic, LiTS layout on disk, anatomically placed, not threshold-solvable."""

import nibabel as nib
import numpy as np
import pytest

from datamodules.phantom import make_phantom_volume, write_phantom_dataset

SMALL = (64, 64, 24)


def test_deterministic_per_seed():
    first, again, other = make_phantom_volume(3, SMALL), make_phantom_volume(3, SMALL), make_phantom_volume(4, SMALL)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_arrays_labels_and_liver_extent():
    hu, label = make_phantom_volume(1, SMALL)
    assert hu.shape == label.shape == SMALL and hu.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2}
    assert hu.min() <= -900 and 30 < np.median(hu[label == 1]) < 90  # air outside, liver near 60 HU
    liver_slices = (label >= 1).any(axis=(0, 1))
    assert not liver_slices[0] and not liver_slices[-1] and liver_slices[SMALL[2] // 2]


def test_lesions_are_hypodense_inside_the_liver():
    for seed in range(6):
        hu, label = make_phantom_volume(seed, SMALL)
        if (label == 2).any():
            assert np.median(hu[label == 2]) < np.median(hu[label == 1]) - 5
            return
    pytest.fail("no phantom among six seeds has a lesion")


def test_written_files_look_like_lits(tmp_path):
    paths = write_phantom_dataset(tmp_path, volumes=2, seed=5, shape=SMALL, spacing=(0.8, 0.8, 2.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmentation-0.nii.gz", "segmentation-1.nii.gz", "volume-0.nii.gz", "volume-1.nii.gz"]
    image = nib.load(paths[1])
    assert image.header.get_zooms() == (0.8, 0.8, 2.5)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    hu, label = make_phantom_volume(5 * 100003 + 1, SMALL)
    np.testing.assert_array_equal(np.asanyarray(nib.as_closest_canonical(image).dataobj), hu)
    segmentation = nib.as_closest_canonical(nib.load(tmp_path / "segmentation-1.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(segmentation.dataobj), label)
    # the liver lies on the patient's right: larger world x (RAS+) than the body's centre
    world = nib.affines.apply_affine(segmentation.affine, np.argwhere(label >= 1)).mean(0)
    body = nib.affines.apply_affine(segmentation.affine, np.argwhere(hu > -500)).mean(0)
    assert world[0] > body[0] + 0.1 * SMALL[0] * 0.8  # by more than a tenth of the field of view


def test_rerun_is_idempotent_and_leaves_no_temporary_files(tmp_path):
    write_phantom_dataset(tmp_path, volumes=1, seed=0, shape=SMALL)
    stamp = (tmp_path / "volume-0.nii.gz").stat().st_mtime_ns
    write_phantom_dataset(tmp_path, volumes=1, seed=0, shape=SMALL)
    assert (tmp_path / "volume-0.nii.gz").stat().st_mtime_ns == stamp
    assert len(list(tmp_path.iterdir())) == 2


def test_no_hu_window_segments_the_liver():
    """Spleen, kidneys, vessels and muscle share the liver's HU: the best window's Dice stays low."""
    hu, label = make_phantom_volume(0, (128, 128, 32))
    liver = label >= 1
    edges = np.arange(-200, 305, 5)
    inside = np.histogram(hu[liver], bins=np.append(edges, 10_000))[0]
    outside = np.histogram(hu[~liver], bins=np.append(edges, 10_000))[0]
    # window [edges[i], edges[j]) for all i < j at once, via cumulative counts
    cum_in, cum_out = np.concatenate([[0], np.cumsum(inside)]), np.concatenate([[0], np.cumsum(outside)])
    i, j = np.triu_indices(len(edges), k=1)
    true_positive = cum_in[j] - cum_in[i]
    predicted = true_positive + cum_out[j] - cum_out[i]
    dice = 2 * true_positive / (predicted + liver.sum())
    assert dice.max() < 0.75
