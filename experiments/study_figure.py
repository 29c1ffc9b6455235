"""The qualitative figure of a study (the CMU-Net paper's Fig. 2): the same test slices as CT, ground truth, and each model's prediction."""

from __future__ import annotations

import importlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from datamodules import LiTSDataModule  # noqa: E402


def _load_model(stage_folder: Path):
    config = yaml.safe_load((stage_folder / "config.yaml").read_text())
    module, _, name = config["model"]["class_path"].rpartition(".")
    checkpoint = yaml.safe_load((stage_folder / "metrics.json").read_text())["best_checkpoint"]
    return getattr(importlib.import_module(module), name).load_from_checkpoint(checkpoint, map_location="cpu").eval(), config


def qualitative_figure(model_folders: dict[str, Path], path: Path, slices_per_figure: int = 4) -> Path:
    """``model_folders``: label -> the final stage folder of one seed's run of that model (same seed for all)."""
    models = {label: _load_model(folder) for label, folder in model_folders.items()}
    config = next(iter(models.values()))[1]
    datamodule = LiTSDataModule(**{**config["data"], "num_workers": 0})
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    # each test volume's slice with the most liver, so every row shows a different patient
    best: dict[str, tuple[float, int]] = {}
    for i in range(len(dataset)):
        position, z = dataset.index[i]
        area = float((np.asarray(dataset.volumes[position].label[z]) >= 1).sum())
        volume = dataset.volumes[position].volume_id
        if area > best.get(volume, (0.0, -1))[0]:
            best[volume] = (area, i)
    chosen = [i for _, i in sorted(best.values(), reverse=True)][:slices_per_figure]
    columns = ["CT", "ground truth", *models]
    figure, axes = plt.subplots(len(chosen), len(columns), figsize=(2.4 * len(columns), 2.4 * len(chosen)), squeeze=False)
    for row, index in enumerate(chosen):
        sample = dataset[index]
        image = sample["image"][sample["image"].shape[0] // 2]
        masks = [None, sample["mask"][0] > 0.5]
        with torch.no_grad():
            for model, _ in models.values():
                probability = model.foreground_probability(model(sample["image"][None]))[0, 0]
                masks.append(probability >= model.hparams.threshold)
        for column, mask in enumerate(masks):
            axis = axes[row, column]
            axis.imshow(image, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                axis.imshow(np.ma.masked_where(~mask.numpy(), mask.numpy()), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[column], fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{sample['volume']} z={sample['slice_index']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
