"""What a run prints: the suite's progress and figures, not library noise it causes itself.

Silenced, each because the suite makes it pointless:
* Lightning's CSV logger warning "Previous log files in this directory will be deleted": the suite's
  ``HistoryCSVLogger`` keeps them (a resumed run appends to its ``metrics.csv``).
* Lightning's "Tip: ... litlogger" advertisement, printed by every Trainer.
* Lightning's ``isinstance(treespec, LeafSpec)`` deprecation (Lightning's own use of torch's pytree,
  not the suite's; it repeats at every fit, validation and test).
* Lightning's "You have overridden `on_after_batch_transfer` in both `LightningModule` and
  `LightningDataModule`": ``LiTSDataModule``'s hook (the batch augmentation) calls the module's own
  (mask mining's error masks) on purpose.
* Lightning's "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is
  not resumable": ``RandomStateCheckpoint`` replays the epoch's data draws up to the checkpoint (exact resume).
* W&B's console chatter in offline mode (``WANDB_SILENT``; the run's folder and the ``wandb sync``
  command are printed once by the suite instead). A user's own ``WANDB_SILENT`` wins.
Every other warning still shows.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


def quiet_library_noise() -> None:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in both `LightningModule` and `LightningDataModule`")
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable")

    class _NoTip(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

    # rank_zero_info logs through the rank-zero module's logger, whichever module called it
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTip())
    if os.environ.get("WANDB_MODE") == "offline":
        os.environ.setdefault("WANDB_SILENT", "true")


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, never deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = handle.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: the rows logged before a kill stay, the
    resumed run appends after them (the steps between the last checkpoint and the kill appear twice,
    the second time as the resumed run logged them)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_offline_hint(log_dir: str | Path) -> str | None:
    """One line naming the offline W&B run(s) under ``log_dir`` and how to upload them, or None."""
    runs = sorted(Path(log_dir).glob("wandb/offline-run-*"))
    if os.environ.get("WANDB_MODE") != "offline" or not runs:
        return None
    return f"W&B (offline): upload with `wandb sync {runs[-1]}`"
