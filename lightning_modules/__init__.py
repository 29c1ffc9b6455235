"""LightningModules of the suite: one BaseTask, one U-Net backbone, one short subclass per training strategy."""

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
