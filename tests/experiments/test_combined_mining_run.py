"""Mask mining on the combined model end to end: `lits run` of combined, then mine-and-retrain both networks; the
base's figures under before/, the liver and lesion error-type reports, and `lits predict` of the retrained model."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from experiments.commands.predict import predict_main
from tests.experiments.test_mask_mining_run import lits  # asserts the run succeeded
from tests.synthetic import tiny_experiment


def test_combined_mining_run_reports_before_and_after_and_predicts(tmp_path):
    combined = tiny_experiment(tmp_path, "CombinedLiverLesion", volumes=4, split=(2, 1, 1), lr=0.003,
                               liver_loss="pwce", seg_loss="pwce_over_dice")
    combined["data"].update(sampling="combined", target="both", liver_roi={"crop_size": 32})
    mine = yaml.safe_load(yaml.safe_dump(combined))
    mine["model"] = {"class_path": "lightning_modules.CombinedMaskMining", "init_args": {"loss": "pwce", "lr": 0.001}}
    (tmp_path / "combined.yaml").write_text(yaml.safe_dump(combined))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    (tmp_path / "cmb_mm.yaml").write_text(yaml.safe_dump({"name": "cmb_mm", "stages": [
        {"name": "combined", "config": "combined.yaml"},
        {"name": "mine", "config": "mine.yaml", "weights_from": "combined", "weights_arg": "model.init_args.base_checkpoint"}]}))
    lits("run", "cmb_mm.yaml", "--trainer.default_root_dir=out", cwd=tmp_path)
    folder = tmp_path / "out" / "cmb_mm"
    final = json.loads((folder / "metrics.json").read_text())
    base = final["stage_metrics"]["combined"]
    for stage in ("val", "test"):
        for key in ("liver/dice", "liver/assd_mm", "lesion/dice", "lesion/dice_global", "lesion/lesion_recall"):
            assert np.isfinite(final[f"{stage}/{key}"]) and np.isfinite(final[f"{stage}/before/{key}"]), (stage, key)
    # "before" is the combined model in the same cascade: exactly the combined stage's own figures
    for key in ("test/lesion/dice", "test/liver/dice", "test/lesion/dice_global", "val/lesion/dice"):
        assert final[key.replace("/", "/before/", 1)] == pytest.approx(base[key], abs=1e-6), key
    report = folder / "mine"
    for stage in ("val", "test"):
        for part in ("liver", "lesion"):
            rows = list(csv.DictReader(open(report / f"{stage}_{part}_error_types.csv")))
            assert rows[-1]["volume"] == "total" and int(rows[-1]["tp_before"]) == sum(int(r["tp_before"]) for r in rows[:-1])
            assert (report / f"{stage}_{part}_error_types.png").is_file()
    best = final["best_checkpoint"]
    assert best.endswith("mine/checkpoints/best.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert "liver_model.error_head.weight" in state["state_dict"] and state["hyper_parameters"]["_class_path"] == "lightning_modules.CombinedMaskMining"
    # lits predict on the run folder: the retrained cascade's labels, with the figures lits test found
    tested = {r["volume"]: r for r in csv.DictReader(open(report / "test_per_volume.csv"))}
    volume = next(iter(tested))
    scans, truth = tmp_path / "scans", tmp_path / "truth"
    scans.mkdir()
    truth.mkdir()
    (tmp_path / "data" / f"volume-{volume}.nii.gz").link_to(scans / f"volume-{volume}.nii.gz")
    predict_main([str(folder), "--input", str(scans), "--output", str(tmp_path / "pred")])
    labels = np.asarray(nib.load(tmp_path / "pred" / f"segmentation-{volume}.nii").dataobj)
    own = np.asarray(nib.load(tmp_path / "data" / f"segmentation-{volume}.nii.gz").dataobj)
    for part, (predicted, expected) in {"liver": (labels >= 1, own >= 1), "lesion": (labels == 2, own == 2)}.items():
        dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum()) if predicted.any() or expected.any() else 1.0
        assert dice == pytest.approx(float(tested[volume][f"{part}/dice"]), abs=1e-5), part
