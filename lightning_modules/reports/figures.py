"""An evaluation's reports: prediction overlays saved as PNG beside the metrics (and logged to W&B when it is a
logger), and the per-volume figures as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402

from datamodules.io.atomic import write_atomically  # noqa: E402


def overlay_figure(samples, title: str) -> plt.Figure:
    """One column per slice: CT with the ground truth (green) and the prediction (red) contours.

    ``samples`` holds ``(caption, image (H, W) in [0, 1], truth bool (H, W), prediction bool (H, W))``.
    """
    figure, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.3), squeeze=False)
    for axis, (caption, image, truth, prediction) in zip(axes[0], samples):
        axis.imshow(np.asarray(image, dtype=np.float32), cmap="gray", vmin=0, vmax=1)
        for mask, colour in ((truth, "lime"), (prediction, "red")):
            mask = np.asarray(mask, dtype=np.float32)
            if mask.any():
                axis.contour(mask, levels=[0.5], colors=colour, linewidths=1)
        axis.set_title(caption, fontsize=8)
        axis.axis("off")
    figure.suptitle(f"{title}  (green: ground truth, red: prediction)", fontsize=9)
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, path: str | Path, loggers=(), key: str | None = None, step: int | None = None) -> Path:
    """Write ``figure`` as PNG to ``path`` and, for every W&B logger, log it under ``key``."""
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    for logger in loggers:
        if isinstance(logger, WandbLogger) and key:
            logger.log_image(key=key, images=[str(path)], step=step)
    return path


def write_per_volume_csv(path: str | Path, per_volume: dict[int, dict[str, float]], volumes) -> None:
    """One row per volume (``volumes[index].volume_id``, then its figures by name, 6 significant digits), by index;
    written whole or not at all."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            names = sorted(next(iter(per_volume.values()), {}))
            writer.writerow(["volume", *names])
            for index, figures in sorted(per_volume.items()):
                writer.writerow([volumes[index].volume_id, *(f"{figures[n]:.6g}" for n in names)])

    write_atomically(path, write)
