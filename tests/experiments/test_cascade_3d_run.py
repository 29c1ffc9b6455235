"""The 3D cascade end to end (issue 11, sections 2, 3 and 5): `lits run` of a tiny 3D liver network, a 3D lesion
network evaluated as the cascade, and mask mining of it; `lits predict` of the mined cascade on a re-oriented scan
against `lits test`; the one-line errors for a 2D network where a 3D one is needed."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from experiments.commands.predict import predict_main
from lightning_modules import BaselineUNet, CheckpointError
from tests.synthetic import tiny_volume, write_pair
from tests.lits_commands import lits as run_lits

SHAPE = (32, 32, 12)  # 12 slices at 4 mm: 19 slices at 2.5 mm, room for 16x32x32 crops


def lits(*args, cwd):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "disabled"})


def stage_config(model: str, target: str, **init_args) -> dict:
    return {
        "seed_everything": 5,
        "model": {"class_path": f"lightning_modules.{model}",
                  "init_args": {"spatial_dims": 3, "lr": 0.003, "num_overlays": 1, **init_args}},
        "data": {"root": "data", "cache_dir": "cache", "split": [2, 1, 1], "image_size": 32, "spatial_dims": 3, "target": target,
                 "volume_3d": {"crop_size": [16, 32, 32]}, "positive_fraction": 0.7, "batch_size": 2, "num_workers": 0, "preprocess_workers": 1},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cascade3d")
    for i in range(4):
        write_pair(folder / "data", str(i), *tiny_volume(i, shape=SHAPE))
    stages = {
        "liver.yaml": stage_config("BaselineUNet", "liver", base_channels=4),
        "lesion.yaml": stage_config("BaselineUNet", "lesion", base_channels=4, seg_loss="pwce_over_dice", region_margin=2),
        "mine.yaml": stage_config("MaskMining", "lesion", loss="pwce", region_margin=2),
    }
    for name, config in stages.items():
        (folder / name).write_text(yaml.safe_dump(config))
    (folder / "chain.yaml").write_text(yaml.safe_dump({"name": "chain", "stages": [
        {"name": "liver", "config": "liver.yaml"},
        {"name": "lesion", "config": "lesion.yaml", "weights_from": "liver", "weights_arg": "model.init_args.liver_checkpoint"},
        {"name": "mine", "config": "mine.yaml",
         "weights": {"model.init_args.base_checkpoint": "lesion", "model.init_args.liver_checkpoint": "liver"}}]}))
    result = lits("run", "chain.yaml", "--trainer.default_root_dir=out", cwd=folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return folder


def per_volume(path):
    return {row["volume"]: row for row in csv.DictReader(open(path))}


def test_3d_cascade_and_mining_report_liver_and_lesion_figures(mined_run):
    run = mined_run / "out" / "chain"
    final = json.loads((run / "metrics.json").read_text())
    for stage in ("val", "test"):
        for prefix in ("", "before/"):
            for part in ("liver", "lesion"):
                for key in ("dice", "voe", "assd_mm", "hd95_mm"):
                    assert np.isfinite(final[f"{stage}/{prefix}{part}/{key}"]), (stage, prefix, part, key)
        # the mining stage's "before" is the lesion stage's cascade: the same base, the same liver network
        lesion = final["stage_metrics"]["lesion"]
        assert final[f"{stage}/before/lesion/dice"] == pytest.approx(lesion[f"{stage}/lesion/dice"], abs=1e-6)
        assert final[f"{stage}/liver/dice"] == pytest.approx(lesion[f"{stage}/liver/dice"], abs=1e-6)
    assert 0 < final["stage_metrics"]["liver"]["test/dice_volume"] <= 1  # the 3D liver network alone, scored in 2D's way
    assert (run / "mine" / "val_lesion_error_types.csv").exists()
    assert (run / "lesion" / "test_overlays.png").stat().st_size > 3000


def test_predict_3d_gives_the_figures_of_lits_test(mined_run, tmp_path):
    run = mined_run / "out" / "chain"
    tested = per_volume(run / "mine" / "test_per_volume.csv")
    volume = next(iter(tested))
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in (f"volume-{volume}.nii.gz", f"segmentation-{volume}.nii.gz"):  # stored flipped, rows and columns swapped
        nib.save(nib.load(mined_run / "data" / name).as_reoriented([[1, -1], [0, -1], [2, 1]]), scans / name)
    truth = np.asarray(nib.load(scans / f"segmentation-{volume}.nii.gz").dataobj)
    (scans / f"segmentation-{volume}.nii.gz").unlink()
    predict_main([str(run), "--input", str(scans), "--output", str(tmp_path / "pred")])
    labels = np.asarray(nib.load(tmp_path / "pred" / f"segmentation-{volume}.nii").dataobj)
    assert labels.shape == truth.shape and set(np.unique(labels)) <= {0, 1, 2}
    for part in (1, 2):
        found, wanted = labels >= part, truth >= part
        total = found.sum() + wanted.sum()
        dice = 2 * (found & wanted).sum() / total if total else 1.0
        key = "liver/dice" if part == 1 else "lesion/dice"
        assert dice == pytest.approx(float(tested[volume][key]), abs=1e-5), key


def test_a_2d_network_where_a_3d_one_is_needed_is_one_line(mined_run, tmp_path):
    run = mined_run / "out" / "chain"
    flat = BaselineUNet(base_channels=4)
    liver_2d = tmp_path / "liver2d.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in flat.model.state_dict().items()}, "hyper_parameters": dict(flat.hparams),
                "datamodule_hyper_parameters": {"target": "liver"}}, liver_2d)
    with pytest.raises(CheckpointError, match="is a 2D network but the lesion network .* is 3D"):
        predict_main([str(run), "--input", str(mined_run / "data"), "--output", str(tmp_path / "pred"), "--liver_checkpoint", str(liver_2d)])
    with pytest.raises(CheckpointError, match="spatial_dims"):  # what `lits fit` of a 3D lesion stage prints in one line
        BaselineUNet(spatial_dims=3, base_channels=4, liver_checkpoint=str(liver_2d))
