"""`lits sweep`: every sweep YAML passes the engine's schema and the CLI's parser, early termination, bad YAMLs and
options, a 2-trial sweep one trial at a time and side by side (--jobs)."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from datamodules.errors import ConfigError
from experiments.commands.stages import load_experiment, stage_overrides
from experiments.commands.sweep_engine import engine, engine_run, load_sweep, trial_command
from tests.synthetic import tiny_experiment
from tests.lits_commands import lits as run_lits

SWEEPS = sorted((Path(__file__).parents[3] / "experiments" / "sweeps").glob("*.yaml"))


def lits(*args, cwd, check=True, env=None):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "disabled", **(env or {})}, check=check)


def test_there_is_a_sweep_per_model():
    assert {p.stem for p in SWEEPS} >= {"baseline_unet", "encoder_pretraining", "pu_net", "cmunet"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_for_the_engine_and_the_cli(path, tmp_path, monkeypatch):
    """The engine accepts the YAML, and the CLI parser accepts every swept key with the engine's first proposal."""
    from experiments.commands.cli import LitsCLI

    config = load_sweep(path)
    proposal = engine().next_run(config, [])
    params = {k: v["value"] for k, v in proposal.config.items()}
    command = trial_command(config, params, [], tmp_path / "trial")
    assert command[:3] == [sys.executable, "-m", "experiments.commands.cli"]
    monkeypatch.chdir(Path(__file__).parents[3])
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
        with pytest.raises(ConfigError, match=message):
            load_sweep(tmp_path / f"{name}.yaml")
    from experiments.commands.cli import main

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
    finished = [engine_run(t, "val/dice_volume", "maximize") for t in good]
    stop = engine().stop_runs(config, finished + [engine_run(bad, "val/dice_volume", "maximize")])
    assert [r.name for r in stop] == ["bad"]
    assert not engine().stop_runs(config, finished + [engine_run(fine, "val/dice_volume", "maximize")])


