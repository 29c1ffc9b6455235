"""Data: LiTS / MSD NIfTI discovery, the preprocessing cache, volume splits and the LiTS DataModule.

``LiTSDataModule`` is imported on first use, so that ``from datamodules import DataError`` (the CLI's
orchestration commands) does not import torch and MONAI.
"""

from datamodules.errors import DataError

__all__ = ["LiTSDataModule", "DataError"]


def __getattr__(name: str):
    if name == "LiTSDataModule":
        from datamodules.lits import LiTSDataModule

        return LiTSDataModule
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
