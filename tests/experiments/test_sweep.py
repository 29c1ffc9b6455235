"""`lits sweep`: every sweep YAML passes the engine's schema and the CLI's parser, early termination, bad YAMLs, a 2-trial sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datamodules import DataError
from experiments.stages import load_experiment, stage_overrides
from experiments.sweep import _engine, _engine_run, load_sweep, trial_command
from tests.synthetic import tiny_experiment

SWEEPS = sorted((Path(__file__).parents[2] / "experiments" / "sweeps").glob("*.yaml"))


def lits(*args, cwd, check=True):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("LITS_RUN_VERSION", None)
    result = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def test_there_is_a_sweep_per_model():
    assert {p.stem for p in SWEEPS} >= {"baseline_unet", "encoder_pretraining", "pu_net", "cmunet"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_for_the_engine_and_the_cli(path, tmp_path, monkeypatch):
    """The engine accepts the YAML, and the CLI parser accepts every swept key with the engine's first proposal."""
    from experiments.cli import LitsCLI

    config = load_sweep(path)
    proposal = _engine().next_run(config, [])
    params = {k: v["value"] for k, v in proposal.config.items()}
    command = trial_command(config, params, [], tmp_path / "trial")
    assert command[:3] == [sys.executable, "-m", "experiments.cli"]
    monkeypatch.chdir(Path(__file__).parents[2])
    args = [a for a in command[4:] if not a.startswith(("--run_dir=", "--trainer.default_root_dir="))]
    if command[3] == "fit":
        names, configs = [None], [[a for a in args if not a.startswith("--")]]
        per_stage = [[a for a in args if a.startswith("--") and a != "--config"]]
    else:  # lits run EXPERIMENT: each stage's configs with the overrides that stage receives
        _, stages = load_experiment(args[0])
        names = [s["name"] for s in stages]
        configs = [[str(c) for c in s["config"]] for s in stages]
        per_stage = [stage_overrides(args[1:], s["name"], names) for s in stages]
    for stage, stage_configs, overrides in zip(names, configs, per_stage):
        cli_args = [*[x for c in stage_configs for x in ("--config", c)], *overrides,
                    "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"]
        cli = LitsCLI(args=cli_args, run=False)
        for key, value in params.items():
            scope, rest = key.split(".", 1)
            if scope in names:
                if scope != stage:
                    continue
                key = rest
            node = cli.config
            for part in key.split("."):
                node = node[part]
            assert node == pytest.approx(value) if isinstance(value, float) else node == value, key


def test_the_engine_rejects_bad_sweep_yamls(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "method": ({"method": "annealing", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1]}}, "command": ["lits", "${args}"]}, "rejects it"),
        "no_args": ({"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1]}}, "command": ["lits", "fit"]}, "no \\$\\{args\\} macro"),
        "no_metric": ({"method": "grid", "parameters": {"a": {"values": [1]}}, "command": ["lits", "${args}"]}, "no metric.name"),
    }
    for name, (config, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(DataError, match=message):
            load_sweep(tmp_path / f"{name}.yaml")
    from experiments.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["sweep", "method.yaml", "--count=1"])
    stderr = capsys.readouterr().err
    assert exit_code.value.code == 2 and stderr.startswith("lits: error: method.yaml: the W&B sweep engine rejects it")
    assert len(stderr.strip().splitlines()) == 1


def test_hyperband_stops_a_trailing_trial_from_its_history():
    config = {"method": "random", "metric": {"name": "val/dice_volume", "goal": "maximize"},
              "parameters": {"lr": {"values": [1, 2]}}, "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2}}
    good = [{"name": f"t{i}", "params": {"lr": 1}, "state": "finished", "result": None,
             "history": [{"val/dice_volume": 0.8 + 0.01 * i + 0.01 * e} for e in range(4)]} for i in range(4)]
    bad = {"name": "bad", "params": {"lr": 2}, "state": "running", "history": [{"val/dice_volume": 0.1}, {"val/dice_volume": 0.1}]}
    fine = {**bad, "name": "fine", "history": [{"val/dice_volume": 0.9}, {"val/dice_volume": 0.95}]}
    finished = [_engine_run(t, "val/dice_volume", "maximize") for t in good]
    stop = _engine().stop_runs(config, finished + [_engine_run(bad, "val/dice_volume", "maximize", running=True)])
    assert [r.name for r in stop] == ["bad"]
    assert not _engine().stop_runs(config, finished + [_engine_run(fine, "val/dice_volume", "maximize", running=True)])


def test_two_trial_offline_sweep_end_to_end_and_resume(tmp_path):
    fit = tiny_experiment(tmp_path, max_epochs=2)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(fit))
    sweep = {"program": "lits", "method": "random", "metric": {"name": "val/dice_volume", "goal": "maximize"},
             "parameters": {"model.init_args.lr": {"distribution": "log_uniform_values", "min": 0.0005, "max": 0.01}},
             "command": ["lits", "fit", "--config", "tiny.yaml", "${args}"]}
    (tmp_path / "tiny_sweep.yaml").write_text(yaml.safe_dump(sweep))
    first = lits("sweep", "tiny_sweep.yaml", "--count", "2", "--trainer.default_root_dir=out", "--trainer.limit_train_batches=2", cwd=tmp_path)
    folder = tmp_path / "out" / "sweep_tiny_sweep"
    state = json.loads((folder / "sweep.json").read_text())
    trials = state["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]
    lrs = [t["params"]["model.init_args.lr"] for t in trials]
    assert lrs[0] != lrs[1] and all(0.0005 <= lr <= 0.01 for lr in lrs)
    for trial, lr in zip(trials, lrs):  # each trial ran with its own value and the common override
        config = yaml.safe_load((Path(trial["folder"]) / "config.yaml").read_text())
        assert config["model"]["init_args"]["lr"] == pytest.approx(lr) and config["trainer"]["limit_train_batches"] == 2
        assert len(trial["history"]) == 2 and 0 <= trial["result"]["val/dice_volume"] <= 1
    best = max(trials, key=lambda t: t["result"]["val/dice_volume"])
    assert f"best: {best['name']}" in first.stdout and "| 1 | " in (folder / "results.md").read_text()
    again = lits("sweep", "tiny_sweep.yaml", "--count", "2", "--trainer.default_root_dir=out", cwd=tmp_path)
    assert "trial_002" not in again.stdout and len(json.loads((folder / "sweep.json").read_text())["trials"]) == 2
