"""LightningModules of the suite: one BaseTask, one U-Net backbone, one short subclass per training strategy."""

from .backbone import UNet
from .base import BaseTask
from .baseline import BaselineUNet
from .classification import CheckpointError
from .cmunet import CMUNet
from .combined import CombinedLiverLesion
from .combined_mask_mining import CombinedMaskMining
from .encoder_pretraining import EncoderPretraining
from .mask_mining import MaskMining
from .pretrained_unet import PretrainedUNet
from .segmentation import SegmentationTask

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
