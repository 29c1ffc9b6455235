"""lits predict's file handling: which inputs it finds, how it names outputs, and the grid it writes on."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules import DataError
from datamodules.io.preprocess import to_display
from experiments.commands.predict import CascadePredictor, find_inputs, from_display, output_name, to_canonical, to_input_grid
from lightning_modules import BaselineUNet, CombinedLiverLesion, SegmentationTask
from lightning_modules.base import SUITE_KEY


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


# -- which task a checkpoint holds ------------------------------------------------------------------
class RecordingUNet(BaselineUNet):
    """A task of its own, to see ``lits predict`` ask the checkpoint's class for its predictor."""

    calls: list[str] = []

    @classmethod
    def predictor(cls, checkpoint, device):
        cls.calls.append(checkpoint)
        return super().predictor(checkpoint, device)


def save_task(task, path, class_path: str | None = None, target: str = "liver") -> str:
    """A checkpoint as a Trainer writes it (``on_save_checkpoint`` included), optionally naming another class."""
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                  "datamodule_hyper_parameters": {"image_size": 32, "hu_window": [-100.0, 600.0], "target": target},
                  "pytorch-lightning_version": pl.__version__}
    task.on_save_checkpoint(checkpoint)
    if class_path is not None:
        checkpoint[SUITE_KEY]["class_path"] = class_path
    torch.save(checkpoint, path)
    return str(path)


def without_record(path) -> str:
    """The same checkpoint as one saved before checkpoints recorded their class."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint[SUITE_KEY]
    old = Path(path).with_name("old-" + Path(path).name)
    torch.save(checkpoint, old)
    return str(old)


HU = np.random.default_rng(0).uniform(-200, 700, (4, 32, 32)).astype(np.float32)


def test_predict_takes_the_task_class_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = save_task(BaselineUNet(base_channels=4), tmp_path / "liver.ckpt", class_path=f"{__name__}.RecordingUNet")
    RecordingUNet.calls.clear()
    predictor = CascadePredictor(path, device="cpu")
    assert predictor.main.task is RecordingUNet and RecordingUNet.calls == [path]
    assert predictor.cascade is None and predictor.lesion is None
    labels = predictor(HU)["labels"]
    # an old checkpoint without the record: the class guessed as before, the same network, the same labels
    old = CascadePredictor(without_record(path), device="cpu")
    assert old.main.task is SegmentationTask and RecordingUNet.calls == [path]
    assert labels.shape == HU.shape and np.array_equal(old(HU)["labels"], labels)


def test_a_combined_checkpoint_predicts_with_its_own_cascade_with_or_without_the_record(tmp_path):
    torch.manual_seed(0)
    path = save_task(CombinedLiverLesion(base_channels=4), tmp_path / "combined.ckpt", target="both")
    assert torch.load(path, weights_only=True)[SUITE_KEY]["class_path"] == "lightning_modules.CombinedLiverLesion"
    results = []
    for checkpoint in (path, without_record(path)):
        predictor = CascadePredictor(checkpoint, device="cpu")
        assert predictor.main.task is CombinedLiverLesion and predictor.cascade is not None
        assert predictor.liver is predictor.main and predictor.lesion is predictor.main
        results.append(predictor(HU)["labels"])
    assert results[0].shape == HU.shape and np.array_equal(results[0], results[1])
