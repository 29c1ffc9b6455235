"""Data: LiTS / MSD NIfTI discovery, the preprocessing cache, volume splits and the LiTS DataModule."""

from .lits import LiTSDataModule
from .nifti import DataError

__all__ = ["LiTSDataModule", "DataError"]
