"""A study's table from a W&B sweep: the API lists the runs in any order, reruns and stray seeds included."""

import random

import pytest
import wandb

from experiments.commands.study_sweep import results_from_wandb

STUDY = {"models": {"U-Net": "u.yaml", "CMU-Net": "c.yaml"}, "seeds": [0, 1, 2]}


class Run:
    def __init__(self, label, seed, dice, created, state="finished"):
        self.config, self.state, self.id = {"model": label, "seed": seed}, state, f"{label}-{seed}-{created}"
        self.summary, self.created_at = {"test/dice_volume": dice}, f"2026-12-0{created}T10:00:00Z"


def runs() -> list[Run]:
    listed = [Run(label, seed, 0.8 + 0.01 * seed + (0.05 if label == "CMU-Net" else 0), created=2) for label in STUDY["models"] for seed in (0, 1, 2)]
    listed += [Run("CMU-Net", 1, 0.10, created=1),  # an older finished run of CMU-Net's seed 1, rerun since
               Run("U-Net", 7, 0.99, created=3),  # a seed the study does not have
               Run("U-Net", 2, 0.00, created=4, state="crashed")]
    return listed


@pytest.mark.parametrize("order", range(5))
def test_runs_from_a_sweep_are_keyed_by_seed_whatever_their_order(order, monkeypatch, capsys):
    listed = runs()
    random.Random(order).shuffle(listed)
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"sweep": lambda self, path: type("Sweep", (), {"runs": listed})()})())
    results = results_from_wandb("me/proj/abc", STUDY)
    assert results == {"U-Net": {s: {"test/dice_volume": pytest.approx(0.8 + 0.01 * s)} for s in (0, 1, 2)},
                       "CMU-Net": {s: {"test/dice_volume": pytest.approx(0.85 + 0.01 * s)} for s in (0, 1, 2)}}
    assert [list(seeds) for seeds in results.values()] == [[0, 1, 2], [0, 1, 2]]
    assert "several finished runs of CMU-Net/seed 1; the latest, CMU-Net-1-2, is used" in capsys.readouterr().out
