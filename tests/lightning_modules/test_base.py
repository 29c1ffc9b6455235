"""BaseTask's training step reads nothing back to the host on an accelerator (one synchronisation per step
stalls a GPU's queue); on the CPU its losses stay in the progress bar."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

import lightning_modules.base as base
from lightning_modules import BaselineUNet, CMUNet

_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class _CountHostReads(pl.Callback):
    """Counts host reads (``item``, ``tolist``, truth and number conversions) of non-empty floating-point tensors
    during training steps 2-5: on an accelerator each one waits for the device. (MONAI's Dice loss reads an integer
    ``arange`` it makes on the CPU, never a device tensor; it is not counted.)"""

    def __init__(self):
        self.reads, self.originals = 0, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 2:
            for name in _READS:
                original = self.originals[name] = getattr(torch.Tensor, name)

                def counted(tensor, *args, _original=original, **kwargs):
                    self.reads += tensor.numel() > 0 and tensor.dtype.is_floating_point
                    return _original(tensor, *args, **kwargs)

                setattr(torch.Tensor, name, counted)

    def on_train_end(self, trainer, module):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def _fit_counting_reads(task) -> tuple[int, dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        image = torch.rand(2, 1, 32, 32, generator=generator)
        mask = (image > 0.6).float()
        batches.append({"image": image, "mask": mask, "label": (mask.flatten(1).amax(1) > 0).float()})
    counter = _CountHostReads()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[counter])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return counter.reads, trainer.progress_bar_metrics


def test_losses_in_progress_bar_on_the_cpu_only():
    assert base.losses_in_progress_bar(torch.device("cpu"))
    assert not base.losses_in_progress_bar(torch.device("cuda", 0))
    assert not base.losses_in_progress_bar(torch.device("mps"))


def test_on_an_accelerator_a_training_step_reads_nothing_back(monkeypatch):
    # The CPU run stands in for an accelerator's: the choice the module makes there is forced here.
    monkeypatch.setattr(base, "losses_in_progress_bar", lambda device: False)
    for task in (BaselineUNet(lr=1e-3, scheduler="none"), CMUNet(lr=1e-3, scheduler="none")):
        reads, bar = _fit_counting_reads(task)
        assert reads == 0 and not any(key.startswith("train/") for key in bar)


def test_on_the_cpu_the_losses_are_in_the_progress_bar():
    reads, bar = _fit_counting_reads(BaselineUNet(lr=1e-3, scheduler="none"))
    assert "train/loss" in bar
    assert reads >= 4  # Lightning reads each progress-bar loss back at every batch end (4 counted steps)
