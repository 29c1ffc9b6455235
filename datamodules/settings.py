"""The LiTS DataModule's settings checked together, before any data is touched: each inconsistent ``--data.*``
setting is refused with a one-line error naming it and the fix."""

from __future__ import annotations

from datamodules.datasets.crops3d import check_crop_size
from datamodules.io.nifti import DataError
from datamodules.splits import SPLIT_NAMES

SAMPLING_MODES = ("slices", "liver_roi")
AUGMENT_ON = ("sample", "batch")


def check_data_settings(h) -> None:
    """Raise on the first inconsistent setting of ``LiTSDataModule`` (``h``: its ``hparams``): ``ValueError``
    for a value no run could take, ``DataError`` (one line, with the fix) for a combination the suite refuses."""
    if h.augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {h.augment_on!r}")
    if h.image_size % 16:
        raise ValueError(f"image_size must be divisible by 16 (four U-Net poolings), got {h.image_size}")
    if h.holdout_fold is not None and not 0 <= h.holdout_fold < h.num_folds:
        raise DataError(f"--data.holdout_fold={h.holdout_fold} needs --data.num_folds above it (folds are 0..num_folds-1)")
    if h.roi_from not in ("truth", "prediction"):
        raise DataError(f"--data.roi_from must be truth or prediction, got {h.roi_from!r}")
    if h.sampling not in SAMPLING_MODES:
        raise DataError(
            f"--data.sampling={h.sampling!r} is not one of {', '.join(SAMPLING_MODES)}; use slices (whole resized slices) "
            "or liver_roi (full-resolution crops around the liver)"
        )
    if h.crop_size <= 0 or h.crop_size % 16:
        raise DataError(f"--data.crop_size={h.crop_size} must be a positive multiple of 16 (four U-Net poolings), e.g. 256")
    if h.test_split not in SPLIT_NAMES:
        raise DataError(f"--data.test_split={h.test_split!r} is not one of {', '.join(SPLIT_NAMES)}; it names the split that `lits test` evaluates")
    if min(h.crop_margin, h.roi_margin_px, h.roi_margin_slices) < 0:
        raise DataError("--data.crop_margin, --data.roi_margin_px and --data.roi_margin_slices must be non-negative")
    if h.spatial_dims not in (2, 3):
        raise DataError(f"--data.spatial_dims={h.spatial_dims} must be 2 (slices) or 3 (volumes)")
    if h.spatial_dims == 3:
        if h.sampling != "slices":
            raise DataError(f"--data.spatial_dims=3 takes --data.sampling=slices, got {h.sampling}: in 3D the training crops are drawn "
                            "from the resampled volumes, and --data.target=lesion already draws them in and around the liver")
        if h.context_slices:
            raise DataError(f"--data.spatial_dims=3 with --data.context_slices={h.context_slices} is not supported yet; "
                            "set --data.context_slices=0 (the 3D network sees the neighbouring slices itself)")
        if h.augment and h.augment_on == "batch":
            raise DataError("--data.spatial_dims=3 with --data.augment_on=batch is not supported yet; use --data.augment_on=sample")
        try:
            check_crop_size(h.crop_size_3d)
        except DataError as error:
            raise DataError(f"--data.crop_size_3d: {error}") from None
        if h.crops_per_volume < 1:
            raise DataError(f"--data.crops_per_volume={h.crops_per_volume} must be at least 1")
        if not h.slice_spacing_mm > 0:
            raise DataError(f"--data.slice_spacing_mm={h.slice_spacing_mm} must be positive, e.g. 2.5")
