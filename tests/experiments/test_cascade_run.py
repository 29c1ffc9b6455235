"""The 2D cascade end to end: `lits run` (liver, then lesion), `lits predict` on a re-oriented scan, `lits evaluate`."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from datamodules import DataError
from experiments.commands.evaluate import evaluate_main
from experiments.commands.predict import predict_main
from lightning_modules import CheckpointError
from tests.synthetic import tiny_experiment
from tests.lits_commands import lits as run_lits


def lits(*args, cwd):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "disabled"})


def write_cascade(folder, liver_epochs=1, lesion_epochs=1):
    liver = tiny_experiment(folder, volumes=4, split=(2, 1, 1), max_epochs=liver_epochs, lr=0.003)
    lesion = yaml.safe_load(yaml.safe_dump(liver))
    lesion["model"]["init_args"].update(seg_loss="pwce_over_dice")
    lesion["data"].update(sampling="liver_roi", target="lesion", liver_roi={"crop_size": 32})
    lesion["trainer"]["max_epochs"] = lesion_epochs
    (folder / "liver.yaml").write_text(yaml.safe_dump(liver))
    (folder / "lesion.yaml").write_text(yaml.safe_dump(lesion))
    (folder / "cascade.yaml").write_text(yaml.safe_dump({"name": "cascade", "stages": [
        {"name": "liver", "config": "liver.yaml"},
        {"name": "lesion", "config": "lesion.yaml", "weights_from": "liver", "weights_arg": "model.init_args.liver_checkpoint"}]}))


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cascade")
    write_cascade(folder, liver_epochs=2, lesion_epochs=1)
    result = lits("run", "cascade.yaml", "--trainer.default_root_dir=out", cwd=folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return folder


def per_volume(path):
    return {row["volume"]: row for row in csv.DictReader(open(path))}


def test_cascade_run_reports_liver_and_lesion_figures(cascade_run):
    final = json.loads((cascade_run / "out" / "cascade" / "metrics.json").read_text())
    for stage in ("val", "test"):
        for part in ("liver", "lesion"):
            for key in ("dice", "dice_global", "voe", "rvd", "assd_mm", "mssd_mm", "hd95_mm"):
                assert np.isfinite(final[f"{stage}/{part}/{key}"]), (stage, part, key)
        assert 0 <= final[f"{stage}/lesion/lesion_recall"] <= 1 and final[f"{stage}/lesion/truth_lesions"] >= 1
    assert final["stage_metrics"]["liver"]["test/dice_volume"] > 0  # the liver stage's own figures beside the cascade's
    assert final["best_checkpoint"].endswith("lesion/checkpoints/best.ckpt")
    assert (cascade_run / "out" / "cascade" / "lesion" / "test_overlays.png").stat().st_size > 3000


def reoriented_copy(source_dir, volume_id, target_dir, ornt):
    """The volume and its mask stored in another voxel order (same patient space)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"volume-{volume_id}.nii.gz", f"segmentation-{volume_id}.nii.gz"):
        nib.save(nib.load(source_dir / name).as_reoriented(ornt), target_dir / name)


