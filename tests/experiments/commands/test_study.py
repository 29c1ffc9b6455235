"""`lits study`: statistics on a fixed table of numbers, checked against scipy directly, and bad study files."""

import json
import math
import re

import numpy as np
from pathlib import Path

import pytest
import yaml
from scipy import stats

from datamodules.errors import ConfigError, DataError
from experiments.commands.study import load_study
from experiments.commands.study_tables import METRICS, markdown_table, summarize

BASE = [0.80, 0.82, 0.85, 0.79, 0.81, 0.84]
BETTER = [0.86, 0.85, 0.90, 0.83, 0.88, 0.86]


def fake_results():
    def runs(dice):
        return {seed: {key: value * (1 + 0.1 * i) for i, key in enumerate(METRICS.values())} for seed, value in enumerate(dice)}
    return {"U-Net": runs(BASE), "CMU-Net": runs(BETTER)}


def test_statistics_match_scipy():
    rows = summarize(fake_results(), "U-Net")
    base, cmu = rows
    assert base["model"] == "U-Net" and "Dice (slice) t-test p" not in base
    assert cmu["Dice (slice) mean"] == pytest.approx(np.mean(BETTER))
    assert cmu["Dice (slice) std"] == pytest.approx(np.std(BETTER, ddof=1))
    assert cmu["Dice (slice) t-test p"] == pytest.approx(stats.ttest_rel(BETTER, BASE).pvalue)
    assert cmu["Dice (slice) Wilcoxon p"] == pytest.approx(stats.wilcoxon(BETTER, BASE).pvalue)
    scaled = [v * 1.2 for v in BETTER], [v * 1.2 for v in BASE]  # third column: values scaled by 1.2
    assert cmu["Dice (volume) t-test p"] == pytest.approx(stats.ttest_rel(*scaled).pvalue)
    table = markdown_table(rows, "U-Net")
    assert "| CMU-Net | 6 |" in table and "± " in table


def test_identical_models_have_undefined_p_values_not_errors():
    results = fake_results()
    results["copy"] = results["U-Net"]
    row = summarize(results, "U-Net")[-1]
    assert math.isnan(row["Dice (slice) t-test p"]) and math.isnan(row["Dice (slice) Wilcoxon p"])


@pytest.mark.parametrize("spec, message", [
    ({"models": {"A": "nope.yaml"}}, "model 'A' names experiment file nope.yaml, which does not exist"),
    ({"models": {"A": "exp.yaml"}, "baseline": "B"}, "baseline 'B' is not one of the models"),
    ({"seeds": 2}, "no `models:` mapping"),
])
def test_bad_study_files(tmp_path, spec, message):
    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_study(tmp_path / "study.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "missing.yaml")


def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    from tests.lits_commands import lits
    from tests.synthetic import tiny_experiment

    for name, model in (("unet", "BaselineUNet"), ("cmunet", "CMUNet")):
        config = tiny_experiment(tmp_path, model)
        config["trainer"]["limit_train_batches"] = 1
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "baseline": "U-Net", "seeds": 2, "models": {"U-Net": "unet.yaml", "CMU-Net": "cmunet.yaml"}}, sort_keys=False))

    def study(*args, root="out", file="study.yaml"):
        env = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
        result = lits("study", file, f"--trainer.default_root_dir={root}", *args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout

    first = study("--jobs=2")  # two runs side by side; their figures are compared with a run alone below
    assert first.count(": started") == 4 and first.count(": done") == 4
    folder = tmp_path / "out" / "tiny"
    rows = json.loads((folder / "results.json").read_text())
    assert [row["model"] for row in rows] == ["U-Net", "CMU-Net"] and rows[1]["runs"] == 2
    assert "| CMU-Net | 2 |" in first and (folder / "results.csv").exists()
    assert (folder / "qualitative.png").stat().st_size > 5_000
    # paired seeds: the same split for both models of a seed
    for seed in (0, 1):
        splits = {yaml.safe_load((folder / m / f"seed_{seed}" / "fit" / "config.yaml").read_text())["data"]["split_seed"] for m in ("U-Net", "CMU-Net")}
        assert splits == {seed}
    # a rerun finds every run finished: here as the same study run as a grid sweep over model and seed. Offline
    # the grid goes to the sweep engine (replaced by a recorder here: the engine is tested end to end in
    # test_sweep.py), then the table is built from the finished runs: the same
    import experiments.commands.sweep as sweep_module
    from experiments.commands.study import run_study

    handed = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda path, argv: handed.append((Path(path), argv)))
    monkeypatch.chdir(tmp_path)
    run_study("study.yaml", ["--sweep", "--trainer.default_root_dir=out"])
    sweep = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert sweep["method"] == "grid" and sweep["parameters"]["model"]["values"] == ["U-Net", "CMU-Net"]
    assert [(path.resolve(), argv) for path, argv in handed] == [((folder / "sweep.yaml").resolve(), ["--count=4", f"--trainer.default_root_dir={Path('out') / 'tiny' / 'sweep'}"])]
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert json.loads((folder / "results.json").read_text()) == rows

    # a run alone (seed 1 of the U-Net) gives the figures it gave side by side; each side-by-side run's console is in
    # its run folder
    (tmp_path / "study_unet.yaml").write_text(yaml.safe_dump({"name": "tiny", "seeds": [1], "models": {"U-Net": "unet.yaml"}}))
    study(root="alone", file="study_unet.yaml")
    side_by_side, alone = (json.loads((tmp_path / root / "tiny" / "U-Net" / "seed_1" / "metrics.json").read_text()) for root in ("out", "alone"))
    assert {k: v for k, v in side_by_side.items() if k.startswith(("val/", "test/"))} == {k: v for k, v in alone.items() if k.startswith(("val/", "test/"))}
    for seed in (0, 1):
        assert "Final figures" in (folder / "U-Net" / f"seed_{seed}" / "console.log").read_text()


