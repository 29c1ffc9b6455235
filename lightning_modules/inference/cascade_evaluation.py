"""A segmentation network evaluated as the lesion network of a liver-lesion cascade.

With ``liver_checkpoint`` set and the data in ``sampling: liver_roi`` mode, validation and test
samples are whole volumes (``datamodules.datasets.liver_region.VolumeDataset``). Each volume goes through the
cascade (``cascade_2d.predict_volume``: the frozen liver network, then this network at full resolution in
the predicted liver's region) and is scored with the LiTS metrics (``metrics.lits.evaluate_case``) on
the rank that evaluated it. One row of figures per volume is gathered over ranks (``VolumeRecords``),
so the epoch's figures are those of one process whatever the number of devices.

Logged as ``{stage}/liver/<name>`` and ``{stage}/lesion/<name>``: the per-case means (``dice``, ``voe``,
``rvd``, ``assd_mm``, ``mssd_mm``, ``hd95_mm``), ``dice_global``, and for lesions the pooled detection
figures (``lesion_recall``, ``lesion_precision``, lesion counts).

A 3D lesion network's samples are whole resampled volumes (batches of one): ``predict_sample_3d`` runs the 3D cascade
(``cascade_3d.predict_volume_3d``) on them, scored the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.errors import CheckpointError, DataError
from datamodules.io.preprocess import read_box
from datamodules.io.volume3d import original_positions
from lightning_modules.inference.cascade_2d import Predictor, liver_mask, mask_box, predict_volume, slice_probabilities
from lightning_modules.inference.cascade_3d import predict_volume_3d
from lightning_modules.metrics.lits import CASE_KEYS, DETECTION_KEYS, evaluate_case, summarize_cases
from lightning_modules.networks.checkpoints import frozen_model, read_base_checkpoint, rebuilt_model_probability

PARTS = ("liver", "lesion")
FIGURE_KEYS = [f"liver/{k}" for k in CASE_KEYS] + [f"lesion/{k}" for k in CASE_KEYS + DETECTION_KEYS]


class LiverNetwork:
    """A cascade's frozen liver network, rebuilt from its checkpoint.

    It lives outside the task's module tree: not trained, not checkpointed (the task's hyperparameters
    name its checkpoint), not wrapped by DDP.
    """

    def __init__(self, checkpoint: str):
        self.path = checkpoint
        self.arch, weights = read_base_checkpoint(checkpoint)
        self.data = dict(torch.load(checkpoint, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {})
        if self.arch.target not in (None, "liver") or self.arch.out_channels != 1:
            raise CheckpointError(f"liver_checkpoint {checkpoint} was trained on target {self.arch.target!r}; pass the cascade's liver network (--data.target=liver)")
        self.model = frozen_model(self.arch, weights)

    def check_data(self, data) -> None:
        """One-line DataError unless this run's data (``LiTSDataModule.hparams``) gives the liver network the input it
        was trained on: the same in-plane size, HU window and, in 3D, slice spacing (a checkpoint that does not record
        its data is not checked)."""
        keys = ["image_size", "hu_window"] + (["slice_spacing_mm"] if data.get("spatial_dims", 2) == 3 else [])
        for key in keys:
            if key in self.data and key in data and _plain(self.data[key]) != _plain(data[key]):
                raise DataError(f"the liver network {self.path} was trained with --data.{key}={_plain(self.data[key])} but this run has "
                                f"{_plain(data[key])}; train both networks of the cascade on the same --data.{key}")

    def predictor(self, device: torch.device) -> Predictor:
        model = self.model.to(device)
        return lambda image: rebuilt_model_probability(model, self.arch, image)

    @torch.no_grad()
    def training_liver_boxes(self, datamodule, device: torch.device, threshold: float, show_progress: bool) -> dict[int, list | None]:
        """This network's liver (largest component) box in each training volume of ``datamodule``, predicted on ``device``."""
        predict = self.predictor(device)
        boxes = {}
        for index in tqdm(datamodule.datasets["train"].volume_indices, desc="Predicting the liver of the training volumes",
                          unit="vol", disable=not show_progress):
            volume = datamodule.volumes[index]
            image = torch.from_numpy(np.asarray(volume.image, dtype=np.float32)).to(device)
            probs = slice_probabilities(predict, image, self.arch.in_channels)
            boxes[index] = mask_box(liver_mask(probs, tuple(volume.full_shape[1:]), threshold), 0, 0)
        return boxes


def _plain(value):
    """A hyperparameter as a comparable plain value (tuples and lists alike, numbers as floats)."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


def predict_sample(liver: Predictor, liver_in_channels: int, lesion: Predictor, lesion_in_channels: int, sample: dict,
                   **settings) -> dict[str, np.ndarray]:
    """``cascade_2d.predict_volume`` on one ``VolumeDataset`` sample (already on the device); ``settings`` are its region
    and threshold arguments."""
    roi, roi_box = sample["roi_image"].cpu().numpy(), sample["roi_box"].tolist()
    return predict_volume(liver, lesion, sample["image"], lambda box: read_box(roi, roi_box, box, np.float32),
                          sample["full_shape"].tolist(), liver_in_channels=liver_in_channels,
                          lesion_in_channels=lesion_in_channels, **settings)


def predict_sample_3d(liver: Predictor, lesion: Predictor, sample: dict, volume, data, overlap: float, mode: str,
                      **settings) -> dict[str, np.ndarray]:
    """``cascade_3d.predict_volume_3d`` on one whole resampled volume (a batch of one, on the device) of the cached
    ``volume``; ``data``: the data module's hyperparameters; ``overlap`` and ``mode``: the sliding window's."""
    positions = original_positions(volume.num_slices, volume.spacing[0], data.slice_spacing_mm)
    return predict_volume_3d(liver, lesion, sample["image"][0, 0], positions, volume.full_shape, data.volume_3d["crop_size"],
                             overlap, mode, **settings)


def case_figures(labels: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """One volume's LiTS figures, flat: ``{"liver/dice": ..., "lesion/lesion_recall": ...}``."""
    figures = evaluate_case(labels, truth, [float(s) for s in spacing])
    return {f"{part}/{key}": float(value) for part in PARTS for key, value in figures[part].items()}


def summarize_cascade_volumes(per_volume: dict[int, dict[str, float]]) -> dict[str, float]:
    """Epoch figures of the rows of ``case_figures``: ``summarize_cases`` for the liver and for lesions."""
    figures = {}
    for part in PARTS:
        cases = {v: {k.split("/", 1)[1]: x for k, x in row.items() if k.startswith(f"{part}/")} for v, row in per_volume.items()}
        figures |= {f"{part}/{key}": value for key, value in summarize_cases(cases).items()}
    return figures


def part_error_counts(per_volume: dict[int, dict[str, float]], part: str) -> dict[int, dict[str, float]]:
    """Per volume, one part's (``liver`` or ``lesion``) TP / FP / FN voxels and Dice, as mask mining's error report reads them."""
    counts = {}
    for volume, row in per_volume.items():
        tp, pred, truth = (row[f"{part}/{k}"] for k in ("intersection_voxels", "pred_voxels", "truth_voxels"))
        counts[volume] = {"tp_voxels": tp, "fp_voxels": pred - tp, "fn_voxels": truth - tp, "dice_volume": row[f"{part}/dice"]}
    return counts