def test_predict_then_evaluate_gives_the_figures_of_lits_test(cascade_run, tmp_path):
    run = cascade_run / "out" / "cascade"
    test_volume = next(iter(per_volume(run / "lesion" / "test_per_volume.csv")))
    # the test scan stored left-right and front-back flipped (LPS) and with rows and columns swapped
    scans = tmp_path / "scans"
    reoriented_copy(cascade_run / "data", test_volume, scans, [[1, -1], [0, -1], [2, 1]])
    truth = tmp_path / "truth"
    truth.mkdir()
    (scans / f"segmentation-{test_volume}.nii.gz").rename(truth / f"segmentation-{test_volume}.nii.gz")
    predict_main([str(run), "--input", str(scans), "--output", str(tmp_path / "pred"), "--probabilities"])
    written = nib.load(tmp_path / "pred" / f"segmentation-{test_volume}.nii")
    lesion_probability = nib.load(tmp_path / "pred" / f"segmentation-{test_volume}_lesion_probability.nii.gz")
    liver_probability = np.asarray(nib.load(tmp_path / "pred" / f"segmentation-{test_volume}_liver_probability.nii.gz").dataobj)
    assert lesion_probability.shape == written.shape and lesion_probability.get_data_dtype() == np.float32
    assert liver_probability.min() >= 0 and liver_probability.max() <= 1
    assert ((np.asarray(lesion_probability.dataobj) >= 0.5) >= (np.asarray(written.dataobj) == 2)).all()  # lesions come from it
    reference = nib.load(scans / f"volume-{test_volume}.nii.gz")
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(reference.affine) != ("R", "A", "S")
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2} and (labels >= 1).any()
    # voxel by voxel against its own (re-oriented) ground truth: the same overlap as lits test found
    own_truth = np.asarray(nib.load(truth / f"segmentation-{test_volume}.nii.gz").dataobj)
    dice = 2 * ((labels >= 1) & (own_truth >= 1)).sum() / ((labels >= 1).sum() + (own_truth >= 1).sum())
    tested = per_volume(run / "lesion" / "test_per_volume.csv")[test_volume]
    assert dice == pytest.approx(float(tested["liver/dice"]), abs=1e-5)
    evaluate_main(["--pred", str(tmp_path / "pred"), "--truth", str(truth)])
    evaluated = next(csv.DictReader(open(tmp_path / "pred" / "evaluation" / "per_case.csv")))
    for key in ("liver/dice", "liver/assd_mm", "liver/hd95_mm", "lesion/dice", "lesion/voe", "lesion/mssd_mm"):
        column = key.replace("/", "_")
        assert float(evaluated[column]) == pytest.approx(float(tested[key]), rel=1e-4, abs=1e-4), key
    # the liver network alone: labels 0/1, the liver stage's own per-volume Dice
    predict_main([str(run / "liver"), "--input", str(scans), "--output", str(tmp_path / "liver_only")])
    liver_only = np.asarray(nib.load(tmp_path / "liver_only" / f"segmentation-{test_volume}.nii").dataobj)
    assert set(np.unique(liver_only)) <= {0, 1}
    liver_dice = 2 * (liver_only & (own_truth >= 1)).sum() / (liver_only.sum() + (own_truth >= 1).sum())
    liver_stage = per_volume(run / "liver" / "test_per_volume.csv")[test_volume]
    assert liver_dice == pytest.approx(float(liver_stage["dice_volume"]), abs=1e-5)


def test_predict_rejects_bad_input_in_one_line(cascade_run, tmp_path):
    run = cascade_run / "out" / "cascade"
    not_nifti = tmp_path / "in" / "volume-9.nii"
    not_nifti.parent.mkdir()
    not_nifti.write_text("not an image")
    with pytest.raises(DataError, match="volume-9.nii: cannot be read as NIfTI"):
        predict_main([str(run), "--input", str(not_nifti.parent), "--output", str(tmp_path / "out1")])
    assert not any((tmp_path / "out1").glob("*.nii"))
    truncated = tmp_path / "trunc" / "volume-8.nii.gz"
    truncated.parent.mkdir()
    data = (cascade_run / "data" / "volume-0.nii.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="volume-8.nii.gz: truncated or corrupt"):
        predict_main([str(run), "--input", str(truncated), "--output", str(tmp_path / "out2")])
    assert not [p for p in (tmp_path / "out2").iterdir()]
    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="foreign.ckpt"):
        predict_main([str(foreign), "--input", str(cascade_run / "data" / "volume-0.nii.gz"), "--output", str(tmp_path / "out3")])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot be written"):
        predict_main([str(run), "--input", str(cascade_run / "data" / "volume-0.nii.gz"), "--output", str(blocker / "sub")])
    lesion_only = tmp_path / "lesion_only"
    lesion_only.mkdir()
    missing_liver = str(tmp_path / "gone.ckpt")
    with pytest.raises(CheckpointError, match="liver"):
        predict_main([str(run), "--input", str(cascade_run / "data" / "volume-0.nii.gz"), "--output", str(lesion_only),
                      "--liver_checkpoint", missing_liver])


