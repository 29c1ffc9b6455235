"""The LiTS DataModule: real LiTS / MSD folders, or the embedded synthetic phantom when no root is given."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from torch.utils.data import Dataset, WeightedRandomSampler, default_convert

from datamodules.augment.batch import BatchAugmentation
from datamodules.io.cache import CachedVolume, PreprocessSettings, build_cache
from datamodules.datasets.crops3d import Crop3DDataset, InPlaneAugmentation, WholeVolume3DDataset
from datamodules.datasets.slices import SliceDataset, target_channels, training_augmentation
from datamodules.io.nifti import DataError, discover
from datamodules.io.phantom import PHANTOM_VERSION, write_phantom_dataset
from datamodules.datasets.liver_region import LiverCropDataset, VolumeDataset
from datamodules.settings import check_data_settings
from datamodules.splits import SPLIT_NAMES, split_volumes


def default_cache_base() -> Path:
    return Path(os.environ.get("LITS_CACHE_DIR", Path.home() / ".cache" / "lits")).expanduser()


class LiTSDataModule(pl.LightningDataModule):
    """Axial slices of LiTS-style CT volumes, preprocessed once into a memory-mapped cache.

    Two sampling modes: ``"slices"`` (the liver network: whole axial slices resized to
    ``image_size``, every split a ``SliceDataset``) and ``"liver_roi"`` (a cascade's lesion network:
    training draws ``crop_size`` crops at full in-plane resolution in and around the liver, a
    ``LiverCropDataset``; validation and test yield one unbatched ``VolumeDataset`` sample per
    volume, the resized stack plus the full-resolution region around the liver).

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
        positive_fraction: if set, training samples positive slices with this probability (``liver_roi``:
            slices whose whole full-resolution slice has target foreground).
        augment: random flips, rotation and zoom in the axial plane, training only.
        augment_on: where ``augment`` runs. ``"sample"`` (default): MONAI's transforms
            (``training_augmentation``) on each sample in the DataLoader workers, on the CPU.
            ``"batch"``: the training datasets return un-augmented samples and
            ``on_after_batch_transfer`` augments each training batch where it is (the GPU when training on
            one) with ``BatchAugmentation``: the same parameter distributions, one resampling per sample,
            ``label`` recomputed from the augmented mask; validation, test and prediction batches are never
            augmented. Both sampling modes. Its random stream starts at ``setup("fit")`` from
            ``torch.initial_seed()`` (``seed_everything``) and the trainer's global rank, and the data
            module's ``state_dict`` (stored by Lightning in every checkpoint, restored on resume) carries it.
            Both modes give the same augmentation statistics, not the same random draws.
        sampling: ``"slices"`` or ``"liver_roi"`` (see above). ``liver_roi`` trains on every slice with
            liver (``foreground_margin`` does not apply) and evaluates one volume per step
            (``eval_batch_size`` does not apply); ``target`` and ``context_slices`` apply to both.
        crop_size: ``liver_roi`` training crop side in full-resolution pixels (paper: 256; divisible by 16).
        crop_margin: ``liver_roi`` crop centres are drawn uniformly in the liver's bounding box grown by
            this many pixels (and clipped to the cached region).
        roi_from: ``liver_roi`` training crops around the ground-truth liver (``"truth"``, the paper) or
            around the liver network's prediction (``"prediction"``, as at inference: the cascade's lesion
            network computes it once before training, largest component, its slices and in-plane box).
        roi_margin_px, roi_margin_slices: the full-resolution region cached around the liver is its
            bounding box grown by these margins (pixels in-plane, slices in z), clipped to the volume;
            beyond it ``liver_roi`` crops read 0. Changing them rebuilds the cache.
        flip_prob, rotate_degrees, zoom_range, augment_prob: augmentation strengths.
        batch_size, eval_batch_size: training and evaluation batch sizes.
        num_workers: DataLoader workers.
        preprocess_workers: processes for preprocessing (default: all cores).
        phantom_volumes, phantom_seed, phantom_shape, phantom_spacing: the phantom dataset used when
            ``root`` is ``None``.
        test_split: which split's volumes the test loader (``lits test``, the test after ``lits fit``)
            evaluates: ``"test"`` (default), ``"val"`` or ``"train"`` (e.g. the mask-mining paper's
            training-set Dice: ``lits test ... --data.test_split=train``). It is evaluated like a test
            split: every slice of its volumes, no augmentation (``liver_roi``: whole ``VolumeDataset``
            volumes); ``splits`` still names the true assignment, ``datasets["test"]`` holds what is tested.
        spatial_dims: 2 (default: the slices above) or 3 (a 3D network; ``sampling: slices`` only, no
            ``context_slices``). The volumes are resampled along z to ``slice_spacing_mm`` (``resample_volume``,
            in-plane still ``image_size``); training draws ``batch_size`` random ``crop_size_3d`` crops
            (``Crop3DDataset``: ``target``, ``positive_fraction`` (default 0.5) of the crops centred on target
            foreground, ``InPlaneAugmentation`` when ``augment``, ``crops_per_volume`` crops per training volume per epoch);
            validation and test yield one whole resampled volume per step (batch size 1, ``eval_batch_size``
            does not apply): image (1, 1, Z', S, S), mask (1, C, Z', S, S), ``volume_index``, ``volume``, which
            the segmentation task predicts with a sliding window of ``crop_size_3d`` and scores on the original
            slices, as in 2D. ``foreground_margin`` and ``augment_on: batch`` do not apply.
        crop_size_3d: (D, H, W) of the 3D training crops and of the evaluation's sliding window (the paper's
            128x128x64: ``[64, 128, 128]``); each divisible by 16 and at most the resampled training volumes'.
        slice_spacing_mm: the z spacing the volumes are resampled to for ``spatial_dims: 3``.
        crops_per_volume: ``spatial_dims: 3``: random crops drawn from each training volume per epoch (an epoch of
            few volumes is otherwise a handful of steps, each followed by Lightning's epoch-end work).
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
        augment_on: str = "sample",
        flip_prob: float = 0.5,
        rotate_degrees: float = 15.0,
        zoom_range: tuple[float, float] = (0.9, 1.1),
        augment_prob: float = 0.5,
        sampling: str = "slices",
        crop_size: int = 256,
        crop_margin: int = 16,
        roi_from: str = "truth",
        roi_margin_px: int = 64,
        roi_margin_slices: int = 4,
        batch_size: int = 10,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        preprocess_workers: int | None = None,
        phantom_volumes: int = 17,
        phantom_seed: int = 0,
        phantom_shape: tuple[int, int, int] = (192, 192, 48),
        phantom_spacing: tuple[float, float, float] = (2.0, 2.0, 5.0),
        test_split: str = "test",
        spatial_dims: int = 2,
        crop_size_3d: list[int] = [64, 128, 128],
        slice_spacing_mm: float = 2.5,
        crops_per_volume: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_data_settings(self.hparams)
        self.settings = PreprocessSettings(
            float(hu_window[0]), float(hu_window[1]), int(image_size), int(roi_margin_px), int(roi_margin_slices)
        )
        self.volumes: list[CachedVolume] = []
        self.train_folds: dict[int, int] = {}  # volume index -> fold, for every training volume (num_folds > 1)
        self.splits: dict[str, list[str]] = {}
        # slices: a SliceDataset per split; liver_roi: a LiverCropDataset for train, VolumeDatasets for val and test
        self.datasets: dict[str, Dataset] = {}
        self.batch_augmentation = (
            BatchAugmentation(flip_prob, rotate_degrees, zoom_range, augment_prob) if augment and augment_on == "batch" else None
        )

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
        datasets = {}
        for name in SPLIT_NAMES:
            # the test loader evaluates the volumes of `test_split` (default: the test split itself)
            indices = [position[i] for i in splits[h.test_split if name == "test" else name]]
            chosen = [volumes[i] for i in indices]
            transform = self._augmentation() if name == "train" and h.augment and h.augment_on == "sample" else None
            if h.spatial_dims == 3:
                datasets[name] = self._dataset_3d(name, chosen, indices)
            elif h.sampling == "liver_roi" and name == "train":
                datasets[name] = LiverCropDataset(chosen, indices, h.target, h.context_slices, h.crop_size, h.crop_margin, transform)
                if chosen and not len(datasets[name]):
                    raise DataError(
                        f"--data.sampling=liver_roi but the {len(chosen)} training volume(s) of {self.data_root} have no liver "
                        "slice (label >= 1); use LiTS labels (0 background, 1 liver, 2 lesion) or --data.sampling=slices"
                    )
            elif h.sampling == "liver_roi":
                datasets[name] = VolumeDataset(chosen, indices)
            else:
                slices = [self._training_slices(v) if name == "train" else np.arange(v.num_slices) for v in chosen]
                datasets[name] = SliceDataset(chosen, indices, slices, h.target, h.context_slices, transform)
        self.volumes, self.splits, self.train_folds, self.datasets = volumes, splits, train_folds, datasets

    def _dataset_3d(self, name: str, chosen: list[CachedVolume], indices: list[int]) -> Dataset:
        """``spatial_dims: 3``: random crops for training, whole resampled volumes otherwise."""
        h = self.hparams
        if name != "train":
            return WholeVolume3DDataset(chosen, indices, h.target, h.slice_spacing_mm)
        transform = InPlaneAugmentation(h.flip_prob, h.rotate_degrees, h.zoom_range, h.augment_prob) if h.augment else None
        positive = 0.5 if h.positive_fraction is None else h.positive_fraction
        dataset = Crop3DDataset(chosen, indices, h.crop_size_3d, h.target, positive, samples_per_volume=h.crops_per_volume, transform=transform,
                                slice_spacing_mm=h.slice_spacing_mm, crop_margin=h.crop_margin)
        crop = tuple(int(v) for v in h.crop_size_3d)
        for volume in dataset.volumes:
            if any(k > n for k, n in zip(crop, volume.shape)):
                raise DataError(
                    f"--data.crop_size_3d={list(crop)} (D, H, W) is larger than training volume {volume.volume.volume_id} "
                    f"resampled to {h.slice_spacing_mm:g} mm slices, {list(volume.shape)}; use a crop of at most that size on every "
                    "axis (multiples of 16), or a smaller --data.slice_spacing_mm"
                )
        return dataset

    def use_predicted_liver(self, boxes: dict[int, list | None]) -> None:
        """``roi_from: prediction``: draw the training crops around the liver network's liver instead of the
        ground truth's (``boxes``: volume index -> the predicted liver's box, None where none was found)."""
        train = self.datasets["train"]
        h = self.hparams
        self.datasets["train"] = LiverCropDataset(train.volumes, train.volume_indices, h.target, h.context_slices, h.crop_size,
                                                  h.crop_margin, train.transform, [boxes[i] for i in train.volume_indices])

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

    # -- batch augmentation (augment_on: batch) ---------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment training batches (``augment_on: batch``), then run the LightningModule's own hook.

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
        """The batch augmentation's random stream (``augment_on: batch``); nothing otherwise."""
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
        sampler = None
        if h.spatial_dims == 3:  # crops drawn by Crop3DDataset itself; whole volumes one at a time
            return DataLoader(
                dataset,
                batch_size=h.batch_size if train else 1,
                shuffle=train,
                drop_last=False,
                num_workers=h.num_workers,
                persistent_workers=h.num_workers > 0,
            )
        if train and h.positive_fraction is not None:
            positive = dataset.slice_labels()
            if positive.all() or not positive.any():
                raise DataError(f"--data.positive_fraction needs both positive and negative training slices in {self.data_root}")
            weights = np.where(positive, h.positive_fraction / positive.sum(), (1 - h.positive_fraction) / (~positive).sum())
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(dataset), replacement=True)
        if isinstance(dataset, VolumeDataset):  # one whole volume per step, unbatched
            return DataLoader(
                dataset,
                batch_size=None,
                shuffle=False,
                collate_fn=default_convert,  # MONAI's default collate would try to batch the single sample
                num_workers=h.num_workers,
                persistent_workers=h.num_workers > 0,
            )
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
