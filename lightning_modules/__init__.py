"""LightningModules of the suite: one BaseTask, one U-Net backbone, one short subclass per training strategy.

A new training strategy is one module here, exported below (its YAMLs name it ``lightning_modules.<Name>``); what
it can do (``supports_3d``, ``predictor`` for ``lits predict``) is said by the class itself.
"""

from lightning_modules.networks.unet import UNet
from lightning_modules.base import BaseTask
from lightning_modules.baseline import BaselineUNet
from datamodules.errors import CheckpointError
from lightning_modules.cmunet import CMUNet
from lightning_modules.combined import CombinedLiverLesion
from lightning_modules.combined_mask_mining import CombinedMaskMining
from lightning_modules.encoder_pretraining import EncoderPretraining
from lightning_modules.mask_mining import MaskMining
from lightning_modules.pretrained_unet import PretrainedUNet
from lightning_modules.segmentation import SegmentationTask

__all__ = [
    "UNet",
    "BaseTask",
    "SegmentationTask",
    "BaselineUNet",
    "EncoderPretraining",
    "PretrainedUNet",
    "CMUNet",
    "CombinedLiverLesion",
    "CombinedMaskMining",
    "MaskMining",
    "CheckpointError",
]


def volumetric_tasks() -> list[str]:
    """The exported training strategies that take volumes (``supports_3d``), as messages name them."""
    bases = (BaseTask, SegmentationTask)
    classes = [globals()[name] for name in __all__]
    return [cls.__name__ for cls in classes if isinstance(cls, type) and issubclass(cls, BaseTask) and cls not in bases and cls.supports_3d]
