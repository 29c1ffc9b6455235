"""A fit killed after an epoch and resumed from its last.ckpt ends exactly as the uninterrupted fit:
the same weights and the same figures (every random stream restored: sampler, augmentation, crops)."""

import json

import torch
import yaml

from tests.experiments.commands.test_stages import lits
from tests.synthetic import tiny_experiment


def test_fit_2_epochs_equals_fit_1_then_resume_to_2(tmp_path):
    config = tiny_experiment(tmp_path, volumes=3, max_epochs=2, lr=0.003, restart_period=2)
    config["seed_everything"] = 3
    config["data"]["augmentation"] = {"enabled": True, "prob": 1.0}  # the transforms' own random streams must come back too
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    lits("fit", "--config", "tiny.yaml", "--run_dir=whole", cwd=tmp_path)
    lits("fit", "--config", "tiny.yaml", "--run_dir=killed", "--trainer.max_epochs=1", cwd=tmp_path)  # "killed" after epoch 1
    resumed = lits("fit", "--config", "tiny.yaml", "--run_dir=killed", "--ckpt_path=killed/checkpoints/last.ckpt", cwd=tmp_path)
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr

    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    killed = torch.load(tmp_path / "killed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert whole["epoch"] == killed["epoch"] == 1 and whole["global_step"] == killed["global_step"]
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, killed["state_dict"][name]), name
    figures = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "killed")]
    assert {k: v for k, v in figures[0].items() if k.startswith(("val/", "test/"))} == {k: v for k, v in figures[1].items() if k.startswith(("val/", "test/"))}