def test_table_from_a_wandb_sweep(tmp_path, monkeypatch):
    """--from_sweep builds the table from the finished runs' summaries (W&B's public API, faked here)."""
    import wandb

    from experiments.commands import study as study_module
    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "seeds": 6, "baseline": "U-Net",
                                                          "models": {"U-Net": "exp.yaml", "CMU-Net": "exp.yaml"}}))
    results = fake_results()

    class Run:
        def __init__(self, label, seed, state="finished"):
            self.config, self.state, self.summary = {"model": label, "seed": seed}, state, results[label][seed]

    runs = [Run(label, seed) for label in results for seed in results[label]] + [Run("U-Net", 0, state="crashed")]
    asked = []

    class Api:
        def sweep(self, path):
            asked.append(path)
            return type("Sweep", (), {"runs": runs})()

    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.setattr(study_module, "log_to_wandb", lambda *a, **k: None)
    folder = study_module.run_study(tmp_path / "study.yaml", ["--from_sweep=me/proj/abc", f"--trainer.default_root_dir={tmp_path}"])
    assert asked == ["me/proj/abc"]
    expected = {row["model"]: row for row in json.loads(json.dumps(summarize(results, "U-Net")))}
    assert {row["model"]: row for row in json.loads((folder / "results.json").read_text())} == expected
    runs.pop(3)  # a missing (model, seed) is named in a one-line error
    with pytest.raises(DataError, match="no finished run for U-Net/seed 3"):
        study_module.run_study(tmp_path / "study.yaml", ["--from_sweep=me/proj/abc"])


def test_unknown_model_or_broken_experiment_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "broken.yaml").write_text("stages: []\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"models": {"A": "exp.yaml"}}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": {"A": "exp.yaml", "B": "broken.yaml"}}))
    from experiments.commands.cli import main

    for args, message in ((["study.yaml", "--model=Z", "--seed=0"], "unknown model 'Z'; the study has ['A']"),
                          (["bad.yaml"], "broken.yaml: no `stages:` list")):
        with pytest.raises(SystemExit) as exit_code:
            main(["study", *args])
        stderr = capsys.readouterr().err
        assert exit_code.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


# -- options of the mask-mining Table 1 study: table kinds, rows, stage-scoped overrides, shared stages ----------------
def test_missing_figures_read_n_a_and_a_chosen_table_is_used():
    from experiments.commands.study_tables import LITS_LIVER_LESION

    results = {"A": {0: {"val/liver/dice": 0.9, "val/lesion/dice": 0.5}, 1: {"val/liver/dice": 0.8, "val/lesion/dice": 0.7}}}
    rows = summarize(results, "A", metrics=LITS_LIVER_LESION)
    assert rows[0]["Lesion Dice (val) mean"] == pytest.approx(0.6) and math.isnan(rows[0]["Liver Dice (train) mean"])
    table = markdown_table(rows, "A", metrics=LITS_LIVER_LESION, caption="Per-case Dice")
    assert "| A | 2 | n/a | n/a | 0.8500 ± 0.0707 | 0.6000 ± 0.1414 | n/a | n/a |" in table and "\nPer-case Dice, mean ± std" in table


@pytest.mark.parametrize("spec, message", [
    ({"models": {"A": "exp.yaml"}, "table": "huge"}, "table 'huge' is not one of segmentation, lits_liver_lesion"),
    ({"models": {"A": "exp.yaml"}, "rows": {"row": "B"}}, "`rows:` maps a table row's label to one of the models"),
    ({"models": {"A": "exp.yaml", "B": "exp.yaml"}, "rows": {"row": "B"}, "baseline": "A"}, "baseline 'A' must be one of the table's rows"),
])
def test_bad_table_options(tmp_path, spec, message):
    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_study(tmp_path / "study.yaml")


