"""BaseTask: the one LightningModule that owns steps, logging and optimisation (torchgeo's BaseTask pattern).

A training strategy is a subclass that overrides small hooks:

==========================  ============================================================
hook                        responsibility
==========================  ============================================================
``configure_models``        build ``self.model`` (the suite's one ``UNet`` backbone)
``configure_losses``        build the loss modules
``configure_metrics``       build the metric collectors (torchmetrics, DDP-safe)
``compute_losses``          model outputs + batch -> dict of loss terms with ``"loss"``
``update_metrics``          feed one evaluation batch to the collectors
``compute_metrics``         epoch end: collectors -> dict of figures (``{stage}/{name}``)
==========================  ============================================================

``__init__`` signatures are the experiment config schema (LightningCLI): every hyperparameter is a
primitive, saved once here by ``save_hyperparameters`` so that ``load_from_checkpoint`` rebuilds the
model. An argument lives in the one class that introduces it; a subclass takes its own new arguments
and passes the others to its parent through ``**kwargs`` (jsonargparse follows ``super().__init__(**kwargs)``
to list them, and ``save_hyperparameters`` collects them from every ``__init__`` on the way).

Every checkpoint says what it is: ``checkpoint["lits_suite"] = {"class_path": ..., "version": ...}`` (the task's
class, as a YAML names it, and the suite's version), which ``checkpoint_task_class`` reads back (``lits predict``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import ClassVar

import torch
import pytorch_lightning as pl
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, StepLR

from lightning_modules.networks.unet import BLOCKS, SPATIAL_DIMS
from datamodules.errors import CheckpointError, ConfigError

SCHEDULERS = ("cosine_warm_restarts", "step", "none")
_FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")  # fused CPU kernel: torch >= 2.4


def losses_in_progress_bar(device: torch.device) -> bool:
    """Whether the training losses go to the progress bar on ``device``: on the CPU only.

    Lightning reads every progress-bar metric back to the host at the end of every training batch, progress bar
    shown or not (``_ResultCollection.metrics`` converts them to numbers; Lightning issue #21232). On an accelerator
    that is a host-device synchronisation per step: the host waits for the step to finish before it queues the
    next one. Without it, a step has no host read-back at all (``tests/lightning_modules/test_base.py`` counts
    them); the loggers still receive every loss, every ``log_every_n_steps``.
    """
    return device.type == "cpu"


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with its fused kernel where every parameter is on a device that has one (CUDA, CPU, ...): the same
    update in one kernel instead of several per parameter tensor, several times faster than the per-tensor loop
    Adam runs on the CPU by default (docs/benchmarks.md). The benchmarks' plain loops use it too, so that they
    compare like with like."""
    params = list(params)  # frozen ones too: an encoder frozen for the first epochs is unfrozen later
    fused = all(p.is_floating_point() and p.device.type in _FUSED_ADAM_DEVICES for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class BaseTask(pl.LightningModule):
    """The backbone and optimisation arguments every task shares.

    Args:
        in_channels: input channels (``2 * data.context_slices + 1``).
        base_channels: the U-Net's first block width (16 in the paper; doubles per block up to 256).
        norm: ``instance`` (paper) or ``batch``.
        spatial_dims: 2 (the paper's slices) or 3 (volumes, (B, C, D, H, W) inputs; the data modules serve 2D slices only).
        block: the U-Net block: ``plain`` (paper), ``residual`` or ``dense`` (see ``lightning_modules.networks.unet``).
        se: follow every U-Net block with a squeeze-and-excitation layer.
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        scheduler: ``cosine_warm_restarts`` (CMU-Net), ``step`` (mask mining) or ``none``.
        restart_period: epochs between cosine warm restarts.
        min_lr: cosine floor.
        step_size: StepLR period (epochs).
        step_gamma: StepLR factor.
    """

    #: metric and mode that select the best checkpoint
    monitor: tuple[str, str] = ("val/loss", "min")
    #: whether the task takes volumes (``spatial_dims: 3``); a 2D-only task says False and is refused in 3D in one line
    supports_3d: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        norm: str = "instance",
        spatial_dims: int = 2,
        block: str = "plain",
        se: bool = False,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        scheduler: str = "cosine_warm_restarts",
        restart_period: int = 10,
        min_lr: float = 0.0,
        step_size: int = 30,
        step_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        # Collects the arguments of every __init__ of the subclass chain (each keeps its own).
        self.save_hyperparameters()
        for name, value, allowed in (("scheduler", scheduler, SCHEDULERS), ("spatial_dims", spatial_dims, SPATIAL_DIMS), ("block", block, BLOCKS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r} (--model.init_args.{name})")
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        raise NotImplementedError

    def configure_losses(self) -> None:
        raise NotImplementedError

    def configure_metrics(self) -> None:
        pass

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        pass

    def compute_metrics(self, stage: str) -> dict[str, float]:
        return {}

    # -- steps -----------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(image)

    def training_outputs(self, batch: dict) -> dict:
        """What ``compute_losses`` scores in training; a task whose networks see more than the image overrides it."""
        return self(batch["image"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(self.training_outputs(batch), batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=losses_in_progress_bar(self.device),
                      batch_size=len(batch["image"]))
        return losses["loss"]

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        outputs = self(batch["image"])
        losses = self.compute_losses(outputs, batch)
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=len(batch["image"]))
        self.update_metrics(stage, outputs, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        # Figures are computed from states already gathered over ranks, so every rank holds the same value.
        for name, value in self.compute_metrics(stage).items():
            self.log(name, value, prog_bar=name == self.monitor[0])

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SUITE_KEY] = {"class_path": task_class_path(type(self)), "version": suite_version()}

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        optimizer = adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        if h.scheduler == "none":
            return optimizer
        if h.scheduler == "step":
            scheduler = {"scheduler": StepLR(optimizer, step_size=h.step_size, gamma=h.step_gamma), "interval": "epoch"}
        else:
            # Stepped per batch so the cosine is smooth; one period = restart_period epochs.
            epochs = max(1, self.trainer.max_epochs or 1)
            steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
            period = max(1, h.restart_period * steps_per_epoch)
            scheduler = {"scheduler": CosineAnnealingWarmRestarts(optimizer, T_0=period, eta_min=h.min_lr), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# -- what a checkpoint holds -----------------------------------------------------------------------
SUITE_KEY = "lits_suite"  # a checkpoint's record of the task class that saved it and the suite's version


def suite_version() -> str:
    """The installed lits-suite's version, ``unknown`` when it runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version("lits-suite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def task_class_path(cls: type) -> str:
    """``lightning_modules.<Name>`` for a task the package exports (as the YAMLs and LightningCLI name it), else its module path."""
    if getattr(importlib.import_module("lightning_modules"), cls.__name__, None) is cls:
        return f"lightning_modules.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_class_path(checkpoint: dict) -> str:
    """The class path of the task that saved ``checkpoint`` (a loaded Lightning checkpoint).

    Its ``lits_suite`` record; else LightningCLI's ``hyper_parameters["_class_path"]``; else, for a checkpoint saved
    before either existed, guessed from the weights: a combined model holds its liver network (``liver_model.*``,
    with error heads once mask-mined), any other holding the suite's network (``model.*``) is a segmentation network
    that ``SegmentationTask`` rebuilds. Empty when nothing says it is a checkpoint of the suite's tasks.
    """
    record = checkpoint.get(SUITE_KEY)
    if isinstance(record, dict) and record.get("class_path"):
        return str(record["class_path"])
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and hparams.get("_class_path"):
        return str(hparams["_class_path"])
    state = checkpoint.get("state_dict") or {}
    if "liver_model.error_head.weight" in state:
        return "lightning_modules.CombinedMaskMining"
    if any(key.startswith("liver_model.") for key in state):
        return "lightning_modules.CombinedLiverLesion"
    if any(str(key).startswith("model.") for key in state):
        return "lightning_modules.SegmentationTask"
    return ""


def checkpoint_task_class(checkpoint: dict, path: str) -> type[BaseTask]:
    """The task class that saved ``checkpoint`` (read from ``path``); one-line CheckpointError when it is not one of the suite's."""
    class_path = checkpoint_class_path(checkpoint)
    if not class_path:
        raise CheckpointError(f"{path} is not a checkpoint of this suite's tasks (no {SUITE_KEY} record, no class path, no model.* weights); "
                              "pass a .ckpt the suite wrote (e.g. <run>/checkpoints/best.ckpt)")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):  # ValueError: no module part at all
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise CheckpointError(f"{path} was saved by {class_path!r}, which is not a task of this suite; pass a checkpoint of the suite's modules")
    return cls
