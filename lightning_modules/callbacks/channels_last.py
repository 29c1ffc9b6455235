"""Channels-last memory format for the GPU: a Trainer callback, so checkpoints and hyperparameters stay as they are.

On NVIDIA GPUs, cuDNN's convolutions in bf16/fp16 run on tensor cores in NHWC; with NCHW tensors every
convolution pays a layout transpose. ``ChannelsLast`` converts the module's 4D weights once at fit,
validation, test and predict start, and every 4D tensor of a batch (a dict's values) before its step.
A 5D (3D) network is left as it is. Measure before use: the paper's U-Net (instance norm, whose kernels prefer
NCHW) trains slower in channels-last on a GPU (docs/benchmarks.md), so ``experiments/gpu.yaml`` leaves it out. Stack it with
``--trainer.callbacks+=lightning_modules.callbacks.channels_last.ChannelsLast``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


def _to_channels_last(batch):
    if isinstance(batch, dict):
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                batch[key] = value.contiguous(memory_format=torch.channels_last)


class ChannelsLast(pl.Callback):
    """Model weights and 4D batch tensors in ``torch.channels_last`` (values unchanged, only the layout)."""

    def _convert_module(self, module: pl.LightningModule) -> None:
        module.to(memory_format=torch.channels_last)

    def on_fit_start(self, trainer, pl_module):
        self._convert_module(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._convert_module(pl_module)

    def on_test_start(self, trainer, pl_module):
        self._convert_module(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._convert_module(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _to_channels_last(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        _to_channels_last(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        _to_channels_last(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        _to_channels_last(batch)
