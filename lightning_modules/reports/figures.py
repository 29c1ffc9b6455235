"""Figures: prediction overlays saved as PNG beside the metrics and logged to W&B when it is a logger."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402


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
