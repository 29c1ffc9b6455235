"""A study's figures: the qualitative figure (the CMU-Net paper's Fig. 2: the same test slices as CT, ground truth, and each
model's prediction) and the lesion error types before and after mask mining (the mask-mining paper's Fig. 4)."""

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
from datamodules.errors import CheckpointError  # noqa: E402
from datamodules.io.atomic import read_state  # noqa: E402
from datamodules.settings import grouped_data_config  # noqa: E402
from experiments.commands.study_tables import ERROR_TYPES  # noqa: E402
from lightning_modules.networks.checkpoints import load_task_checkpoint  # noqa: E402


def _load_model(stage_folder: Path):
    config = yaml.safe_load((stage_folder / "config.yaml").read_text())
    module, _, name = config["model"]["class_path"].rpartition(".")
    checkpoint = (read_state(stage_folder / "metrics.json", "metrics.json") or {}).get("best_checkpoint")
    if not checkpoint:
        raise CheckpointError(f"{stage_folder}: its metrics.json names no best checkpoint (an unfinished run?); run the study again")
    task = getattr(importlib.import_module(module), name)
    return load_task_checkpoint(checkpoint, map_location="cpu", task=task).eval(), config


def qualitative_figure(model_folders: dict[str, Path], path: Path, slices_per_figure: int = 4) -> Path:
    """``model_folders``: label -> the final stage folder of one seed's run of that model (same seed for all)."""
    models = {label: _load_model(folder) for label, folder in model_folders.items()}
    config = next(iter(models.values()))[1]
    datamodule = LiTSDataModule(**{**grouped_data_config(config["data"]), "num_workers": 0})  # run folders of either layout
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


# -- the mask-mining paper's Fig. 4: lesion error types before and after mining ------------------------------------
ERROR_TITLES = {"fp": "FP", "fn": "FN", "tp": "TP"}
_LOSS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def setup_and_loss(label: str) -> tuple[str, str]:
    """A study model's label ``"<setup>, <mining loss>"`` -> (setup, loss); a label without a comma is a setup alone."""
    setup, _, loss = label.rpartition(",")
    return (setup.strip(), loss.strip()) if setup else (label.strip(), "")


def normalised_error_bars(counts: dict[str, dict[str, dict[str, float]]]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """Bar heights of Fig. 4: ``counts[label] = {"before": {"fp", "fn", "tp"}, "after": {...}}`` (voxels) ->
    ``{(setup, loss, error type): (before, after)}``, each pair (one bar group) divided by its larger bar
    (a group whose bars are both 0 stays at 0)."""
    bars = {}
    for label, pair in counts.items():
        setup, loss = setup_and_loss(label)
        for t in ERROR_TYPES:
            before, after = float(pair["before"][t]), float(pair["after"][t])
            top = max(before, after) or 1.0
            bars[(setup, loss, t)] = (before / top, after / top)
    return bars


def lesion_error_types_figure(counts: dict[str, dict[str, dict[str, float]]], path: Path, seeds: int | None = None,
                              split: str = "validation") -> Path:
    """Fig. 4 of the mask-mining paper: per setup (one panel) and mining loss, the lesion FP / FN / TP voxels
    before (grey) and after mining, each before/after pair normalised to its larger bar; the raw counts are
    printed on the bars and the change in percent under each pair. ``counts``: as ``normalised_error_bars`` takes them."""
    bars = normalised_error_bars(counts)
    raw = {(*setup_and_loss(label), t): (pair["before"][t], pair["after"][t]) for label, pair in counts.items() for t in ERROR_TYPES}
    setups = list(dict.fromkeys(setup for setup, _, _ in bars))
    losses = list(dict.fromkeys(loss for _, loss, _ in bars))
    colours = dict(zip(losses, _LOSS_COLOURS * (1 + len(losses) // len(_LOSS_COLOURS))))
    groups = [(t, loss) for t in ERROR_TYPES for loss in losses]
    figure, axes = plt.subplots(1, len(setups), figsize=(1.2 + 0.9 * len(groups) * len(setups), 3.8), squeeze=False, sharey=True)
    width = 0.38
    for axis, setup in zip(axes[0], setups):
        ticks, names, labelled = [], [], set()
        for g, (t, loss) in enumerate(groups):
            if (setup, loss, t) not in bars:
                continue
            x = g + (g // len(losses)) * 0.6  # a gap between error types
            for offset, height, count, colour, name in (
                (-width / 2, bars[(setup, loss, t)][0], raw[(setup, loss, t)][0], "#9e9e9e", "before mining"),
                (width / 2, bars[(setup, loss, t)][1], raw[(setup, loss, t)][1], colours[loss], f"after mining{f' ({loss})' if loss else ''}"),
            ):
                axis.bar(x + offset, height, width, color=colour, label=None if name in labelled else name)
                labelled.add(name)
                axis.text(x + offset, height + 0.02, f"{int(count):,}", ha="center", va="bottom", fontsize=6, rotation=90)
            before, after = raw[(setup, loss, t)]
            change = f"{100 * (after - before) / before:+.0f}%" if before else "n/a"
            ticks.append(x)
            names.append(f"{ERROR_TITLES[t]}{f' {loss}' if loss else ''}\n{change}")
        axis.set_xticks(ticks, names, fontsize=7)
        axis.set_ylim(0, 1.5)
        axis.set_title(setup, fontsize=10)
        axis.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("lesion voxels (relative to the larger bar)", fontsize=8)
    summed = f", summed over {seeds} seed{'s' if seeds != 1 else ''}" if seeds else ""
    figure.suptitle(f"Lesion FP / FN / TP before and after mask mining ({split} volumes{summed})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
