"""The run console and logs: a resumed run's CSV history is continued, not deleted; W&B's offline hint."""

import csv

from experiments.commands.console import HistoryCSVLogger, wandb_offline_hint


def test_a_second_logger_in_the_same_folder_continues_metrics_csv(tmp_path):
    first = HistoryCSVLogger(tmp_path, name="", version="")
    first.log_metrics({"train/loss": 0.5, "epoch": 0}, step=0)
    first.save()
    resumed = HistoryCSVLogger(tmp_path, name="", version="")
    resumed.log_metrics({"train/loss": 0.4, "val/dice": 0.7, "epoch": 1}, step=5)  # a new column too
    resumed.save()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["0", "5"]
    assert rows[0]["train/loss"] == "0.5" and rows[0]["val/dice"] == "" and rows[1]["val/dice"] == "0.7"


def test_wandb_offline_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_hint(tmp_path) is None  # no W&B run in the folder
    (tmp_path / "wandb" / "offline-run-20261127_120000-abc").mkdir(parents=True)
    assert wandb_offline_hint(tmp_path) == f"W&B (offline): upload with `wandb sync {tmp_path / 'wandb' / 'offline-run-20261127_120000-abc'}`"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_offline_hint(tmp_path) is None
