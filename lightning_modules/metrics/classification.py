"""Slice-classification figures (liver present or not): binary accuracy, AUROC and F1 as torchmetrics states, so the
figures are exact under DDP."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score


def classification_metrics(stage: str) -> MetricCollection:
    """Binary accuracy, AUROC and F1 of one stage, computed as ``{stage}/accuracy`` etc."""
    return MetricCollection(
        {"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC(), "f1": BinaryF1Score()}, prefix=f"{stage}/"
    )


def update_classification(metrics: MetricCollection, logits: torch.Tensor, batch: dict) -> None:
    """Feed (B, 1) logits and ``batch["label"]``; probabilities are thresholded at 0.5."""
    metrics.update(torch.sigmoid(logits.detach().float()).reshape(-1), batch["label"].reshape(-1).long())


def compute_classification(metrics: MetricCollection) -> dict[str, float]:
    """The epoch's figures (gathered over ranks), then reset; empty when nothing was seen."""
    if not any(metric.update_count for metric in metrics.values()):
        return {}
    figures = {name: float(value) for name, value in metrics.compute().items()}
    metrics.reset()
    return figures
