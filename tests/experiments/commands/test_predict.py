"""lits predict's file handling: which inputs it finds, how it names outputs, and the grid it writes on."""

import nibabel as nib
import numpy as np
import pytest

from datamodules import DataError
from datamodules.io.cache import to_display
from experiments.commands.predict import find_inputs, from_display, output_name, to_canonical, to_input_grid


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_output_names_follow_lits():
    assert output_name(touch_free("volume-12.nii.gz")) == "segmentation-12.nii"
    assert output_name(touch_free("test-volume-3.nii")) == "test-segmentation-3.nii"
    assert output_name(touch_free("liver_7.nii.gz")) == "liver_7.nii.gz"


def touch_free(name):
    from pathlib import Path
    return Path("/nowhere") / name


def test_find_inputs_in_lits_msd_and_plain_folders(tmp_path):
    lits = tmp_path / "lits"
    for name in ("Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii", "Batch 2/volume-10.nii.gz", "._volume-1.nii"):
        touch(lits / name)
    assert [p.name for p in find_inputs(lits)] == ["volume-10.nii.gz", "volume-0.nii"]
    msd = tmp_path / "msd"
    touch(msd / "imagesTs" / "liver_1.nii.gz")
    touch(msd / "imagesTr" / "liver_2.nii.gz")
    assert [p.name for p in find_inputs(msd)] == ["liver_1.nii.gz"]
    plain = tmp_path / "plain"
    touch(plain / "scan.nii.gz")
    touch(plain / "segmentation-scan.nii.gz")
    assert [p.name for p in find_inputs(plain)] == ["scan.nii.gz"]
    with pytest.raises(DataError, match="no NIfTI volume"):
        find_inputs(touch(tmp_path / "empty" / "notes.txt").parent)
    with pytest.raises(DataError, match="does not exist"):
        find_inputs(tmp_path / "missing")


@pytest.mark.parametrize("ornt", [[[0, 1], [1, 1], [2, 1]], [[0, -1], [1, -1], [2, 1]], [[1, 1], [0, -1], [2, -1]], [[2, 1], [0, 1], [1, -1]]])
def test_labels_go_back_onto_the_inputs_own_grid(ornt):
    """Display (Z, rows, cols) labels made from a file's voxels map back onto exactly those voxels."""
    rng = np.random.default_rng(0)
    canonical = nib.Nifti1Image(rng.integers(0, 3, (5, 6, 7)).astype(np.uint8), np.diag([0.8, 0.9, 2.5, 1]))
    stored = canonical.as_reoriented(ornt)
    data = np.asarray(stored.dataobj)
    display = to_display(to_canonical(data, stored.affine))
    assert np.array_equal(display, to_display(np.asarray(canonical.dataobj)))
    assert np.array_equal(to_input_grid(from_display(display), stored.affine), data)
