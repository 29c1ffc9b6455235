"""``--checkpoint_every_n_steps N``: last.ckpt every N training steps as well, best.ckpt still chosen on validation.

In this process (no interpreter start-up): a 6-step epoch, stopped by an error as its fourth step begins (as a kill
would stop it), has a last.ckpt of step 2 in the middle of its epoch, and the run resumed from it ends with exactly the
weights of the uninterrupted run: RandomStateCheckpoint replays the epoch's data draws up to the checkpoint's batch
(Lightning would start the interrupted epoch's data over) and restores every random stream as saved.
"""

import json

import pytest
import pytorch_lightning as pl
import torch
import yaml

from tests.synthetic import tiny_experiment


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    """Stops the fit with an error as training step ``step`` (0-based) begins, like a kill at that moment."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    config = tiny_experiment(tmp_path, volumes=2, split=(1, 1, 0), max_epochs=1, lr=0.003)
    config["data"] |= {"batch_size": 1, "eval_batch_size": 6}  # one training volume of 6 slices: 6 steps per epoch
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(*args):
    from experiments.commands.cli import main

    main(["fit", "--config", "tiny.yaml", "--checkpoint_every_n_steps=2", *args])


def test_last_checkpoint_every_n_steps_mid_epoch_and_resume(tiny):
    kill = "--trainer.callbacks+=tests.experiments.test_step_checkpoints.KillAt"
    with pytest.raises(RuntimeError, match="killed at step 3"):
        fit("--run_dir=killed", kill, "--trainer.callbacks.step=3")
    killed = torch.load(tiny / "killed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    progress = killed["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (killed["epoch"], killed["global_step"], progress["ready"]) == (0, 2, 2)  # 2 of the epoch's 6 batches
    assert not (tiny / "killed/checkpoints/best.ckpt").exists()  # no validation yet: no best

    fit("--run_dir=killed", "--ckpt_path=killed/checkpoints/last.ckpt")
    resumed = torch.load(tiny / "killed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (0, 6)
    # the epoch's end wrote the same last.ckpt as the steps did (not a last-v1.ckpt), and the best is validation's
    assert sorted(p.name for p in (tiny / "killed/checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((tiny / "killed/metrics.json").read_text())["best_checkpoint"].endswith("best.ckpt")
    fit("--run_dir=whole")  # the same fit, never interrupted (augmentation on, as in every fit)
    whole = torch.load(tiny / "whole/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert whole["global_step"] == 6
    for name, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_a_bad_step_interval_is_a_one_line_error(tmp_path, capsys):
    from experiments.commands.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", "--checkpoint_every_n_steps=0", "--data.root=nowhere", f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lits: error:")]
    assert stop.value.code == 2 and errors == ["lits: error: --checkpoint_every_n_steps must be a whole number of training steps, 1 or more; got 0"]
    assert not (tmp_path / "runs").exists()
