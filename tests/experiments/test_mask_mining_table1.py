"""The mask-mining paper's Table 1 and Fig. 4 as a study (`table: lits_liver_lesion`): the table's columns and
Inc. statistics against scipy, the Fig. 4 counts and normalisation, `--data.test_split`, and a tiny study end to end."""

import csv
import json
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from datamodules import DataError, LiTSDataModule
from datamodules.errors import ConfigError
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset
from experiments.commands import study as study_module
from experiments.commands.study import load_study, report
from experiments.commands.study_tables import LITS_LIVER_LESION, TABLES, lesion_error_counts, with_lesion_counts
from experiments.commands.study_figure import normalised_error_bars, setup_and_loss
from tests.lits_commands import lits

ROOT = Path(__file__).parents[2]
SEEDS = (0, 1, 2)
# per seed: (liver, lesion) Dice before mining, the lesion Dice after; the liver network is not mined
BEFORE = {"train": [(0.95, 0.70), (0.94, 0.66), (0.96, 0.72)], "val": [(0.93, 0.60), (0.92, 0.55), (0.94, 0.62)],
          "test": [(0.92, 0.58), (0.91, 0.50), (0.93, 0.61)]}
AFTER_LESION = {"train": [0.74, 0.67, 0.77], "val": [0.63, 0.59, 0.63], "test": [0.60, 0.55, 0.62]}


def fake_runs(shift=0.0, test=True):
    """Final figures of 3 mask-mining runs as the study collects them (train/ from the training-volume evaluation)."""
    runs = {}
    for s in SEEDS:
        figures = {}
        for split in ("train", "val", "test") if test else ("train", "val"):
            liver, lesion = BEFORE[split][s]
            figures |= {f"{split}/liver/dice": liver, f"{split}/before/liver/dice": liver,
                        f"{split}/before/lesion/dice": lesion + shift, f"{split}/lesion/dice": AFTER_LESION[split][s] + shift}
        # validation lesion voxels: TP 100 + 10 s before, +5 after; FP 50 before, 40 after; FN 30 before, 25 after
        tp = 100 + 10 * s
        figures |= {"val/before/lesion/intersection_voxels": tp, "val/before/lesion/pred_voxels": tp + 50, "val/before/lesion/truth_voxels": tp + 30,
                    "val/lesion/intersection_voxels": tp + 5, "val/lesion/pred_voxels": tp + 5 + 40, "val/lesion/truth_voxels": tp + 5 + 25}
        runs[s] = figures
    return runs


def test_table_columns_and_inc_statistics_match_scipy(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "log_to_wandb", lambda *a, **k: None)
    results = {"2D, dice": fake_runs(), "2D, pwce": fake_runs(0.01), "Cmb, dice": fake_runs(0.02, test=False), "Cmb, pwce": fake_runs(0.03)}
    study = {"name": "t1", "models": dict.fromkeys(results, "x.yaml"), "baseline": "2D, dice", "seeds": list(SEEDS), "args": [],
             "inc": True, "table": "lits_liver_lesion", "rows": {"2D": "2D, dice", "Cmb": "Cmb, dice"}}
    report(study, tmp_path, results, [])
    rows = {row["model"]: row for row in json.loads((tmp_path / "results.json").read_text())}
    assert list(rows) == ["2D", "2D Inc.", "Cmb", "Cmb Inc."]  # the dice models only, before and after mining
    assert list(LITS_LIVER_LESION) == [f"{p} Dice ({s})" for s in ("train", "val", "test") for p in ("Liver", "Lesion")]
    for split in ("train", "val", "test"):
        before = np.array([lesion for _, lesion in BEFORE[split]])
        after = np.array(AFTER_LESION[split])
        title = f"Lesion Dice ({split})"
        assert rows["2D"][f"{title} mean"] == pytest.approx(before.mean())
        assert rows["2D Inc."][f"{title} mean"] == pytest.approx(after.mean())
        assert rows["2D Inc."][f"{title} std"] == pytest.approx(after.std(ddof=1))
        assert rows["2D Inc."][f"{title} t-test p"] == pytest.approx(stats.ttest_rel(after, before).pvalue)
        assert rows["2D Inc."][f"{title} Wilcoxon p"] == pytest.approx(stats.wilcoxon(after, before).pvalue)
        assert f"{title} t-test p" not in rows["2D"]  # the base row is the reference, not tested
        liver = f"Liver Dice ({split})"
        assert rows["2D"][f"{liver} mean"] == pytest.approx(np.mean([lv for lv, _ in BEFORE[split]]))
        assert math.isnan(rows["2D Inc."][f"{liver} t-test p"])  # the liver network is not mined: identical, undefined
    # Cmb's runs have no test split: its test columns read n/a, the others are filled
    assert math.isnan(rows["Cmb Inc."]["Lesion Dice (test) mean"])
    assert rows["Cmb Inc."]["Lesion Dice (val) mean"] == pytest.approx(np.mean(AFTER_LESION["val"]) + 0.02)
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | runs | " + " | ".join(LITS_LIVER_LESION) + " |"
    cmb_inc = next(line for line in table.splitlines() if line.startswith("| Cmb Inc. |"))
    assert cmb_inc.count("n/a") == 2 and "| 2D Inc. | 3 |" in table
    assert "training (train), validation (val) and test volumes" in table
    with open(tmp_path / "results.csv") as handle:
        assert [row["model"] for row in csv.DictReader(handle)] == list(rows)
    # Fig. 4 from all four models, the pwce ones included
    assert (tmp_path / "lesion_error_types.png").stat().st_size > 10_000


