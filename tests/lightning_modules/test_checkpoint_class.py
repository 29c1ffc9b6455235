"""Checkpoints say what they are: the task class that saved them and the suite's version, read back by ``lits predict``."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import lightning_modules
from datamodules.errors import CheckpointError
from lightning_modules import BaselineUNet, CMUNet, CombinedLiverLesion, CombinedMaskMining, MaskMining, SegmentationTask
from lightning_modules.base import SUITE_KEY, checkpoint_class_path, checkpoint_task_class, suite_version


def one_batch_loader(size: int = 32):
    mask = torch.zeros(2, 1, size, size)
    mask[:, 0, 8:20, 10:22] = 1
    batch = {"image": torch.rand(2, 1, size, size), "mask": mask, "label": torch.ones(2)}
    return DataLoader([batch], batch_size=None)


def saved_checkpoint(task, path) -> dict:
    """``task`` trained one step by a Trainer and saved by it, then read back as ``lits predict`` reads it."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(task, train_dataloaders=one_batch_loader())
    trainer.save_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_saved_checkpoint_carries_the_class_path_and_version(tmp_path):
    checkpoint = saved_checkpoint(BaselineUNet(base_channels=4), tmp_path / "baseline.ckpt")
    assert checkpoint[SUITE_KEY] == {"class_path": "lightning_modules.BaselineUNet", "version": suite_version()}
    assert suite_version() != ""  # the installed package's version, or "unknown" from a bare source tree
    assert checkpoint_task_class(checkpoint, "baseline.ckpt") is BaselineUNet


def test_a_task_outside_the_exports_is_recorded_by_its_module_path(tmp_path):
    class LocalTask(BaselineUNet):
        pass

    checkpoint = {}
    LocalTask(base_channels=4).on_save_checkpoint(checkpoint)
    assert checkpoint[SUITE_KEY]["class_path"] == f"{__name__}.test_a_task_outside_the_exports_is_recorded_by_its_module_path.<locals>.LocalTask"


@pytest.mark.parametrize("cls", [BaselineUNet, CMUNet, MaskMining, CombinedLiverLesion, CombinedMaskMining])
def test_the_record_comes_before_the_hyperparameters_and_the_weights(cls):
    checkpoint = {SUITE_KEY: {"class_path": f"lightning_modules.{cls.__name__}", "version": "0.1.0"},
                  "hyper_parameters": {"_class_path": "lightning_modules.BaselineUNet"},
                  "state_dict": {"liver_model.error_head.weight": torch.zeros(1)}}
    assert checkpoint_class_path(checkpoint) == f"lightning_modules.{cls.__name__}"
    assert checkpoint_task_class(checkpoint, "x.ckpt") is cls


def test_an_old_checkpoint_without_the_record_is_recognised_as_before():
    seg = {"model.segmentation_head.weight": torch.zeros(1)}
    # LightningCLI's own record of the class, when the checkpoint has it
    assert checkpoint_class_path({"hyper_parameters": {"_class_path": "lightning_modules.CMUNet"}, "state_dict": seg}) == "lightning_modules.CMUNet"
    # else the weights: a combined model holds its liver network (with error heads once mask-mined)
    assert checkpoint_class_path({"hyper_parameters": {}, "state_dict": {"liver_model.seg.weight": torch.zeros(1)}}) == "lightning_modules.CombinedLiverLesion"
    assert checkpoint_class_path({"state_dict": {"liver_model.error_head.weight": torch.zeros(1)}}) == "lightning_modules.CombinedMaskMining"
    assert checkpoint_task_class({"hyper_parameters": {}, "state_dict": seg}, "x.ckpt") is SegmentationTask


@pytest.mark.parametrize("class_path", ["os.system", "collections.OrderedDict", "no_such_module.Task", "Task", "lightning_modules.NoSuchTask"])
def test_a_class_path_that_is_not_a_task_of_the_suite_is_a_one_line_error(class_path):
    with pytest.raises(CheckpointError, match="is not a task of this suite"):
        checkpoint_task_class({SUITE_KEY: {"class_path": class_path, "version": "0.1.0"}}, "x.ckpt")


def test_the_3d_capable_tasks_are_read_from_the_classes():
    assert not CMUNet.supports_3d and not CombinedLiverLesion.supports_3d and not CombinedMaskMining.supports_3d
    assert BaselineUNet.supports_3d and MaskMining.supports_3d
    assert lightning_modules.volumetric_tasks() == ["BaselineUNet", "EncoderPretraining", "PretrainedUNet", "MaskMining"]
