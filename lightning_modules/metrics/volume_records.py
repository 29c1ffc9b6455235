"""Per-volume figures computed where the volume was evaluated, gathered exactly over DDP ranks.

Whole-volume evaluation (the cascade) shards volumes over ranks: each rank scores its own volumes
and records one row of figures per volume (``VolumeRecords``). The rows are torchmetrics list states
gathered with ``dist_reduce_fx='cat'``; ``compute`` drops the repeats that DistributedSampler's padding
adds, so the figures are those of one process whatever the number of devices.

Slice evaluation gathers every slice's prediction to every rank; the per-volume work that follows
(reassembly at the original resolution, largest component, surface distances) is then shared out:
``volume_share`` picks a rank's volumes and ``gather_volume_rows`` merges the ranks' rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
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


def volume_share(volumes: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The volumes rank ``rank`` of ``world_size`` scores: every ``world_size``-th, so the shares differ by one
    volume at most. The figures of a volume do not depend on which rank computes them."""
    return list(volumes)[rank::world_size]


def gather_volume_rows(rows: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Every rank's ``{volume_index: figures}`` merged, on every rank (a collective call under DDP), sorted by
    volume; without an initialised process group of more than one rank, ``rows`` sorted."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, rows)
        rows = {volume: figures for share in shares for volume, figures in share.items()}
    return dict(sorted(rows.items()))
