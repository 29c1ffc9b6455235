"""Mask mining end to end with `lits run`: base, then mine-and-retrain, the error-type report, and --base_ckpt."""

import csv
import json

import numpy as np
import pytest
import yaml
from scipy import stats

from experiments.commands.study_tables import METRICS, before_and_after, markdown_table, summarize
from tests.synthetic import tiny_experiment
from tests.lits_commands import lits as run_lits


def lits(*args, cwd):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "disabled"}, check=True)


def test_mask_mining_run_writes_the_error_type_report(tmp_path):
    base = tiny_experiment(tmp_path, volumes=4, split=(2, 1, 1), max_epochs=2, lr=0.003)
    mine = {**base, "model": {"class_path": "lightning_modules.MaskMining", "init_args": {"loss": "pwce", "lr": 0.001}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    (tmp_path / "mm.yaml").write_text(yaml.safe_dump({"name": "mm", "stages": [
        {"name": "base", "config": "base.yaml"},
        {"name": "mine", "config": "mine.yaml", "weights_from": "base", "weights_arg": "model.init_args.base_checkpoint"}]}))
    lits("run", "mm.yaml", "--trainer.default_root_dir=out", cwd=tmp_path)
    folder = tmp_path / "out" / "mm"
    final = json.loads((folder / "metrics.json").read_text())
    for stage in ("val", "test"):
        for key in ("dice_volume", "hd95_volume_mm", "dice_slice", "fp_voxels", "fn_voxels", "tp_voxels"):
            assert f"{stage}/{key}" in final and f"{stage}/before/{key}" in final
    report = folder / "mine"
    assert (report / "error_types.png").stat().st_size > 5_000 and (report / "test_error_types.png").is_file()
    table = (report / "error_types.md").read_text()
    assert "| false positives |" in table and "| Dice before | Dice after |" in table
    rows = list(csv.DictReader(open(report / "error_types.csv")))
    total = rows[-1]
    assert total["volume"] == "total"
    for key in ("fp_before", "fp_after", "fn_before", "fn_after", "tp_before", "tp_after"):
        assert int(total[key]) == sum(int(r[key]) for r in rows[:-1])
    assert float(total["tp_after"]) == final["val/tp_voxels"] and float(total["fp_before"]) == final["val/before/fp_voxels"]
    # "before" is the base model on the same validation data: exactly the base stage's own final validation
    base_rows = {r["volume"]: r for r in csv.DictReader(open(folder / "base" / "val_per_volume.csv"))}
    for r in rows[:-1]:
        for t in ("fp", "fn", "tp"):
            assert int(r[f"{t}_before"]) == int(base_rows[r["volume"]][f"{t}_voxels"])
        assert float(r["dice_before"]) == pytest.approx(float(base_rows[r["volume"]]["dice_volume"]), abs=1e-5)
    base_metrics = json.loads((folder / "base" / "metrics.json").read_text())
    assert final["test/before/dice_volume"] == pytest.approx(base_metrics["test/dice_volume"], abs=1e-6)
    # a given base checkpoint skips the first stage
    again = lits("run", "mm.yaml", "--trainer.default_root_dir=out2", f"--base_ckpt={base_metrics['best_checkpoint']}", cwd=tmp_path)
    assert "stage 1/2 base: replaced by" in again.stdout and not (tmp_path / "out2" / "mm" / "base").exists()
    assert json.loads((tmp_path / "out2" / "mm" / "metrics.json").read_text())["test/before/dice_volume"] == pytest.approx(final["test/before/dice_volume"], abs=1e-6)


def test_before_and_after_rows_are_tested_against_each_other():
    before = [0.90, 0.91, 0.88, 0.92, 0.89]
    after = [0.92, 0.915, 0.90, 0.93, 0.905]
    runs = {s: {**{k: after[s] for k in METRICS.values()}, **{k.replace("test/", "test/before/"): before[s] for k in METRICS.values()}}
            for s in range(5)}
    expanded, references = before_and_after({"U-Net": runs})
    rows = summarize(expanded, "U-Net", references)
    assert [r["model"] for r in rows] == ["U-Net", "U-Net Inc."]
    assert rows[0]["Dice (volume) mean"] == pytest.approx(np.mean(before)) and "Dice (volume) t-test p" not in rows[0]
    assert rows[1]["Dice (volume) t-test p"] == pytest.approx(stats.ttest_rel(after, before).pvalue)
    assert rows[1]["Dice (volume) Wilcoxon p"] == pytest.approx(stats.wilcoxon(after, before).pvalue)
    assert "against the same model before mask mining" in markdown_table(rows, "U-Net", inc=True)


def test_unknown_loss_is_one_line_through_the_cli(tmp_path, capsys, monkeypatch):
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        main(["fit", "--model=lightning_modules.MaskMining", "--model.init_args.loss=focal", "--trainer.logger=false"])
    stderr = capsys.readouterr().err
    assert exit_code.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip() == "lits: error: unknown mask-mining loss 'focal'; choose one of: dice, pwce (--model.init_args.loss)"
