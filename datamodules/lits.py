"""The LiTS DataModule: real LiTS / MSD folders, or the embedded synthetic phantom when no root is given."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from torch.utils.data import WeightedRandomSampler

from .cache import CachedVolume, PreprocessSettings, build_cache
from .dataset import SliceDataset, target_channels, training_augmentation
from .nifti import DataError, discover
from .phantom import PHANTOM_VERSION, write_phantom_dataset
from .splits import SPLIT_NAMES, split_volumes


def default_cache_base() -> Path:
    return Path(os.environ.get("LITS_CACHE_DIR", Path.home() / ".cache" / "lits")).expanduser()


class LiTSDataModule(pl.LightningDataModule):
    """Axial slices of LiTS-style CT volumes, preprocessed once into a memory-mapped cache.

    Args:
        root: LiTS folder (``volume-<id>.nii[.gz]`` + ``segmentation-<id>.nii[.gz]``) or MSD
            Task03_Liver folder (``imagesTr/``, ``labelsTr/``). ``None`` generates the synthetic
            phantom dataset into the cache and uses it.
        cache_dir: where generated phantoms and preprocessed entries are kept
            (default ``$LITS_CACHE_DIR`` or ``~/.cache/lits``).
        split: (train, val, test) as volume counts (CMU-Net: ``[10, 2, 5]``) or fractions
            (mask mining: ``[0.85, 0.15, 0]``); drawn by volume with ``split_seed``.
        split_seed: seed of the volume permutation; the same seed gives the same split everywhere.
        train_ids, val_ids, test_ids: explicit volume ids for a split (override ``split`` for it).
        num_folds: k > 1 divides the training volumes into k folds (sorted ids, id i of the sorted
            list in fold i mod k): mask mining's cross-mining, where each fold's error masks come
            from a model that never trained on it.
        holdout_fold: with ``num_folds``, train on every fold but this one (a cross-mining fold model).
        target: ``"liver"`` (labels 1 and 2), ``"lesion"`` (label 2) or ``"both"`` (two channels).
        image_size: in-plane size of the cached slices (CMU-Net: 256).
        hu_window: HU clipping window before scaling to [0, 1] (mask mining: [-100, 600]).
        context_slices: neighbouring slices stacked on each side as extra input channels.
        foreground_margin: if set, training keeps only slices within this many slices of one with
            target foreground (validation and test always use whole volumes).
        positive_fraction: if set, training samples positive slices with this probability.
        augment: random flips, rotation and zoom in the axial plane, training only.
        flip_prob, rotate_degrees, zoom_range, augment_prob: augmentation strengths.
        batch_size, eval_batch_size: training and evaluation batch sizes.
        num_workers: DataLoader workers.
        preprocess_workers: processes for preprocessing (default: all cores).
        phantom_volumes, phantom_seed, phantom_shape, phantom_spacing: the phantom dataset used when
            ``root`` is ``None``.
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
        target: str = "liver",
        image_size: int = 256,
        hu_window: tuple[float, float] = (-100.0, 600.0),
        context_slices: int = 0,
        foreground_margin: int | None = None,
        positive_fraction: float | None = None,
        augment: bool = True,
        flip_prob: float = 0.5,
        rotate_degrees: float = 15.0,
        zoom_range: tuple[float, float] = (0.9, 1.1),
        augment_prob: float = 0.5,
        batch_size: int = 10,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        preprocess_workers: int | None = None,
        phantom_volumes: int = 17,
        phantom_seed: int = 0,
        phantom_shape: tuple[int, int, int] = (192, 192, 48),
        phantom_spacing: tuple[float, float, float] = (2.0, 2.0, 5.0),
    ):
        super().__init__()
        self.save_hyperparameters()
        if image_size % 16:
            raise ValueError(f"image_size must be divisible by 16 (four U-Net poolings), got {image_size}")
        if holdout_fold is not None and not 0 <= holdout_fold < num_folds:
            raise DataError(f"--data.holdout_fold={holdout_fold} needs --data.num_folds above it (folds are 0..num_folds-1)")
        self.settings = PreprocessSettings(float(hu_window[0]), float(hu_window[1]), int(image_size))
        self.volumes: list[CachedVolume] = []
        self.train_folds: dict[int, int] = {}  # volume index -> fold, for every training volume (num_folds > 1)
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, SliceDataset] = {}

    # -- locations ---------------------------------------------------------------------------
    @property
    def cache_base(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else default_cache_base()

    @property
    def data_root(self) -> Path:
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser().resolve()
        x, y, z = self.hparams.phantom_shape
        name = f"v{PHANTOM_VERSION}-seed{self.hparams.phantom_seed}-n{self.hparams.phantom_volumes}-{x}x{y}x{z}"
        spacing = "x".join(f"{s:g}" for s in self.hparams.phantom_spacing)
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
            write_phantom_dataset(
                self.data_root,
                volumes=self.hparams.phantom_volumes,
                seed=self.hparams.phantom_seed,
                shape=tuple(self.hparams.phantom_shape),
                spacing=tuple(self.hparams.phantom_spacing),
                progress=True,
            )
        pairs = discover(self.data_root)
        if check_split:
            self._split([p.volume_id for p in pairs])  # a bad split fails before any preprocessing
        build_cache(pairs, self.entries_dir, self.settings, workers=self.hparams.preprocess_workers)

    def _split(self, volume_ids: list[str]) -> dict[str, list[str]]:
        explicit = {"train": self.hparams.train_ids, "val": self.hparams.val_ids, "test": self.hparams.test_ids}
        return split_volumes(volume_ids, self.hparams.split, self.hparams.split_seed, explicit)

    def setup(self, stage: str | None = None) -> None:
        if self.volumes:
            return
        pairs = discover(self.data_root)
        entries = build_cache(pairs, self.entries_dir, self.settings, workers=self.hparams.preprocess_workers, progress=False)
        self.volumes = [CachedVolume(e) for e in entries]
        self.splits = self._split([v.volume_id for v in self.volumes])
        position = {v.volume_id: i for i, v in enumerate(self.volumes)}
        if self.hparams.num_folds > 1:
            self.train_folds = {position[v]: i % self.hparams.num_folds for i, v in enumerate(sorted(self.splits["train"]))}
            if self.hparams.holdout_fold is not None:
                self.splits["train"] = [v for v in self.splits["train"] if self.train_folds[position[v]] != self.hparams.holdout_fold]
        for name in SPLIT_NAMES:
            indices = [position[i] for i in self.splits[name]]
            chosen = [self.volumes[i] for i in indices]
            slices = [self._training_slices(v) if name == "train" else np.arange(v.num_slices) for v in chosen]
            transform = self._augmentation() if name == "train" and self.hparams.augment else None
            self.datasets[name] = SliceDataset(chosen, indices, slices, self.hparams.target, self.hparams.context_slices, transform)

    def _training_slices(self, volume: CachedVolume) -> np.ndarray:
        margin = self.hparams.foreground_margin
        if margin is None:
            return np.arange(volume.num_slices)
        positive = np.flatnonzero(target_channels(np.asarray(volume.label), self.hparams.target).any(axis=(0, 2, 3)))
        keep = np.zeros(volume.num_slices, dtype=bool)
        for z in positive:
            keep[max(0, z - margin) : z + margin + 1] = True
        return np.flatnonzero(keep)

    def _augmentation(self):
        h = self.hparams
        return training_augmentation(h.flip_prob, h.rotate_degrees, h.zoom_range, h.augment_prob)

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        dataset = self.datasets[name]
        if len(dataset) == 0:
            raise DataError(f"the {name} split of {self.data_root} is empty; give it volumes with --data.split or --data.{name}_ids")
        h = self.hparams
        sampler = None
        if train and h.positive_fraction is not None:
            positive = dataset.slice_labels()
            if positive.all() or not positive.any():
                raise DataError(f"--data.positive_fraction needs both positive and negative training slices in {self.data_root}")
            weights = np.where(positive, h.positive_fraction / positive.sum(), (1 - h.positive_fraction) / (~positive).sum())
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(dataset), replacement=True)
        return DataLoader(
            dataset,
            batch_size=h.batch_size if train else (h.eval_batch_size or h.batch_size),
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=False,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
        )

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