def test_inc_needs_the_before_figures_of_the_columns_it_has():
    runs = fake_runs()
    del runs[1]["train/before/lesion/dice"]
    with pytest.raises(ConfigError, match=r"'2D': its runs \(seed 1\) report no <split>/before/\* figures"):
        study_module.before_and_after({"2D": runs}, LITS_LIVER_LESION)


def test_fig4_counts_summed_over_seeds_and_each_pair_normalised_to_its_larger_bar():
    counts = lesion_error_counts({"2D, dice": fake_runs(), "no counts": {0: {"val/lesion/dice": 0.5}}})
    assert list(counts) == ["2D, dice"]  # a model without voxel counts is left out
    tp = sum(100 + 10 * s for s in SEEDS)
    assert counts["2D, dice"] == {"before": {"fp": 150, "fn": 90, "tp": tp}, "after": {"fp": 120, "fn": 75, "tp": tp + 15}}
    hand = {"2D, dice": {"before": {"fp": 200, "fn": 50, "tp": 0}, "after": {"fp": 100, "fn": 80, "tp": 0}},
            "Cmb, pwce": {"before": {"fp": 10, "fn": 40, "tp": 300}, "after": {"fp": 30, "fn": 40, "tp": 150}}}
    bars = normalised_error_bars(hand)
    assert bars[("2D", "dice", "fp")] == (1.0, 0.5)
    assert bars[("2D", "dice", "fn")] == (0.625, 1.0)
    assert bars[("2D", "dice", "tp")] == (0.0, 0.0)  # nothing in either: no division by zero
    assert bars[("Cmb", "pwce", "fp")] == pytest.approx((1 / 3, 1.0))
    assert bars[("Cmb", "pwce", "fn")] == (1.0, 1.0) and bars[("Cmb", "pwce", "tp")] == (1.0, 0.5)
    assert len(bars) == 6 and setup_and_loss("U-Net, big, pwce") == ("U-Net, big", "pwce") and setup_and_loss("2D") == ("2D", "")