def two_stage_study(tmp_path, share=True):
    """Models A and B: the same `base` stage, then each its own `mine`; C: another base config; D: a one-stage fit."""
    for name in ("base", "other_base", "mine"):
        (tmp_path / f"{name}.yaml").write_text("model: {}\n")
    for label, base, loss in (("a", "base", "dice"), ("b", "base", "pwce"), ("c", "other_base", "dice")):
        (tmp_path / f"{label}.yaml").write_text(yaml.safe_dump({"stages": [
            {"name": "base", "config": f"{base}.yaml"},
            {"name": "mine", "config": "mine.yaml", "args": [f"--loss={loss}"], "weights_from": "base", "weights_arg": "model.base"}]}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"share_stages": share, "inc": True, "models": {
        "A": "a.yaml", "B": "b.yaml", "C": "c.yaml", "D": "base.yaml"}}))
    return load_study(tmp_path / "study.yaml")


def test_stage_scoped_overrides_reach_the_models_that_have_the_stage(tmp_path):
    from experiments.commands.study_config import model_overrides

    study = two_stage_study(tmp_path)
    overrides = ["--data.root=x", "--mine.trainer.max_epochs=2", "--base_ckpt=b.ckpt", "--fit.trainer.max_epochs=3", "--model.lr=1"]
    assert model_overrides(study, "A", overrides) == ["--data.root=x", "--mine.trainer.max_epochs=2", "--base_ckpt=b.ckpt", "--model.lr=1"]
    assert model_overrides(study, "D", overrides) == ["--data.root=x", "--fit.trainer.max_epochs=3", "--model.lr=1"]


def test_shared_stages_take_an_earlier_model_s_finished_stage_with_the_same_settings(tmp_path, monkeypatch):
    from experiments.commands import study as study_module
    monkeypatch.chdir(tmp_path)
    study = two_stage_study(tmp_path)
    folder = tmp_path / "out"
    assert study_module.shared_stages(study, folder, "B", 0, []) == {}  # A's base is not finished yet
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_text("")
    (folder / "A" / "seed_0" / "base").mkdir(parents=True)
    (folder / "A" / "seed_0" / "base" / "metrics.json").write_text(json.dumps({"best_checkpoint": str(checkpoint)}))
    assert study_module.shared_stages(study, folder, "B", 0, ["--mine.lr=1"]) == {"base": ("A", str(checkpoint))}
    assert study_module.shared_stages(study, folder, "B", 1, []) == {}  # another seed: its own base
    assert study_module.shared_stages(study, folder, "C", 0, []) == {}  # another base config
    assert study_module.shared_stages(study, folder, "A", 0, []) == {}  # nothing before the first model
    # run_one hands it over as --base_ckpt, unless sharing is off
    seen = []

    def run_experiment(path, argv, run_folder):
        seen.append(argv)
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "metrics.json").write_text("{}")

    monkeypatch.setattr(study_module, "run_experiment", run_experiment)
    study_module.run_one(study, folder, "B", 0, [])
    assert f"--base_ckpt={checkpoint}" in seen[-1]
    study_module.run_one(two_stage_study(tmp_path, share=False), folder, "B", 0, [])
    assert not any(a.startswith("--base_ckpt") for a in seen[-1])
    # a run that trained its base itself keeps it
    (folder / "B" / "seed_0" / "base").mkdir(parents=True)
    (folder / "B" / "seed_0" / "base" / "metrics.json").write_text("{}")
    assert study_module.shared_stages(study, folder, "B", 0, []) == {}


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "2.5", True])
def test_bad_jobs_is_a_one_line_error(value):
    from experiments.commands.study_jobs import runs_at_once

    with pytest.raises(ConfigError, match="--jobs must be a whole number of runs at once"):
        runs_at_once(jobs=value)
    with pytest.raises(ConfigError, match="--runs_per_device must be a whole number of runs per device"):
        runs_at_once(runs_per_device=value)
    assert runs_at_once("3") == 3 and runs_at_once(1) == 1 and runs_at_once() == 1


