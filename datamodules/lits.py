"""The LiTS DataModule: real LiTS / MSD folders, or the embedded synthetic phantom when no root is given."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from torch.utils.data import Dataset, WeightedRandomSampler, default_convert

from datamodules.augment.batch import BatchAugmentation
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset
from datamodules.datasets.slices import target_channels
from datamodules.io.cache import CachedVolume, build_cache
from datamodules.errors import DataError
from datamodules.io.nifti import discover
from datamodules.io.phantom import PHANTOM_VERSION, write_phantom_dataset
from datamodules.io.preprocess import PreprocessSettings
from datamodules.sampling import split_datasets
from datamodules.settings import Augmentation, LiverRoi, Phantom, Volume3D, check_data_settings, setting_group
from datamodules.splits import split_volumes


def default_cache_base() -> Path:
    return Path(os.environ.get("LITS_CACHE_DIR", Path.home() / ".cache" / "lits")).expanduser()


class LiTSDataModule(pl.LightningDataModule):
    """Axial slices of LiTS-style CT volumes, preprocessed once into a memory-mapped cache.

    Four sampling modes (``datamodules.sampling``): ``sampling: slices`` (the liver network: whole axial
    slices resized to ``image_size``), ``sampling: liver_roi`` (a cascade's lesion network: training crops
    at full in-plane resolution in and around the liver, settings in ``liver_roi``; validation and test
    yield one unbatched sample per volume, the resized stack plus the full-resolution region around the
    liver), ``sampling: combined`` (the combined model: each training slice whole at ``image_size``, liver-free
    ones included, with a full-resolution crop of it in the liver region, ``CombinedSliceDataset``; evaluation as
    ``liver_roi``), and ``spatial_dims: 3`` (a 3D network: volumes resampled along z, settings in ``volume_3d``).
    Each group of settings is a dataclass (``datamodules.settings``), nested in the config:
    ``--data.augmentation.flip_prob=0.3``.

    Args:
        root: LiTS folder (``volume-<id>.nii[.gz]`` + ``segmentation-<id>.nii[.gz]``) or MSD
            Task03_Liver folder (``imagesTr/``, ``labelsTr/``). ``None`` generates the synthetic
            ``phantom`` dataset into the cache and uses it.
        cache_dir: where generated phantoms and preprocessed entries are kept
            (default ``$LITS_CACHE_DIR`` or ``~/.cache/lits``).
        split: (train, val, test) as volume counts (CMU-Net: ``[10, 2, 5]``) or fractions
            (mask mining: ``[0.85, 0.15, 0]``); drawn by volume with ``split_seed``.
        split_seed: seed of the volume permutation; the same seed gives the same split everywhere.
        train_ids: explicit volume ids of the training split (overrides ``split`` for it).
        val_ids: explicit volume ids of the validation split.
        test_ids: explicit volume ids of the test split.
        num_folds: k > 1 divides the training volumes into k folds (sorted ids, id i of the sorted
            list in fold i mod k): mask mining's cross-mining, where each fold's error masks come
            from a model that never trained on it.
        holdout_fold: with ``num_folds``, train on every fold but this one (a cross-mining fold model).
        test_split: which split's volumes the test loader (``lits test``, the test after ``lits fit``)
            evaluates: ``"test"`` (default), ``"val"`` or ``"train"`` (e.g. the mask-mining paper's
            training-set Dice: ``lits test ... --data.test_split=train``). It is evaluated like a test
            split: every slice of its volumes, no augmentation (``liver_roi``: whole volumes); ``splits``
            still names the true assignment, ``datasets["test"]`` holds what is tested.
        target: ``"liver"`` (labels 1 and 2), ``"lesion"`` (label 2) or ``"both"`` (two channels).
        image_size: in-plane size of the cached slices (CMU-Net: 256).
        hu_window: HU clipping window before scaling to [0, 1] (mask mining: [-100, 600]).
        context_slices: neighbouring slices stacked on each side as extra input channels (2D only).
        spatial_dims: 2 (default: slices) or 3 (a 3D network; ``sampling: slices`` only, no
            ``context_slices``). The volumes are resampled along z to ``slice_spacing_mm``
            (``resample_volume``, in-plane still ``image_size``); training draws ``batch_size`` random
            ``volume_3d.crop_size`` crops (``Crop3DDataset``: ``target``, ``positive_fraction`` (default 0.5) of
            the crops centred on target foreground, ``InPlaneAugmentation`` when augmenting); validation and
            test yield one whole resampled volume per step (batch size 1, ``eval_batch_size`` does not apply):
            image (1, 1, Z', S, S), mask (1, C, Z', S, S), ``volume_index``, ``volume``, which the segmentation
            task predicts with a sliding window of ``volume_3d.crop_size`` and scores on the original slices,
            as in 2D. ``foreground_margin`` and ``augmentation.applied_to: batch`` do not apply.
        slice_spacing_mm: the z spacing the volumes are resampled to for ``spatial_dims: 3`` (with
            ``image_size`` and ``hu_window``, what a cascade's two networks must agree on).
        sampling: ``"slices"``, ``"liver_roi"`` or ``"combined"`` (see above). ``liver_roi`` trains on every slice with
            liver (``foreground_margin`` does not apply) and evaluates one volume per step
            (``eval_batch_size`` does not apply); ``target`` and ``context_slices`` apply to both.
        foreground_margin: if set, training keeps only slices within this many slices of one with
            target foreground (validation and test always use whole volumes).
        random_crop: ``sampling: slices`` in 2D: train on random ``random_crop`` x ``random_crop`` crops of the
            ``image_size`` slices (the mask-mining paper's liver network: 256 of 512); validation and test still
            see whole slices. ``None`` (default): whole slices.
        positive_fraction: if set, training samples positive slices with this probability (``liver_roi``:
            slices whose whole full-resolution slice has target foreground; 3D: crops centred on it).
        augmentation: the training augmentation (``Augmentation``): random flips, rotation and zoom in the
            axial plane, per sample in the workers or per batch on its device.
        liver_roi: ``sampling: liver_roi``'s (and ``combined``'s) crops and the cached full-resolution region (``LiverRoi``).
        volume_3d: ``spatial_dims: 3``'s training crops (``Volume3D``).
        phantom: the phantom dataset used when ``root`` is ``None`` (``Phantom``).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (default ``batch_size``).
        num_workers: DataLoader workers.
        preprocess_workers: processes for preprocessing (default: all cores).
    """

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str | None = None,
        split: list[float] = [10, 2, 5],
        split_seed: int = 0,
        train_ids: list[str] | None = None,
        val_ids: list[str] | None = None,
        test_ids: list[str] | None = None,
        num_folds: int = 0,
        holdout_fold: int | None = None,
        test_split: str = "test",
        target: str = "liver",
        image_size: int = 256,
        hu_window: tuple[float, float] = (-100.0, 600.0),
        context_slices: int = 0,
        spatial_dims: int = 2,
        slice_spacing_mm: float = 2.5,
        sampling: str = "slices",
        foreground_margin: int | None = None,
        random_crop: int | None = None,
        positive_fraction: float | None = None,
        augmentation: Augmentation = Augmentation(),
        liver_roi: LiverRoi = LiverRoi(),
        volume_3d: Volume3D = Volume3D(),
        phantom: Phantom = Phantom(),
        batch_size: int = 10,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        preprocess_workers: int | None = None,
    ):
        super().__init__()
        self.augmentation: Augmentation = setting_group(Augmentation, augmentation)
        self.liver_roi: LiverRoi = setting_group(LiverRoi, liver_roi)
        self.volume_3d: Volume3D = setting_group(Volume3D, volume_3d)
        self.phantom: Phantom = setting_group(Phantom, phantom)
        # the hyperparameters (and so the checkpoint) keep the groups as plain dicts, which torch.load(weights_only=True) reads
        augmentation, liver_roi, volume_3d, phantom = (asdict(g) for g in (self.augmentation, self.liver_roi, self.volume_3d, self.phantom))
        self.save_hyperparameters()
        check_data_settings(self.hparams, self.augmentation, self.liver_roi, self.volume_3d)
        self.settings = PreprocessSettings(float(hu_window[0]), float(hu_window[1]), int(image_size),
                                           int(self.liver_roi.roi_margin_px), int(self.liver_roi.roi_margin_slices))
        self.volumes: list[CachedVolume] = []
        self.train_folds: dict[int, int] = {}  # volume index -> fold, for every training volume (num_folds > 1)
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, Dataset] = {}  # per split name, as ``datamodules.sampling`` builds them
        a = self.augmentation
        self.batch_augmentation = (
            BatchAugmentation(a.flip_prob, a.rotate_degrees, a.zoom_range, a.prob, intensity_shift=a.intensity_shift,
                              intensity_scale=a.intensity_scale) if a.enabled and a.applied_to == "batch" else None
        )

    # -- locations ---------------------------------------------------------------------------
    @property
    def cache_base(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else default_cache_base()

    @property
    def data_root(self) -> Path:
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser().resolve()
        phantom = self.phantom
        x, y, z = phantom.shape
        name = f"v{PHANTOM_VERSION}-seed{phantom.seed}-n{phantom.volumes}-{x}x{y}x{z}"
        spacing = "x".join(f"{s:g}" for s in phantom.spacing)
        return self.cache_base / "phantom" / f"{name}-{spacing}mm"

    @property
    def entries_dir(self) -> Path:
        root = self.data_root
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
        return self.cache_base / "preprocessed" / f"{root.name}-{digest}"

    # -- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the phantom if needed, check every file and the split, and build or refresh the cache (rank 0 only)."""
        self.prepare(check_split=True)

    def prepare(self, check_split: bool = True) -> None:
        """``prepare_data``; ``check_split=False`` builds the cache of every volume whatever the split asks."""
        if self.hparams.root is None:
            phantom = self.phantom
            write_phantom_dataset(self.data_root, volumes=phantom.volumes, seed=phantom.seed, shape=tuple(phantom.shape),
                                  spacing=tuple(phantom.spacing), progress=True)
        pairs = discover(self.data_root)
        if check_split:
            self._split([p.volume_id for p in pairs])  # a bad split fails before any preprocessing
        build_cache(pairs, self.entries_dir, self.settings, workers=self.hparams.preprocess_workers)

    def _split(self, volume_ids: list[str]) -> dict[str, list[str]]:
        explicit = {"train": self.hparams.train_ids, "val": self.hparams.val_ids, "test": self.hparams.test_ids}
        return split_volumes(volume_ids, self.hparams.split, self.hparams.split_seed, explicit)

    def setup(self, stage: str | None = None) -> None:
        if self.batch_augmentation is not None and stage in (None, "fit"):
            # Lightning restores a resumed run's stream (load_state_dict) after this
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.batch_augmentation.seed(torch.initial_seed(), rank)
        if self.volumes:
            return
        h = self.hparams
        pairs = discover(self.data_root)
        entries = build_cache(pairs, self.entries_dir, self.settings, workers=h.preprocess_workers, progress=False)
        volumes = [CachedVolume(e) for e in entries]
        splits = self._split([v.volume_id for v in volumes])
        position = {v.volume_id: i for i, v in enumerate(volumes)}
        train_folds = {}
        if h.num_folds > 1:
            train_folds = {position[v]: i % h.num_folds for i, v in enumerate(sorted(splits["train"]))}
            if h.holdout_fold is not None:
                splits["train"] = [v for v in splits["train"] if train_folds[position[v]] != h.holdout_fold]
        training = [volumes[position[v]] for v in splits["train"]]
        if h.target in ("lesion", "both") and training and not any(v.label_counts[2] for v in training):
            raise DataError(
                f"--data.target={h.target} but the {len(training)} training volume(s) of {self.data_root} have no lesion "
                "voxel (label 2); lesion training needs LiTS labels (0 background, 1 liver, 2 lesion)"
            )
        datasets = split_datasets(self, volumes, splits)
        self.volumes, self.splits, self.train_folds, self.datasets = volumes, splits, train_folds, datasets

    def use_predicted_liver(self, boxes: dict[int, list | None]) -> None:
        """``liver_roi.roi_from: prediction``: draw the training crops around the liver network's liver instead of the
        ground truth's (``boxes``: volume index -> the predicted liver's box, None where none was found)."""
        train, roi = self.datasets["train"], self.liver_roi
        self.datasets["train"] = LiverCropDataset(train.volumes, train.volume_indices, self.hparams.target, self.hparams.context_slices,
                                                  roi.crop_size, roi.crop_margin, train.transform, [boxes[i] for i in train.volume_indices])

    # -- batch augmentation (augmentation.applied_to: batch) -------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment training batches (``augmentation.applied_to: batch``), then run the LightningModule's own hook.

        Lightning calls only the data module's ``on_after_batch_transfer`` when both define one (and
        warns that it does), so this one calls the module's, which then sees the augmented batch, as
        mask mining needs (its error masks are computed from the exact input).
        """
        trainer = self.trainer
        if trainer is None:
            return batch
        if self.batch_augmentation is not None and trainer.training and isinstance(batch, dict):
            batch = self.batch_augmentation(batch)
        return trainer.lightning_module.on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict:
        """The batch augmentation's random stream (``augmentation.applied_to: batch``); nothing otherwise."""
        return {"batch_augmentation": self.batch_augmentation.state_dict()} if self.batch_augmentation is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.batch_augmentation is not None and "batch_augmentation" in state_dict:
            self.batch_augmentation.load_state_dict(state_dict["batch_augmentation"])

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        dataset = self.datasets[name]
        if len(dataset) == 0:
            split = self.hparams.test_split if name == "test" else name
            raise DataError(f"the {split} split of {self.data_root} is empty; give it volumes with --data.split or --data.{split}_ids")
        h = self.hparams
        workers = {"num_workers": h.num_workers, "persistent_workers": h.num_workers > 0}
        if h.spatial_dims == 3:  # crops drawn by Crop3DDataset itself; whole volumes one at a time
            return DataLoader(dataset, batch_size=h.batch_size if train else 1, shuffle=train, drop_last=False, **workers)
        if isinstance(dataset, VolumeDataset):  # one whole volume per step, unbatched
            # MONAI's default collate would try to batch the single sample
            return DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=default_convert, **workers)
        sampler = self._positive_sampler(dataset) if train and h.positive_fraction is not None else None
        batch_size = h.batch_size if train else (h.eval_batch_size or h.batch_size)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=False, **workers)

    def _positive_sampler(self, dataset: Dataset) -> WeightedRandomSampler:
        """Draws positive training samples with probability ``positive_fraction``."""
        fraction = self.hparams.positive_fraction
        positive = dataset.slice_labels()
        if positive.all() or not positive.any():
            raise DataError(f"--data.positive_fraction needs both positive and negative training slices in {self.data_root}")
        weights = np.where(positive, fraction / positive.sum(), (1 - fraction) / (~positive).sum())
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(dataset), replacement=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # -- evaluation support ------------------------------------------------------------------
    def eval_target(self, volume_index: int) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Ground truth of a volume at its original resolution: bool (C, Z, H, W), and spacing (sz, sy, sx) in mm."""
        volume = self.volumes[volume_index]
        return target_channels(volume.label_full(), self.hparams.target), volume.spacing

    @property
    def num_target_channels(self) -> int:
        return 2 if self.hparams.target == "both" else 1