LRS = [0.001, 0.005]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2-trial grid sweep over the learning rate, run one trial at a time with one thread: (workspace, stdout)."""
    folder = tmp_path_factory.mktemp("sweep")
    fit = tiny_experiment(folder, max_epochs=2)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(fit))
    sweep = {"program": "lits", "method": "grid", "metric": {"name": "val/dice_volume", "goal": "maximize"},
             "parameters": {"model.init_args.lr": {"values": LRS}},
             "command": ["lits", "fit", "--config", "tiny.yaml", "${args}"]}
    (folder / "tiny_sweep.yaml").write_text(yaml.safe_dump(sweep))
    first = lits("sweep", "tiny_sweep.yaml", "--count", "2", "--trainer.default_root_dir=out", "--trainer.limit_train_batches=2",
                 cwd=folder, env={"OMP_NUM_THREADS": "1"})  # the arithmetic of test_trials_side_by_side_match_one_by_one
    return folder, first.stdout


def test_two_trial_offline_sweep_end_to_end_and_resume(grid_sweep, monkeypatch, capsys):
    from experiments.commands.sweep import run_sweep

    workspace, stdout = grid_sweep
    folder = workspace / "out" / "sweep_tiny_sweep"
    trials = json.loads((folder / "sweep.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert sorted(t["params"]["model.init_args.lr"] for t in trials) == LRS
    for trial in trials:  # each trial ran with its own value and the common override
        config = yaml.safe_load((Path(trial["folder"]) / "config.yaml").read_text())
        assert config["model"]["init_args"]["lr"] == pytest.approx(trial["params"]["model.init_args.lr"])
        assert config["trainer"]["limit_train_batches"] == 2
        assert len(trial["history"]) == 2 and 0 <= trial["result"]["val/dice_volume"] <= 1
    best = max(trials, key=lambda t: t["result"]["val/dice_volume"])
    assert f"best: {best['name']}" in stdout and "| 1 | " in (folder / "results.md").read_text()
    monkeypatch.chdir(workspace)  # the rerun, in this process: it finds both trials finished and runs none
    run_sweep("tiny_sweep.yaml", ["--count", "2", "--trainer.default_root_dir=out"])
    assert "trial_002" not in capsys.readouterr().out and len(json.loads((folder / "sweep.json").read_text())["trials"]) == 2


def test_trials_side_by_side_match_one_by_one(grid_sweep, monkeypatch, capsys):
    """--jobs 2 (the sweep in this process, its trials in their own): both trials start before either ends, and give
    the trials and figures of the sweep run one by one."""
    from experiments.commands.sweep import run_sweep

    workspace, _ = grid_sweep
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LITS_RUN_VERSION", raising=False)
    run_sweep("tiny_sweep.yaml", ["--count=2", "--jobs=2", "--trainer.default_root_dir=parallel", "--trainer.limit_train_batches=2"])
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if line.startswith("[lits sweep] trial_")]
    assert [line.split(":")[0] for line in lines[:2]] == ["[lits sweep] trial_000 (1/2)", "[lits sweep] trial_001 (2/2)"], lines
    assert "preparing the data cache" in stdout and all(" = " in line for line in lines[2:4])

    def trials(root):
        found = json.loads((workspace / root / "sweep_tiny_sweep" / "sweep.json").read_text())["trials"]
        return {t["name"]: (t["params"], t["state"], t["history"], {k: v for k, v in t["result"].items() if k.startswith(("val/", "test/"))})
                for t in found}

    assert trials("parallel") == trials("out")


def test_bad_sweep_options_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """--jobs, --runs_per_device and --count are checked before any trial, and a sweep over a setting of the data
    cache cannot run side by side."""
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)
    sweep = {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1]}}, "command": ["lits", "fit", "${args}"]}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(sweep))
    sweep["parameters"] = {"segmentation.data.image_size": {"values": [128, 256]}}
    (tmp_path / "sizes.yaml").write_text(yaml.safe_dump(sweep))
    for args, message in ((["ok.yaml", "--jobs=0"], "--jobs must be a whole number of runs at once, 1 or more; got '0'"),
                          (["ok.yaml", "--runs_per_device=two"], "--runs_per_device must be a whole number of runs per device"),
                          (["ok.yaml", "--count=-1"], "--count must be a whole number of trials"),
                          (["sizes.yaml", "--jobs=2"], "varies segmentation.data.image_size, which the data cache is built with")):
        with pytest.raises(SystemExit) as exit_code:
            main(["sweep", *args])
        stderr = capsys.readouterr().err
        assert exit_code.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "runs").exists()


def test_proposals_count_the_running_trials(tmp_path):
    """Side by side, the engine sees the running trials in flight: a grid skips them, bayes search gets them as running."""
    from experiments.commands.sweep import propose

    config = {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1, 2, 3]}}}
    trials = [{"name": "trial_000", "params": {"a": 1}, "state": "finished", "result": {"val/loss": 0.5}, "history": []},
              {"name": "trial_001", "params": {"a": 2}, "state": "running", "history": []}]
    proposed = propose(config, trials, tmp_path)
    assert proposed["params"] == {"a": 3} and proposed["name"] == "trial_002" and trials[-1] is proposed
    assert [t["name"] for t in json.loads((tmp_path / "sweep.json").read_text())["trials"]] == ["trial_000", "trial_001", "trial_002"]
    assert propose(config, trials, tmp_path) is None  # every grid point is finished or running
    assert engine_run(trials[1], "val/loss", "minimize").state == engine().RunState.running


def test_sweep_yamls_are_checked_against_their_schema_in_one_line(tmp_path):
    good = {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1]}}, "command": ["lits", "fit", "${args}"]}
    cases = {"typo": ({**good, "metirc": good["metric"]}, "unknown key 'metirc' (did you mean 'metric'?)"),
             "parameters": ({**good, "parameters": ["a"]}, "parameters: expected a mapping, got ['a']"),
             "list": ([good], "a sweep YAML is a mapping")}
    for name, (config, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            load_sweep(tmp_path / f"{name}.yaml")
        assert "\n" not in str(error.value)
    (tmp_path / "broken.yaml").write_text("method: grid\nparameters: {a: {values: [1]}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:3: not valid YAML"):
        load_sweep(tmp_path / "broken.yaml")


def test_a_cut_sweep_json_is_a_warning_and_a_fresh_start_not_a_traceback(tmp_path, monkeypatch, capsys):
    from experiments.commands import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.05)
    # a trial program that only writes its figure where `lits run` would (the trial folder's metrics.json)
    (tmp_path / "trial.py").write_text(
        "import json, pathlib, sys\nargs = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
        "folder = pathlib.Path(args['trainer.default_root_dir']); folder.mkdir(parents=True, exist_ok=True)\n"
        "(folder / 'metrics.json').write_text(json.dumps({'val/loss': float(args['a'])}))\n")
    config = {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1, 2]}},
              "command": [sys.executable, "trial.py", "${args}"]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    folder = sweep.run_sweep("tiny.yaml", ["--count=2", "--trainer.default_root_dir=out"])
    state = (folder / "sweep.json").read_text()
    assert [t["state"] for t in json.loads(state)["trials"]] == ["finished", "finished"]
    (folder / "sweep.json").write_text(state[: len(state) // 2])  # a kill while it was written in place (older versions)
    with pytest.warns(UserWarning, match="sweep.json: sweep state is empty or cut short") as caught:
        sweep.run_sweep("tiny.yaml", ["--count=2", "--trainer.default_root_dir=out"])
    assert len([w for w in caught if "sweep.json" in str(w.message)]) == 1
    assert [t["state"] for t in json.loads((folder / "sweep.json").read_text())["trials"]] == ["finished", "finished"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