def test_lesion_stage_without_a_liver_model_fails_in_one_line(tmp_path, capsys, monkeypatch):
    from experiments.commands.cli import main

    write_cascade(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LITS_RUN_VERSION", raising=False)
    with pytest.raises(SystemExit) as exit_code:
        main(["fit", "--config", "lesion.yaml", "--trainer.logger=false"])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("lits: error:") and "liver_checkpoint" in error[-1] and "Traceback" not in "".join(error)


def test_cascade_figures_are_exact_under_ddp(cascade_run):
    """3 test volumes over 2 processes: each rank scores its own volumes, the sampler repeats one; same figures as 1 process."""
    run = cascade_run / "out" / "cascade"
    common = ["test", "--config", "lesion.yaml", f"--ckpt_path={run / 'lesion/checkpoints/best.ckpt'}",
              f"--model.init_args.liver_checkpoint={run / 'liver/checkpoints/best.ckpt'}", "--data.split=[1,0,3]",
              "--trainer.default_root_dir=ddp_out"]
    figures = {}
    for name, extra in (("single", []), ("ddp", ["--trainer.devices=2", "--trainer.strategy=ddp_fork"])):  # ddp_fork: the other rank forked, not a new interpreter; the launch itself is tested in test_stages.py
        result = lits(*common, f"--name={name}", *extra, cwd=cascade_run)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
        figures[name] = json.loads((cascade_run / "ddp_out" / name / "version_0" / "metrics.json").read_text())
    assert (figures["single"]["world_size"], figures["ddp"]["world_size"]) == (1, 2)
    assert figures["single"]["test/lesion/cases"] == 3
    names = [k for k in figures["single"] if k.startswith(("test/liver/", "test/lesion/"))]
    assert len(names) == 24  # 9 liver and 15 lesion figures
    for name in names:
        assert figures["ddp"][name] == pytest.approx(figures["single"][name], abs=1e-6), name


def test_roi_from_prediction_draws_the_crops_around_the_liver_networks_liver(cascade_run):
    import torch
    from types import SimpleNamespace

    from datamodules import LiTSDataModule
    from lightning_modules import BaselineUNet
    from lightning_modules.inference.cascade_2d import liver_mask, mask_box, slice_probabilities

    liver_ckpt = str(cascade_run / "out" / "cascade" / "liver" / "checkpoints" / "best.ckpt")
    config = yaml.safe_load((cascade_run / "lesion.yaml").read_text())["data"]
    data = LiTSDataModule(**{**config, "root": str(cascade_run / "data"), "cache_dir": str(cascade_run / "cache"),
                             "liver_roi": {**config["liver_roi"], "roi_from": "prediction"}})
    data.prepare_data()
    data.setup("fit")
    truth_slices = len(data.datasets["train"])
    model = BaselineUNet(base_channels=4, liver_checkpoint=liver_ckpt)
    model._trainer = SimpleNamespace(datamodule=data, strategy=SimpleNamespace(root_device=torch.device("cpu")), is_global_zero=True)
    model.setup("fit")
    crops = data.datasets["train"]
    liver = model._liver_network[0]
    expected = 0
    for index in crops.volume_indices:
        volume = data.volumes[index]
        probs = slice_probabilities(liver.predictor(torch.device("cpu")), torch.from_numpy(np.asarray(volume.image, np.float32)), 1)
        box = mask_box(liver_mask(probs, tuple(volume.full_shape[1:])), 0, 0)
        expected += box[0][1] - box[0][0] if box else 0
        position = crops.volume_indices.index(index)
        if box:
            assert set(crops.index[crops.index[:, 0] == position, 1]) == set(range(*box[0]))
            cy0, cy1, cx0, cx1 = crops._centres[position]
            assert cy0 == max(box[1][0] - crops.crop_margin, crops._regions[position][0])
    assert len(crops) == expected and expected > 0
    assert truth_slices > 0  # the ground-truth path served the same volumes before
