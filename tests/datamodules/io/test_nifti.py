"""Discovery, orientation and the one-line errors for bad input."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from datamodules.errors import DataError
from datamodules.io.nifti import VolumeFiles, discover, load_pair
from tests.synthetic import tiny_volume, write_pair


def test_discovers_lits_layout_in_subfolders(tmp_path):
    write_pair(tmp_path / "Training Batch 1", "2", *tiny_volume(0))
    write_pair(tmp_path / "Training Batch 2", "10", *tiny_volume(1))
    write_pair(tmp_path / "Training Batch 1", "1", *tiny_volume(2))
    assert [p.volume_id for p in discover(tmp_path)] == ["1", "2", "10"]


def test_discovers_msd_layout_and_ignores_macos_junk(tmp_path):
    hu, label = tiny_volume(0)
    for folder, data in (("imagesTr", hu), ("labelsTr", label)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "liver_3.nii.gz")
        (tmp_path / folder / "._liver_3.nii.gz").write_bytes(b"\x00junk")
    pairs = discover(tmp_path)
    assert [(p.volume_id, p.image.parent.name, p.label.parent.name) for p in pairs] == [("liver_3", "imagesTr", "labelsTr")]


@pytest.mark.parametrize("flips", [(0,), (1,), (0, 2), (0, 1, 2)])
def test_any_orientation_yields_the_same_canonical_arrays(tmp_path, flips):
    hu, label = tiny_volume(0)
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    reference = load_pair(VolumeFiles("a", *write_pair(tmp_path / "ras", "a", hu, label, affine)))
    stored_hu, stored_label, stored_affine = hu, label, affine.copy()
    for axis in flips:  # store flipped along `axis` with the affine that keeps world positions the same
        stored_hu, stored_label = np.flip(stored_hu, axis), np.flip(stored_label, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, hu.shape[axis] - 1
        stored_affine = stored_affine @ flip
    # and permute axes (x, y, z) -> (z, x, y) as some scanners store them
    stored_hu, stored_label = np.transpose(stored_hu, (2, 0, 1)), np.transpose(stored_label, (2, 0, 1))
    stored_affine = stored_affine[:, [2, 0, 1, 3]]
    loaded = load_pair(VolumeFiles("b", *write_pair(tmp_path / "other", "b", np.ascontiguousarray(stored_hu), np.ascontiguousarray(stored_label), stored_affine)))
    np.testing.assert_array_equal(loaded[0], reference[0])
    np.testing.assert_array_equal(loaded[1], reference[1])
    assert loaded[2] == reference[2] == (1.5, 1.5, 4.0)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_volume_without_mask(tmp_path):
    write_pair(tmp_path, "0", *tiny_volume(0))
    (tmp_path / "segmentation-0.nii.gz").unlink()
    with pytest.raises(DataError, match="volume-0.nii.gz: volume has no segmentation") as error:
        discover(tmp_path)
    _one_line(error)


def test_mask_without_volume(tmp_path):
    write_pair(tmp_path, "0", *tiny_volume(0))
    (tmp_path / "volume-0.nii.gz").unlink()
    with pytest.raises(DataError, match="segmentation-0.nii.gz: segmentation-<id> mask has no volume"):
        discover(tmp_path)


def test_mask_shape_mismatch(tmp_path):
    hu, label = tiny_volume(0)
    write_pair(tmp_path, "0", hu, label)
    nib.save(nib.Nifti1Image(label[:, :, :-1], np.diag([1.5, 1.5, 4.0, 1.0])), tmp_path / "segmentation-0.nii.gz")
    with pytest.raises(DataError, match="segmentation-0.nii.gz: mask shape .* differs"):
        load_pair(discover(tmp_path)[0])


def test_mask_affine_mismatch(tmp_path):
    hu, label = tiny_volume(0)
    write_pair(tmp_path, "0", hu, label)
    nib.save(nib.Nifti1Image(label, np.diag([1.5, 1.5, 5.0, 1.0])), tmp_path / "segmentation-0.nii.gz")
    with pytest.raises(DataError, match="segmentation-0.nii.gz: mask affine differs"):
        load_pair(discover(tmp_path)[0])


def test_truncated_gzip(tmp_path):
    image_path, _ = write_pair(tmp_path, "0", *tiny_volume(0))
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="volume-0.nii.gz: (truncated or corrupt|cannot be read)") as error:
        load_pair(discover(tmp_path)[0])
    _one_line(error)


def test_unreadable_file(tmp_path):
    write_pair(tmp_path, "0", *tiny_volume(0))
    with gzip.open(tmp_path / "volume-0.nii.gz", "wb") as handle:
        handle.write(b"this is not a nifti file" * 20)
    with pytest.raises(DataError, match="volume-0.nii.gz: cannot be read as NIfTI"):
        load_pair(discover(tmp_path)[0])


def test_labels_outside_lits_convention(tmp_path):
    hu, label = tiny_volume(0)
    label[0, 0, 0] = 5
    write_pair(tmp_path, "0", hu, label)
    with pytest.raises(DataError, match=r"segmentation-0.nii.gz: label values \[5\] outside"):
        load_pair(discover(tmp_path)[0])


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="contains no NIfTI volumes"):
        discover(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


def test_temporary_files_of_a_killed_writer_are_not_data(tmp_path):
    hu, label = tiny_volume(0)
    for folder, data in (("imagesTr", hu), ("labelsTr", label)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "liver_3.nii.gz")
    (tmp_path / "imagesTr" / ".tmp-xyz-volume-1.nii.gz").write_bytes(b"cut short")
    assert [p.volume_id for p in discover(tmp_path)] == ["liver_3"]


def test_a_ct_with_nan_or_infinite_voxels_is_refused(tmp_path):
    """The one reader of training and of the cache (``build_cache`` reads through ``load_pair``)."""
    hu, label = tiny_volume(0)
    hu = hu.astype(np.float32)
    hu[0, 0, 0], hu[1, 1, 1], hu[2, 2, 2] = np.nan, np.inf, -np.inf
    write_pair(tmp_path, "0", hu, label)
    with pytest.raises(DataError, match=r"volume-0.nii.gz: 3 of 10240 voxels are NaN or infinite") as error:
        load_pair(discover(tmp_path)[0])
    _one_line(error)