def test_runs_per_device_and_placement_on_gpus(tmp_path, monkeypatch):
    """K = devices x runs per device (the CPU counts as one device; --jobs wins), and each run starts on the
    least busy GPU with the cores shared out, so N runs stay on every device."""
    import sys

    from experiments.commands import study_jobs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert study_jobs.runs_at_once(runs_per_device="3") == 3 and study_jobs.runs_at_once(jobs=2, runs_per_device=3) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert study_jobs.runs_at_once(runs_per_device=2) == 4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study_jobs.os, "cpu_count", lambda: 8)
    launcher = study_jobs.Launcher(4)
    report = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"]
    runs = [launcher.start(report, tmp_path / f"{i}.log") for i in range(3)]
    assert [launcher.wait(run) for run in runs] == [0, 0, 0] and [run.where for run in runs] == [" on GPU 0", " on GPU 1", " on GPU 0"]
    assert [(tmp_path / f"{i}.log").read_text() for i in range(3)] == ["0 2\n", "1 2\n", "0 2\n"]
    busy = [launcher.start(report, tmp_path / "a.log"), launcher.start(report, tmp_path / "b.log")]
    launcher.wait(busy[1])  # GPU 1 is free again, GPU 0 still runs one: the next run goes to GPU 1
    last = launcher.start(report, tmp_path / "c.log")
    assert last.device == "1" and launcher.wait(busy[0]) == launcher.wait(last) == 0


def test_a_machine_without_gpu_device_nodes_has_no_devices_without_asking_torch(monkeypatch):
    from experiments.commands import study_jobs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(study_jobs.sys, "platform", "linux")
    monkeypatch.setattr(study_jobs.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(study_jobs.os.path, "exists", lambda path: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: pytest.fail("torch asked on a machine without GPUs"))
    assert study_jobs.devices() == []
    monkeypatch.setattr(study_jobs.glob, "glob", lambda pattern: ["/dev/nvidia0", "/dev/nvidia1"])
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert study_jobs.devices() == ["0", "1"]


# -- the study file's schema, names that stay in the run root, results and state files that survive a kill -------------
@pytest.mark.parametrize("text, message", [
    ('models: {A: exp.yaml}\nseeds: "10"\n', "seeds: expected an integer or a list, got '10'"),
    ("models: {A: exp.yaml}\nseeds: [0, x]\n", "seeds[1]: expected an integer, got 'x'"),
    ("models: {A: exp.yaml}\nargs: --trainer.max_epochs=1\n", "args: expected a list, got '--trainer.max_epochs=1'"),
    ("models: {A: exp.yaml}\nseed: 3\n", "unknown key 'seed' (did you mean 'seeds'?)"),
    ("models: {A: exp.yaml}\ninc: yes please\n", "inc: expected true or false, got 'yes please'"),
    ("models: {A: 5}\n", "models.A: expected a string, got 5"),
    ("- models\n", "expected a mapping, got ['models']"),
    ("models: {A: exp.yaml}\nname: ../../escaped_study\n", "name: a name has only letters, digits"),
    ("models: {A: exp.yaml}\nname: /tmp/escaped_study\n", "name: a name has only letters, digits"),
    ("models: {../A: exp.yaml}\n", "models: a model label has only letters, digits, spaces"),
    ("models: {A/B: exp.yaml}\n", "got 'A/B'"),
    ("models: {A B: exp.yaml, A_B: exp.yaml}\n", "two model labels share a folder name"),
])
def test_study_yamls_are_checked_against_their_schema_in_one_line(tmp_path, text, message, capsys, monkeypatch):
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "study.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_study(tmp_path / "study.yaml")
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{tmp_path / 'study.yaml'}: ")
    with pytest.raises(SystemExit) as stop:
        main(["study", "study.yaml", "--trainer.default_root_dir=a/runs"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml", "study.yaml"]  # nothing written, inside or out


def test_every_shipped_label_is_a_valid_label_and_run_folders_stay_in_the_study_folder(tmp_path):
    from experiments.commands.study_config import run_folder

    assert run_folder(tmp_path, "U-Net, +4 epochs (control)", 1) == tmp_path / "U-Net_4_epochs_control" / "seed_1"
    with pytest.raises(ConfigError, match="lies outside"):  # a label only dots: the second guard, after the schema's
        run_folder(tmp_path, "..", 0)


def test_study_results_are_replaced_together(tmp_path, monkeypatch):
    from experiments.commands import study_tables

    rows = summarize(fake_results(), "U-Net")
    study_tables.write_tables(tmp_path, rows, "U-Net")
    before = {name: (tmp_path / name).read_text() for name in ("results.md", "results.csv", "results.json")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(study_tables.json, "dumps", full_disk)  # results.json, written last, fails
    with pytest.raises(OSError):
        study_tables.write_tables(tmp_path, rows[:1], "U-Net")
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_a_run_folder_with_an_empty_metrics_json_is_one_line(tmp_path):
    from experiments.commands.study import final_stage

    (tmp_path / "metrics.json").write_text("")
    with pytest.warns(UserWarning, match="empty or cut short"), pytest.raises(DataError, match="metrics.json is missing or not a finished run's") as error:
        final_stage(tmp_path)
    assert "\n" not in str(error.value)
