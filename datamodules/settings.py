"""The LiTS DataModule's grouped settings, their checks, and how to read them back.

Each sampling mode's own settings are a group (a frozen dataclass), which LightningCLI reads as a
nested config: ``--data.augmentation.flip_prob=0.3`` or, in a YAML, ``augmentation: {flip_prob: 0.3}``.
``check_data_settings`` refuses each inconsistent ``--data.*`` setting, before any data is touched,
with a one-line error naming it and the fix. ``data_setting`` reads one setting from a data module's
hyperparameters, whether a checkpoint stored them grouped or, before the groups, flat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from datamodules.datasets.crops3d import check_crop_size
from datamodules.errors import ConfigError
from datamodules.splits import SPLIT_NAMES

SAMPLING_MODES = ("slices", "liver_roi", "combined")
AUGMENT_ON = ("sample", "batch")


@dataclass(frozen=True)
class Augmentation:
    """Random flips, rotation and zoom in the axial plane, training only.

    Args:
        enabled: augment the training samples.
        applied_to: ``"sample"``: MONAI's transforms (``training_augmentation``) on each sample in the
            DataLoader workers, on the CPU. ``"batch"``: the training datasets return un-augmented samples and
            the data module's ``on_after_batch_transfer`` augments each training batch where it is (the GPU
            when training on one) with ``BatchAugmentation``: the same parameter distributions, one
            resampling per sample, ``label`` recomputed from the augmented mask; validation, test and
            prediction batches are never augmented. Its random stream starts at ``setup("fit")`` from
            ``torch.initial_seed()`` and the trainer's global rank, and the data module's ``state_dict``
            (in every checkpoint, restored on resume) carries it. Both give the same augmentation
            statistics, not the same random draws.
        flip_prob: probability of a flip along each in-plane axis.
        rotate_degrees: rotations are drawn within +-this angle.
        zoom_range: (min, max) zoom factor.
        prob: probability of the rotation, and of the zoom.
        intensity_shift: every training image (windowed to [0, 1]) is shifted by an offset drawn within
            +-this, after the spatial transforms (MONAI's ``RandShiftIntensityd``); 0, the default, is off.
            Not in the papers: nnU-Net's brightness augmentation, which keeps a model from tying the liver
            to one contrast phase.
        intensity_scale: and scaled by 1 + a factor drawn within +-this (``RandScaleIntensityd``); 0 is off.
    """

    enabled: bool = True
    applied_to: str = "sample"
    flip_prob: float = 0.5
    rotate_degrees: float = 15.0
    zoom_range: tuple[float, float] = (0.9, 1.1)
    prob: float = 0.5
    intensity_shift: float = 0.0
    intensity_scale: float = 0.0


@dataclass(frozen=True)
class Phantom:
    """The synthetic phantom dataset generated into the cache when ``root`` is not given.

    Args:
        volumes: number of volumes.
        seed: volume i is drawn from seed ``seed * 100003 + i``.
        shape: (X, Y, Z) voxels.
        spacing: (sx, sy, sz) in mm.
    """

    volumes: int = 17
    seed: int = 0
    shape: tuple[int, int, int] = (192, 192, 48)
    spacing: tuple[float, float, float] = (2.0, 2.0, 5.0)


@dataclass(frozen=True)
class LiverRoi:
    """``sampling: liver_roi``: a cascade's lesion network, trained on full-resolution crops around the liver
    (``sampling: combined`` draws the combined model's lesion crops with ``crop_size`` and ``crop_margin`` too).

    Args:
        crop_size: training crop side in full-resolution pixels (paper: 256; divisible by 16).
        crop_margin: crop centres are drawn uniformly in the liver's bounding box grown by this many
            pixels (and clipped to the cached region).
        roi_from: crops around the ground-truth liver (``"truth"``, the paper) or around the liver network's
            prediction (``"prediction"``, as at inference: the cascade's lesion network computes it once
            before training, largest component, its slices and in-plane box).
        roi_margin_px: the full-resolution region cached around the liver is its bounding box grown by
            this many pixels in-plane, clipped to the volume; beyond it crops read 0. Changing it
            rebuilds the cache.
        roi_margin_slices: the same margin along z, in slices.
    """

    crop_size: int = 256
    crop_margin: int = 16
    roi_from: str = "truth"
    roi_margin_px: int = 64
    roi_margin_slices: int = 4


@dataclass(frozen=True)
class Volume3D:
    """``spatial_dims: 3``: random training crops of the volumes resampled to ``slice_spacing_mm``.

    Args:
        crop_size: (D, H, W) of the training crops and of the evaluation's sliding window (the paper's
            128x128x64: ``[64, 128, 128]``); each divisible by 16. A volume shorter than it on an axis is padded
            (``Crop3DDataset``: air and background; the sliding window: air, its output cropped back).
        crop_margin: with ``target: lesion``, the crops that are not centred on a lesion are centred in the
            liver's bounding box grown by this many voxels.
        crops_per_volume: random crops drawn from each training volume per epoch (an epoch of few volumes
            is otherwise a handful of steps, each followed by Lightning's epoch-end work).
    """

    crop_size: list[int] = field(default_factory=lambda: [64, 128, 128])
    crop_margin: int = 16
    crops_per_volume: int = 1


SETTING_GROUPS = {"augmentation": Augmentation, "phantom": Phantom, "liver_roi": LiverRoi, "volume_3d": Volume3D}

# Each grouped setting and its flat name before the groups: the keys of checkpoints written then.
FLAT_NAMES = {
    "augmentation.enabled": "augment",
    "augmentation.applied_to": "augment_on",
    "augmentation.flip_prob": "flip_prob",
    "augmentation.rotate_degrees": "rotate_degrees",
    "augmentation.zoom_range": "zoom_range",
    "augmentation.prob": "augment_prob",
    "phantom.volumes": "phantom_volumes",
    "phantom.seed": "phantom_seed",
    "phantom.shape": "phantom_shape",
    "phantom.spacing": "phantom_spacing",
    "liver_roi.crop_size": "crop_size",
    "liver_roi.crop_margin": "crop_margin",
    "liver_roi.roi_from": "roi_from",
    "liver_roi.roi_margin_px": "roi_margin_px",
    "liver_roi.roi_margin_slices": "roi_margin_slices",
    "volume_3d.crop_size": "crop_size_3d",
    "volume_3d.crop_margin": "crop_margin",
    "volume_3d.crops_per_volume": "crops_per_volume",
}


def setting_group(group: type, value):
    """``value`` as the settings dataclass ``group``: a mapping (a saved config, a test's dict) is unpacked into it."""
    return group(**value) if isinstance(value, Mapping) else value


def data_setting(hparams: Mapping, key: str, default=None):
    """One setting of a ``LiTSDataModule``'s hyperparameters (``datamodule.hparams``, or a checkpoint's
    ``datamodule_hyper_parameters``) by its name in the config, e.g. ``"volume_3d.crop_size"`` or ``"image_size"``.

    A checkpoint written before the settings were grouped holds a grouped one under its flat name
    (``FLAT_NAMES``: ``crop_size_3d``); ``default`` where the hyperparameters do not record it.
    """
    group, _, name = key.rpartition(".")
    if group and isinstance(hparams.get(group), Mapping):
        return hparams[group].get(name, default)
    return hparams.get(FLAT_NAMES.get(key, key), default)


def grouped_data_config(config: Mapping) -> dict:
    """A data config (a run folder's ``config.yaml`` ``data:``, a checkpoint's hyperparameters) in the grouped layout:
    one written before the groups has its flat settings moved into them (``crop_margin`` into both groups that
    take one, as it applied to both); one written after is returned as it is."""
    grouped = {key: value for key, value in config.items() if key not in FLAT_NAMES.values()}
    for key, flat in FLAT_NAMES.items():
        if flat in config:
            group, _, name = key.partition(".")
            grouped.setdefault(group, {})[name] = config[flat]
    return grouped


def check_data_settings(h, augmentation: Augmentation, liver_roi: LiverRoi, volume_3d: Volume3D) -> None:
    """Raise on the first inconsistent setting of ``LiTSDataModule`` (``h``: its ``hparams``, and its setting
    groups): ``ValueError`` for a value no run could take, ``DataError`` (one line, with the fix) for a
    combination the suite refuses."""
    if augmentation.applied_to not in AUGMENT_ON:
        raise ConfigError(f"--data.augmentation.applied_to must be one of {', '.join(AUGMENT_ON)}, got {augmentation.applied_to!r}")
    if min(augmentation.intensity_shift, augmentation.intensity_scale) < 0 or augmentation.intensity_scale >= 1:
        raise ConfigError("--data.augmentation.intensity_shift must be >= 0 and --data.augmentation.intensity_scale in [0, 1), "
                          f"got {augmentation.intensity_shift} and {augmentation.intensity_scale}")
    if h.image_size % 16:
        raise ConfigError(f"--data.image_size must be divisible by 16 (four U-Net poolings), got {h.image_size}")
    if h.holdout_fold is not None and not 0 <= h.holdout_fold < h.num_folds:
        raise ConfigError(f"--data.holdout_fold={h.holdout_fold} needs --data.num_folds above it (folds are 0..num_folds-1)")
    if liver_roi.roi_from not in ("truth", "prediction"):
        raise ConfigError(f"--data.liver_roi.roi_from must be truth or prediction, got {liver_roi.roi_from!r}")
    if h.sampling not in SAMPLING_MODES:
        raise ConfigError(
            f"--data.sampling={h.sampling!r} is not one of {', '.join(SAMPLING_MODES)}; use slices (whole resized slices) "
            "or liver_roi (full-resolution crops around the liver) or combined (both, for the combined model)"
        )
    if h.sampling == "combined" and augmentation.enabled and augmentation.applied_to == "batch":
        raise ConfigError("--data.sampling=combined augments each whole slice and its full-resolution crop together in the dataset; "
                          "set --data.augmentation.applied_to=sample")
    if liver_roi.crop_size <= 0 or liver_roi.crop_size % 16:
        raise ConfigError(f"--data.liver_roi.crop_size={liver_roi.crop_size} must be a positive multiple of 16 (four U-Net poolings), e.g. 256")
    if h.test_split not in SPLIT_NAMES:
        raise ConfigError(f"--data.test_split={h.test_split!r} is not one of {', '.join(SPLIT_NAMES)}; it names the split that `lits test` evaluates")
    if min(liver_roi.crop_margin, liver_roi.roi_margin_px, liver_roi.roi_margin_slices, volume_3d.crop_margin) < 0:
        raise ConfigError("--data.liver_roi.crop_margin, --data.liver_roi.roi_margin_px, --data.liver_roi.roi_margin_slices and "
                        "--data.volume_3d.crop_margin must be non-negative")
    if h.get("random_crop") is not None:
        _check_random_crop(h)
    if h.spatial_dims not in (2, 3):
        raise ConfigError(f"--data.spatial_dims={h.spatial_dims} must be 2 (slices) or 3 (volumes)")
    if h.spatial_dims == 3:
        _check_3d_settings(h, augmentation, volume_3d)


def _check_random_crop(h) -> None:
    crop = h.random_crop
    if crop <= 0 or crop % 16 or crop > h.image_size:
        raise ConfigError(f"--data.random_crop={crop} must be a positive multiple of 16 (four U-Net poolings) no larger than "
                          f"--data.image_size={h.image_size}, or null for whole slices")
    if h.sampling != "slices" or h.spatial_dims != 2:
        raise ConfigError("--data.random_crop crops the whole 2D slices of --data.sampling=slices; liver_roi and 3D draw their own "
                          "crops (--data.liver_roi.crop_size, --data.volume_3d.crop_size): set --data.random_crop=null")


def _check_3d_settings(h, augmentation: Augmentation, volume_3d: Volume3D) -> None:
    if h.sampling != "slices":
        raise ConfigError(f"--data.spatial_dims=3 takes --data.sampling=slices, got {h.sampling}: in 3D the training crops are drawn "
                        "from the resampled volumes, and --data.target=lesion already draws them in and around the liver")
    if h.context_slices:
        raise ConfigError(f"--data.spatial_dims=3 with --data.context_slices={h.context_slices} is not supported yet; "
                        "set --data.context_slices=0 (the 3D network sees the neighbouring slices itself)")
    if augmentation.enabled and augmentation.applied_to == "batch":
        raise ConfigError("--data.spatial_dims=3 with --data.augmentation.applied_to=batch is not supported yet; "
                        "use --data.augmentation.applied_to=sample")
    try:
        check_crop_size(volume_3d.crop_size)
    except ConfigError as error:
        raise ConfigError(f"--data.volume_3d.crop_size: {error}") from None
    if volume_3d.crops_per_volume < 1:
        raise ConfigError(f"--data.volume_3d.crops_per_volume={volume_3d.crops_per_volume} must be at least 1")
    if not h.slice_spacing_mm > 0:
        raise ConfigError(f"--data.slice_spacing_mm={h.slice_spacing_mm} must be positive, e.g. 2.5")
