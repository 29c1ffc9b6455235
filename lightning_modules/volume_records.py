"""VolumeRecords: per-volume figures computed where the volume was evaluated, gathered exactly over DDP ranks.

Whole-volume evaluation (the cascade) shards volumes over ranks: each rank scores its own volumes
and records one row of figures per volume. The rows are torchmetrics list states gathered with
``dist_reduce_fx='cat'``; ``compute`` drops the repeats that DistributedSampler's padding adds, so
the figures are those of one process whatever the number of devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class VolumeRecords(Metric):
    """One row of named figures per evaluated volume.

    Args:
        keys: the figure names of a row, in order (every ``update`` gives all of them).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, keys: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self.add_state("volume_index", default=[], dist_reduce_fx="cat")
        self.add_state("figures", default=[], dist_reduce_fx="cat")

    def update(self, volume_index: int, figures: dict[str, float]) -> None:
        missing = [k for k in self.keys if k not in figures]
        if missing:
            raise ValueError(f"volume {volume_index}: figures lack {missing}")
        self.volume_index.append(torch.tensor([int(volume_index)], dtype=torch.long, device=self.device))
        row = torch.tensor([[float(figures[k]) for k in self.keys]], dtype=torch.float64, device=self.device)
        self.figures.append(row)

    def compute(self) -> dict[int, dict[str, float]]:
        """``{volume_index: {key: value}}``, one entry per volume (the first of any repeats)."""
        if isinstance(self.volume_index, list) and not self.volume_index:
            return {}
        volumes = dim_zero_cat(self.volume_index).cpu().tolist()
        rows = dim_zero_cat(self.figures).reshape(len(volumes), len(self.keys)).cpu().tolist()
        result: dict[int, dict[str, float]] = {}
        for volume, row in zip(volumes, rows):
            result.setdefault(int(volume), dict(zip(self.keys, row)))
        return dict(sorted(result.items()))
