"""lits predict's file handling: which inputs it finds, how it names outputs, the grid it writes on, and the guard
around the user's files (nothing replaced that it must not, a partly done folder resumed, bad inputs refused first)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules import DataError
from datamodules.errors import ConfigError
from datamodules.io.preprocess import to_display
from experiments.commands.predict import CascadePredictor, from_display, predict_main, to_canonical, to_input_grid
from experiments.commands.predict_outputs import find_inputs, output_name
from lightning_modules import BaselineUNet, CombinedLiverLesion, SegmentationTask
from lightning_modules.base import SUITE_KEY
from tests.synthetic import tiny_volume, write_pair


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


# -- the user's files: nothing replaced that must not be, a partly done folder resumed, bad inputs refused first --
@pytest.fixture(scope="module")
def liver_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return save_task(BaselineUNet(base_channels=4), tmp_path_factory.mktemp("model") / "liver.ckpt")


def lits_folder(folder: Path, volumes: int = 2) -> Path:
    for i in range(volumes):
        write_pair(folder, str(i), *tiny_volume(i, shape=(32, 32, 6)))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(*argv, match: str) -> str:
    with pytest.raises(DataError, match=match) as caught:
        predict_main([str(a) for a in argv])
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_predict_never_writes_over_its_own_inputs_or_their_truth(liver_model, tmp_path):
    data = lits_folder(tmp_path / "data")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "scan.nii.gz").write_bytes((data / "volume-0.nii.gz").read_bytes())
    before = snapshot(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        # LiTS: the output segmentation-0.nii would sit on the truth segmentation-0.nii.gz beside volume-0
        refused(liver_model, "--input", data, "--output", data, *overwrite, match=r"segmentation-0\.nii would replace .*segmentation-0\.nii\.gz")
        refused(liver_model, "--input", data / "volume-1.nii.gz", "--output", data, *overwrite, match="segmentation-1.nii.gz")
        # any other name: the label map would take the CT's own name
        refused(liver_model, "--input", scans, "--output", scans, *overwrite, match=r"scan\.nii\.gz would replace .*scans/scan\.nii\.gz")
    assert snapshot(tmp_path) == before
    # a folder of its own inside the input folder: its predictions are not taken for inputs
    predict_main([liver_model, "--input", str(scans), "--output", str(scans / "predictions")])
    assert (scans / "predictions" / "scan.nii.gz").is_file() and [p.name for p in find_inputs(scans, skip=scans / "predictions")] == ["scan.nii.gz"]


def test_an_existing_output_is_replaced_only_with_overwrite(liver_model, tmp_path):
    data = lits_folder(tmp_path / "data", volumes=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation-0.nii").write_text("the user's own notes")
    refused(liver_model, "--input", data, "--output", out, match=r"out/segmentation-0\.nii exists .*volume-0.nii.gz.*--overwrite")
    assert (out / "segmentation-0.nii").read_text() == "the user's own notes"
    predict_main([liver_model, "--input", str(data), "--output", str(out), "--overwrite"])
    assert nib.load(out / "segmentation-0.nii").shape == (32, 32, 6)
    # a folder of ground truths given as --output: a label map of the right shape, but not one lits predict wrote
    truths = tmp_path / "truths"
    truths.mkdir()
    nib.save(nib.load(data / "segmentation-0.nii.gz"), truths / "segmentation-0.nii")
    before = snapshot(truths)
    refused(liver_model, "--input", data, "--output", truths, match=r"segmentation-0\.nii exists .*not written by lits predict")
    assert snapshot(truths) == before


def test_temporary_files_of_a_killed_run_are_not_inputs(tmp_path):
    touch(tmp_path / "scan.nii.gz")
    (tmp_path / ".tmp-xyz-volume-1.nii.gz").write_bytes(b"half a volume")
    assert [p.name for p in find_inputs(tmp_path)] == ["scan.nii.gz"]


def test_a_partly_done_folder_is_resumed(liver_model, tmp_path, capsys):
    data = lits_folder(tmp_path / "data")
    out = tmp_path / "out"
    predict_main([liver_model, "--input", str(data), "--output", str(out)])
    done = snapshot(out)
    assert sorted(done) == ["segmentation-0.nii", "segmentation-1.nii"]
    # killed while writing case 1: its temporary file is left, its output is not
    (out / "segmentation-1.nii").unlink()
    (out / ".tmp-node7-4242-0a1b2c3d-segmentation-1.nii").write_bytes(b"cut short")
    first = (out / "segmentation-0.nii").stat().st_mtime_ns
    capsys.readouterr()
    predict_main([liver_model, "--input", str(data), "--output", str(out)])
    assert "skipped 1 of 2 case(s)" in capsys.readouterr().out
    assert (out / "segmentation-0.nii").stat().st_mtime_ns == first
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".tmp-")} == done
    predict_main([liver_model, "--input", str(data), "--output", str(out)])
    assert "nothing to predict" in capsys.readouterr().out
    # asked for probability maps too: only the missing files are written, the label maps stay as they are
    predict_main([liver_model, "--input", str(data), "--output", str(out), "--probabilities"])
    assert (out / "segmentation-0.nii").stat().st_mtime_ns == first and (out / "segmentation-1_lesion_probability.nii.gz").is_file()
    predict_main([liver_model, "--input", str(data), "--output", str(out), "--overwrite"])
    assert (out / "segmentation-0.nii").stat().st_mtime_ns != first
    assert {k: v for k, v in snapshot(out).items() if k.startswith("segmentation-") and k.endswith(".nii")} == done


def test_a_ct_with_nan_or_infinite_voxels_is_refused_before_anything_is_written(liver_model, tmp_path):
    data = lits_folder(tmp_path / "data")
    hu = np.asarray(nib.load(data / "volume-1.nii.gz").dataobj).astype(np.float32)
    hu[0, 0, :3], hu[1, 1, 0], hu[2, 2, 0] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 4.0, 1.0])), data / "volume-1.nii.gz")
    refused(liver_model, "--input", data, "--output", tmp_path / "out", match=r"volume-1\.nii\.gz: 5 of 6144 voxels are NaN or infinite")
    assert not [p for p in (tmp_path / "out").iterdir()]  # not even case 0, which comes first


def test_an_input_linked_from_elsewhere_is_still_an_input(liver_model, tmp_path):
    """An input that is a link to a file in the output folder: the output would replace the file it points to."""
    real = tmp_path / "data" / "scan.nii.gz"
    real.parent.mkdir()
    nib.save(nib.Nifti1Image(tiny_volume(0, shape=(32, 32, 6))[0], np.eye(4)), real)
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "scan.nii.gz").symlink_to(real)
    before = real.read_bytes()
    refused(liver_model, "--input", tmp_path / "scans", "--output", real.parent, "--overwrite", match=r"scan\.nii\.gz would replace")
    assert real.read_bytes() == before


@pytest.mark.parametrize("argument", [["--batch_size", "0"], ["--device", "tpu:9"], ["--device", "cuda:99"]])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, argument):
    lits_folder(tmp_path / "data", volumes=1)
    with pytest.raises(ConfigError, match=f"{argument[0]} {argument[1]}") as caught:
        predict_main([str(tmp_path / "no-model.ckpt"), "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), *argument])
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_a_run_folder_with_an_empty_metrics_json_is_one_line(tmp_path):
    # a run killed while writing metrics.json (or emptied by hand) is unfinished: one line, no JSON traceback
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("")
    write_pair(tmp_path / "data", 0, *tiny_volume(0))
    with pytest.warns(UserWarning, match="empty or cut short"), pytest.raises(Exception) as error:
        predict_main([str(run), "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out")])
    assert error.type.__name__ == "CheckpointError" and "\n" not in str(error.value)
    assert "neither a checkpoint nor a finished run folder" in str(error.value)
