"""`lits run`: stages in order, weights handed over, overrides reach every stage, and a killed run resumes."""

import json
import re
from pathlib import Path

import pytest
import yaml

from datamodules.errors import ConfigError
from experiments.commands.stages import load_experiment, normalise_overrides
from tests.synthetic import tiny_experiment
from tests.lits_commands import lits as run_lits


def lits(*args, cwd):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "disabled"}, check=True)


@pytest.fixture
def experiment(tmp_path):
    base = tiny_experiment(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "two", "stages": [{"name": "first", "config": "base.yaml"},
                                      {"name": "second", "config": ["base.yaml"], "args": ["--model.init_args.lr=0.002"]}]}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_stages_run_in_order_and_a_killed_run_resumes(experiment):
    out = lits("run", "two.yaml", "--trainer.default_root_dir", "out", "--trainer.max_epochs=2", cwd=experiment)
    run = experiment / "out" / "two"
    final = json.loads((run / "metrics.json").read_text())
    assert set(final["stages"]) == {"first", "second"} and "test/dice_volume" in final
    for stage in ("first", "second"):
        config = yaml.safe_load((run / stage / "config.yaml").read_text())
        assert config["trainer"]["max_epochs"] == 2  # the override reached every stage
    assert yaml.safe_load((run / "second" / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.002
    assert out.stdout.index("stage 1/2 first") < out.stdout.index("stage 2/2 second")

    noise = ("Previous log files in this directory will be deleted", "litlogger", "LeafSpec")
    assert not any(text in out.stdout + out.stderr for text in noise)  # library noise the suite causes is silenced
    rows_before = (run / "second" / "metrics.csv").read_text().splitlines()[1:]

    # simulate a kill during stage 2 after its first epoch: no metrics.json, a last.ckpt from epoch 1
    first_stamp = (run / "first" / "metrics.json").stat().st_mtime_ns
    (run / "second" / "metrics.json").unlink()
    (run / "metrics.json").unlink()
    out = lits("run", "two.yaml", "--trainer.default_root_dir=out", "--trainer.max_epochs=3", cwd=experiment)
    assert "stage 1/2 first: finished earlier, skipped" in out.stdout
    assert "stage 2/2 second (resuming from last.ckpt)" in out.stdout
    assert (run / "first" / "metrics.json").stat().st_mtime_ns == first_stamp
    assert "Restoring states from the checkpoint path" in out.stdout + out.stderr  # continued, not restarted
    assert json.loads((run / "second" / "metrics.json").read_text())["epochs"] == 3
    history = (run / "second" / "metrics.csv").read_text().splitlines()
    assert len(history) > len(rows_before) + 1  # the resumed epoch's rows follow the killed run's, which are kept
    header = history[0].split(",")
    epochs = {float(row.split(",")[header.index("epoch")]) for row in history[1:] if row.split(",")[header.index("epoch")]}
    assert epochs >= {0.0, 1.0, 2.0}


def test_overrides_are_normalised():
    assert normalise_overrides(["--data.root", "x", "--trainer.max_epochs=2", "--flag"]) == ["--data.root=x", "--trainer.max_epochs=2", "--flag"]


@pytest.mark.parametrize("spec, message", [
    ({"stages": []}, "no `stages:` list"),
    ({"trainer": {}}, "no `stages:` list"),
    ({"stages": [{"name": "a", "config": "missing.yaml"}]}, "missing.yaml not found"),
    ({"stages": [{"name": "a", "config": []}, {"name": "b", "weights_from": "c", "weights_arg": "x"}]}, "must name earlier stages"),
])
def test_bad_experiment_files(tmp_path, spec, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_experiment(tmp_path / "bad.yaml")


def test_stage_prefixed_overrides_reach_one_stage_and_given_checkpoints_replace_stages(tmp_path):
    from experiments.commands.stages import given_checkpoints, stage_overrides

    overrides = ["--data.root=d", "--first.model.init_args.lr=0.1", "--second.trainer.max_epochs=3", "--first_ckpt=x.ckpt"]
    assert stage_overrides(overrides, "first", ["first", "second"]) == ["--data.root=d", "--model.init_args.lr=0.1"]
    assert stage_overrides(overrides, "second", ["first", "second"]) == ["--data.root=d", "--trainer.max_epochs=3"]
    with pytest.raises(ConfigError, match="--first_ckpt=x.ckpt: no such checkpoint file"):
        given_checkpoints(overrides, ["first", "second"])
    (tmp_path / "x.ckpt").write_bytes(b"0")
    assert given_checkpoints([f"--first_ckpt={tmp_path / 'x.ckpt'}"], ["first", "second"]) == {"first": str(tmp_path / "x.ckpt")}


def test_a_stage_trains_under_ddp_in_its_forked_process(experiment):
    # A stage is forked from the fork server (experiments/processes.py): its DDP launch must start the other
    # rank with the stage's own command, and every collective call of the fit (validation figures, run
    # folder, checkpoints, epoch history) must be made by both ranks.
    lits("run", "base.yaml", "--trainer.default_root_dir=out", "--trainer.devices=2", "--trainer.strategy=ddp",
         "--trainer.accelerator=cpu", cwd=experiment)
    figures = json.loads((experiment / "out" / "base" / "metrics.json").read_text())
    assert figures["world_size"] == 2 and figures["epochs"] == 1 and figures["test/dice_volume"] >= 0
    assert len((experiment / "out" / "base" / "fit" / "history.jsonl").read_text().splitlines()) == 1


BAD_RUN_YAMLS = [
    ("name: ../../escaped_study\nstages: [{name: a}]\n", "name: a name has only letters, digits, '-', '_' and '.'"),
    ("name: /tmp/escaped\nstages: [{name: a}]\n", "name: a name has only"),
    ("stages: [{name: ../up}]\n", "stages[0].name: a name has only"),
    ("stages: [{name: a, args: --model.init_args.lr=0.1}]\n", "stages[0].args: expected a list, got '--model.init_args.lr=0.1'"),
    ("stages: [a]\n", "stages[0]: expected a mapping, got 'a'"),
    ("- name: a\n", "no `stages:` list"),
    ("stages: [{name: a, config: 5}]\n", "stages[0].config: expected a string or a list, got 5"),
    ("stages: [{name: a}, {name: b, weight_from: a, weights_arg: x}]\n", "stages[1]: unknown key 'weight_from' (did you mean 'weights_from'?)"),
    ("name: x\nstages: [{name: a}\n", r"bad.yaml:3: not valid YAML"),
    ("stages: [{name: a}, {name: a}]\n", "every stage needs a unique `name:`"),
]


@pytest.mark.parametrize("text, message", BAD_RUN_YAMLS)
def test_run_yamls_are_checked_against_their_schema_in_one_line(tmp_path, text, message, capsys, monkeypatch):
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message) if "not valid" not in message else message) as error:
        load_experiment(tmp_path / "bad.yaml")
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as stop:  # and through `lits run`: one line, nothing written anywhere
        main(["run", "bad.yaml", "--trainer.default_root_dir=a/runs"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("lits: error: bad.yaml:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_run_folder_never_lies_outside_the_run_root(tmp_path):
    from experiments.commands.names import inside

    assert inside(tmp_path, tmp_path / "a" / "b") == tmp_path / "a" / "b"
    for escaped in (tmp_path / ".." / "x", tmp_path / "a" / ".." / ".." / "x", "/tmp"):
        with pytest.raises(ConfigError, match="lies outside"):
            inside(tmp_path, escaped)


@pytest.mark.parametrize("cut", ["", '{"best_checkpoint": "/ru'])
def test_a_finished_stage_whose_metrics_json_was_cut_short_runs_again(experiment, monkeypatch, cut):
    """A kill while metrics.json was written (old versions wrote it in place), or a full disk: the stage is not done."""
    from experiments.commands import stages

    run = experiment / "out" / "two"
    (run / "first").mkdir(parents=True)
    (run / "first" / "metrics.json").write_text(cut)
    started = []

    def fake_stage(command, env):  # what a finished `lits fit` leaves: its figures, whole
        folder = Path(next(a for a in command if a.startswith("--run_dir="))[len("--run_dir="):])
        started.append(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"val/dice": 0.5, "best_checkpoint": str(folder / "best.ckpt")}))
        return 0

    monkeypatch.setattr(stages, "run_cli", fake_stage)
    monkeypatch.chdir(experiment)
    with pytest.warns(UserWarning, match="metrics.json.*(empty or cut short|treating it as not done)"):
        stages.run_experiment("two.yaml", ["--trainer.default_root_dir=out"])
    assert started == ["first", "second"]
    final = json.loads((run / "metrics.json").read_text())
    assert final["val/dice"] == 0.5 and final["stage_metrics"]["first"]["val/dice"] == 0.5