def test_lesion_counts_from_the_mining_stage_error_report(tmp_path):
    with open(tmp_path / "val_lesion_error_types.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["volume", "fp_before", "fp_after", "fn_before", "fn_after", "tp_before", "tp_after", "dice_before", "dice_after"])
        writer.writerow(["3", 7, 5, 2, 1, 10, 11, "0.7", "0.8"])
        writer.writerow(["total", 7, 5, 2, 1, 10, 11, "", ""])
    figures = with_lesion_counts({"val/lesion/dice": 0.8}, tmp_path)
    assert lesion_error_counts({"m": {0: figures}})["m"] == {"before": {"fp": 7, "fn": 2, "tp": 10}, "after": {"fp": 5, "fn": 1, "tp": 11}}
    given = fake_runs()[0]
    assert with_lesion_counts(given, tmp_path) == given  # figures that have the counts keep theirs
    assert with_lesion_counts({"a": 1}, tmp_path / "nowhere") == {"a": 1}


# -- --data.test_split ---------------------------------------------------------------------------------------------
def datamodule(root, tmp_path, **kwargs):
    options = dict(root=str(root), cache_dir=str(tmp_path / "cache"), split=[3, 1, 2], image_size=16, batch_size=4, num_workers=0)
    module = LiTSDataModule(**(options | kwargs))
    module.prepare_data()
    module.setup("test")
    return module


def test_test_split_train_evaluates_the_training_volumes_whole(tiny_lits, tmp_path):
    default = datamodule(tiny_lits, tmp_path)
    module = datamodule(tiny_lits, tmp_path, test_split="train", foreground_margin=0, augmentation={"enabled": True})
    assert module.splits == default.splits  # the assignment of volumes is unchanged...
    tested = module.datasets["test"]
    assert sorted({s["volume"] for s in tested}) == sorted(module.splits["train"])  # ...the test loader gets the training volumes
    assert len(tested) == 3 * 10 and tested.transform is None  # every slice (no foreground margin), no augmentation
    assert len(module.datasets["train"]) < len(tested)  # training itself keeps its slice selection
    batch = next(iter(module.test_dataloader()))
    assert batch["image"].shape[0] == 4
    assert {s["volume"] for s in datamodule(tiny_lits, tmp_path, test_split="val").datasets["test"]} == set(module.splits["val"])
    # liver_roi: whole volumes, as val and test are served
    roi = datamodule(tiny_lits, tmp_path, test_split="train", sampling="liver_roi", liver_roi={"crop_size": 16}, target="lesion")
    assert isinstance(roi.datasets["train"], LiverCropDataset) and isinstance(roi.datasets["test"], VolumeDataset)
    assert [s["volume"] for s in roi.test_dataloader()] == roi.splits["train"]


def test_bad_or_empty_test_split_in_one_line(tiny_lits, tmp_path):
    with pytest.raises(ConfigError, match="--data.test_split='training' is not one of train, val, test") as error:
        LiTSDataModule(test_split="training")
    assert "\n" not in str(error.value)
    module = datamodule(tiny_lits, tmp_path, split=[0, 1, 2], test_split="train")
    with pytest.raises(DataError, match="the train split of .* is empty"):
        module.test_dataloader()


# -- the shipped study files and a tiny study end to end --------------------------------------------------------------
def test_table1_studies_name_the_table_and_the_dice_rows():
    # the paper-scale study has the paper's three setups; the CPU quickstart its two 2D ones (3D: its own quickstart)
    for name, setups in (("mask_mining_table1", ("2D", "3D", "Cmb")), ("mask_mining_table1_quickstart", ("2D", "Cmb"))):
        spec = yaml.safe_load((ROOT / "experiments" / "studies" / f"{name}.yaml").read_text())
        assert spec["table"] == "lits_liver_lesion" and spec["inc"] is True and spec["table"] in TABLES
        assert spec["rows"] == {setup: f"{setup}, dice" for setup in setups}
        assert set(spec["models"]) == {f"{setup}, {loss}" for setup in setups for loss in ("dice", "pwce")}


def write_mining_cascade(folder):
    """A tiny 4-stage experiment: liver, lesion (given the liver), mask mining of the liver network, then of the lesion
    network in the cascade of the mined liver network (given the lesion network and both liver networks)."""
    from tests.synthetic import tiny_experiment

    liver = tiny_experiment(folder, volumes=4, split=(2, 1, 1), lr=0.003)
    liver["trainer"].update(limit_train_batches=2, num_sanity_val_steps=0)
    lesion = yaml.safe_load(yaml.safe_dump(liver))
    lesion["model"]["init_args"]["seg_loss"] = "pwce_over_dice"
    lesion["data"].update(sampling="liver_roi", target="lesion", liver_roi={"crop_size": 32})
    mine = yaml.safe_load(yaml.safe_dump(lesion))
    mine["model"] = {"class_path": "lightning_modules.MaskMining", "init_args": {"loss": "dice", "lr": 0.001}}
    mine_liver = yaml.safe_load(yaml.safe_dump(liver))
    mine_liver["model"] = {"class_path": "lightning_modules.MaskMining", "init_args": {"loss": "dice", "lr": 0.01}}
    mine_liver["trainer"]["limit_val_batches"] = 2  # its own validation is not what the study reads
    for name, config in (("liver", liver), ("lesion", lesion), ("mine_liver", mine_liver), ("mine", mine)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (folder / "mm.yaml").write_text(yaml.safe_dump({"name": "mm", "stages": [
        {"name": "liver", "config": "liver.yaml"},
        {"name": "lesion", "config": "lesion.yaml", "weights_from": "liver", "weights_arg": "model.init_args.liver_checkpoint"},
        {"name": "mine_liver", "config": "mine_liver.yaml", "weights_from": "liver", "weights_arg": "model.init_args.base_checkpoint"},
        {"name": "mine", "config": "mine.yaml", "weights": {"model.init_args.base_checkpoint": "lesion",
                                                           "model.init_args.liver_checkpoint": "mine_liver",
                                                           "model.init_args.base_liver_checkpoint": "liver"}}]}))


def test_tiny_table1_study_end_to_end_and_resume(tmp_path, monkeypatch):
    write_mining_cascade(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "tiny_t1", "table": "lits_liver_lesion", "inc": True, "seeds": [0],
                                                          "models": {"2D, dice": "mm.yaml"}, "rows": {"2D": "2D, dice"}}, sort_keys=False))
    result = lits("study", "study.yaml", "--trainer.default_root_dir=out", cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    folder = tmp_path / "out" / "tiny_t1"
    run = folder / "2D_dice" / "seed_0"
    train_eval = json.loads((run / "train_eval" / "metrics.json").read_text())
    assert train_eval["test/lesion/cases"] == 2 and train_eval["checkpoint"] == json.loads((run / "mine" / "metrics.json").read_text())["best_checkpoint"]
    assert "test/before/lesion/dice" in train_eval  # the mined base on the training volumes too
    rows = {row["model"]: row for row in json.loads((folder / "results.json").read_text())}
    assert list(rows) == ["2D", "2D Inc."]
    final = json.loads((run / "metrics.json").read_text())
    assert rows["2D Inc."]["Lesion Dice (val) mean"] == pytest.approx(final["val/lesion/dice"])
    assert rows["2D"]["Lesion Dice (test) mean"] == pytest.approx(final["test/before/lesion/dice"])
    assert rows["2D Inc."]["Liver Dice (train) mean"] == pytest.approx(train_eval["test/liver/dice"])
    assert rows["2D"]["Lesion Dice (train) mean"] == pytest.approx(train_eval["test/before/lesion/dice"])
    # both networks mined: "before" is the cascade as trained (the unmined liver network, the base lesion network),
    # exactly the lesion stage's own figures; "after" runs the mined liver network, then the mined lesion network
    lesion_stage = json.loads((run / "lesion" / "metrics.json").read_text())
    for key in ("test/lesion/dice", "test/liver/dice", "test/lesion/dice_global", "val/lesion/dice"):
        assert final[key.replace("test/", "test/before/").replace("val/", "val/before/")] == pytest.approx(lesion_stage[key], abs=1e-6)
    mined_liver = json.loads((run / "mine_liver" / "metrics.json").read_text())["best_checkpoint"]
    hparams = torch.load(final["best_checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["liver_checkpoint"] == mined_liver and hparams["base_liver_checkpoint"].endswith("liver/checkpoints/best.ckpt")
    # one error-type report for the liver, one for lesions (with per-volume rows), one for both
    for part in ("liver", "lesion"):
        report = list(csv.DictReader(open(run / "mine" / f"test_{part}_error_types.csv")))
        assert report[-1]["volume"] == "total" and int(report[-1]["tp_before"]) == sum(int(r["tp_before"]) for r in report[:-1])
    rows = (run / "mine" / "test_error_types.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| liver"] * 3 + ["| lesion"] * 3
    table = (folder / "results.md").read_text()
    assert all(f"Dice ({split})" in table.splitlines()[0] for split in ("train", "val", "test")) and "| 2D Inc. | 1 |" in table
    assert (folder / "lesion_error_types.png").stat().st_size > 5_000 and not (folder / "qualitative.png").exists()
    # a rerun (here in this process) skips the finished stages and the finished training-volume evaluation
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_module, "log_to_wandb", lambda *a, **k: None)
    calls = []
    monkeypatch.setattr(study_module, "run_cli", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("experiments.commands.stages.run_cli", lambda *a, **k: calls.append(a))
    study_module.run_study("study.yaml", ["--trainer.default_root_dir=out"])
    assert calls == [] and (folder / "results.md").read_text() == table
    assert load_study("study.yaml")["rows"] == {"2D": "2D, dice"}
