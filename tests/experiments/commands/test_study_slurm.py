"""`lits study` with one job per run through submitit: its local executor here, SLURM on a cluster."""

import json

import pytest
import yaml

from datamodules.errors import ConfigError
from experiments.commands.study_slurm import launcher_of, make_executor
from tests.lits_commands import lits
from tests.synthetic import tiny_experiment


def test_a_study_as_one_job_per_run_writes_the_tables_when_its_jobs_have_ended(tmp_path):
    # one run (seed 1, not the default seed 0): each job is a new interpreter, the costliest thing a test can start
    config = tiny_experiment(tmp_path)
    config["trainer"]["limit_train_batches"] = 1
    (tmp_path / "unet.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "seeds": [1], "models": {"U-Net": "unet.yaml"},
        "launcher": "submitit_local", "slurm": {"timeout_min": 10, "partition": "gpu"}}))  # sbatch options: ignored here
    env = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = lits("study", "study.yaml", "--trainer.default_root_dir=out", cwd=tmp_path, env=env, check=True)
    assert result.stdout.count(": job ") == 2 and result.stdout.count("submitted") == 1 and result.stdout.count("done") == 1
    folder = tmp_path / "out" / "tiny"
    rows = json.loads((folder / "results.json").read_text())
    assert [row["model"] for row in rows] == ["U-Net"] and rows[0]["runs"] == 1
    for seed in (1,):  # each job ran the study's single-run mode: its run folder, its seed's split
        run = folder / "U-Net" / f"seed_{seed}"
        assert yaml.safe_load((run / "fit" / "config.yaml").read_text())["data"]["split_seed"] == seed
        assert json.loads((folder / ".jobs" / f"U-Net_seed_{seed}" / "metrics.json").read_text())["test/dice_slice"] >= 0
    assert list((folder / ".submitit").rglob("*_log.out"))  # the jobs' logs
    # the same study on this machine finds both runs finished: the same table
    again = lits("study", "study.yaml", "--trainer.default_root_dir=out", "--launcher=local", cwd=tmp_path, env=env, check=True)
    assert "finished earlier, skipped" in again.stdout and json.loads((folder / "results.json").read_text()) == rows


def test_launcher_and_slurm_settings_are_checked_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--launcher must be one of local, slurm, submitit_local; got 'pbs'"):
        launcher_of({"launcher": "pbs"}, {})
    assert launcher_of({}, {"launcher": "slurm"}) == "slurm" and launcher_of({"launcher": "local"}, {"launcher": "slurm"}) == "local"
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: not a cluster
    with pytest.raises(ConfigError, match="--launcher=slurm: .*srun.*login node"):
        make_executor("slurm", tmp_path, {})
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    executor = make_executor("slurm", tmp_path, {"partition": "gpu", "gpus_per_node": 2, "timeout_min": 90, "account": "lab"})
    assert executor._executor.parameters == {"job_name": "lits-study", "partition": "gpu", "gpus_per_node": 2, "time": 90, "account": "lab"}
    with pytest.raises(ConfigError, match="study `slurm:` settings: Unknown argument 'partitoin'"):
        make_executor("slurm", tmp_path, {"partitoin": "gpu"})
