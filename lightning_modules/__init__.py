"""LightningModules of the suite: one BaseTask, one U-Net backbone, one short subclass per training strategy."""

from .backbone import UNet
from .base import BaseTask
from .baseline import BaselineUNet
from .segmentation import SegmentationTask

__all__ = ["UNet", "BaseTask", "SegmentationTask", "BaselineUNet"]
