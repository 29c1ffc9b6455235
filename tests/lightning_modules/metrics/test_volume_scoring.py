"""Tests of lightning_modules.metrics.volume_scoring: per-volume figures at the original resolution against hand-built
volumes, equal in one process, across simulated ranks and in worker processes."""

from __future__ import annotations

import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_modules import BaselineUNet
from lightning_modules.metrics import volume_scoring
from datamodules.errors import CheckpointError
from lightning_modules.metrics.slice_volume import summarize_slices
from lightning_modules.metrics.slice_records import RECORD_KEYS, SliceRecords
from lightning_modules.metrics.volume_records import gather_volume_rows, volume_share
from lightning_modules.metrics.volume_scoring import (
    mean_volume_figures,
    metric_workers,
    reassemble_volume,
    record_volumes,
    share_voxels,
    summarize_volumes,
    volume_figures,
)

# -- summarize_volumes -------------------------------------------------------------------------------
def make_volumes(seed: int = 0):
    """Targets at 64x64 made of 2x2 blocks, and their exact 32x32 training-resolution probabilities.

    Bilinear x2 upsampling puts weight >= 0.75 * 0.75 on each pixel's own block, so thresholding at 0.5
    reproduces the blocks exactly."""
    rng = np.random.default_rng(seed)
    low, full = {}, {}
    for v, depth in [(0, 6), (1, 5)]:
        coarse = np.zeros((1, depth, 32, 32), dtype=bool)
        coarse[0, :, 6:20, 8 + v : 26] = True
        coarse[0, :, 6:10, 8:12] = rng.random((depth, 4, 4)) > 0.5  # irregular border
        low[v] = coarse
        full[v] = coarse.repeat(2, axis=2).repeat(2, axis=3)
    return low, full


SPACINGS = {0: (2.5, 0.8, 0.8), 1: (1.0, 0.6, 0.7)}


def records_for(low, pairs, rank_metric=None):
    metric = rank_metric or SliceRecords()
    for v, s in pairs:
        probs = torch.from_numpy(low[v][:, s]).float()[None]
        metric.update(probs, probs > 0.5, torch.tensor([v]), torch.tensor([s]))
    return metric


def test_summarize_volumes_exact_reassembly_at_original_resolution():
    low, full = make_volumes()
    # Slice 0 of volume 0 is never evaluated and differs from the prediction: it must be ignored.
    full[0][0, 0] = ~full[0][0, 0]
    pairs = [(v, s) for v in low for s in range(low[v].shape[1]) if (v, s) != (0, 0)]
    records = records_for(low, pairs).compute()
    means, per_volume = summarize_volumes(records, lambda v: (full[v], SPACINGS[v]), return_per_volume=True)
    assert means == pytest.approx({"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0})
    assert sorted(per_volume) == [0, 1]


def test_summarize_volumes_largest_component_removes_islands():
    low, full = make_volumes()
    noisy = {v: m.copy() for v, m in low.items()}
    noisy[1][0, 2, 28:30, 28:30] = True  # island far from the liver in one slice
    records = records_for(noisy, [(1, s) for s in range(5)]).compute()
    load = lambda v: (full[v], SPACINGS[v])  # noqa: E731
    assert summarize_volumes(records, load, (0,)) == pytest.approx(
        {"dice_volume": 1.0, "hd95_volume_mm": 0.0, "hd_volume_mm": 0.0}
    )
    kept = summarize_volumes(records, load, largest_component_channels=())
    assert kept["dice_volume"] < 1.0 and kept["hd_volume_mm"] > 10 * 0.6


def test_summarize_volumes_pixel_alignment_and_inclusive_threshold():
    # A full-height band of low-res columns 1..2 (of 16) covers exactly columns 4..11 (of 64) once upsampled:
    # pixel areas correspond (align_corners=False; align_corners=True would give columns 3..12).
    low = np.zeros((1, 3, 16, 16), dtype=bool)
    low[0, :, :, 1:3] = True
    full = low.repeat(4, axis=2).repeat(4, axis=3)
    records = records_for({0: low}, [(0, s) for s in range(3)]).compute()
    assert summarize_volumes(records, lambda v: (full, SPACINGS[0]))["dice_volume"] == 1.0
    # Without resizing, probabilities of exactly 1.0 are foreground at threshold 1.0 (the threshold is inclusive).
    assert summarize_volumes(records, lambda v: (low, SPACINGS[0]), threshold=1.0)["dice_volume"] == 1.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the hand-gathered metric never saw update()
def test_summarize_volumes_same_result_across_simulated_ranks():
    low, full = make_volumes()
    # Predictions shifted by one block along x: imperfect, so the comparison is not trivially 1/0.
    shifted = {v: np.roll(m, 1, axis=3) for v, m in low.items()}
    pairs = [(v, s) for v in low for s in range(low[v].shape[1])]
    single = records_for(shifted, pairs[::-1]).compute()  # one device, reverse order
    rank0 = records_for(shifted, pairs[0::2])
    rank1 = records_for(shifted, pairs[1::2] + [pairs[0]])  # padding repeats a sample
    gathered = SliceRecords()  # state after torchmetrics' sync: per-rank lists concatenated in rank order
    for key in RECORD_KEYS:
        setattr(gathered, key, torch.cat([torch.cat(getattr(rank1, key)), torch.cat(getattr(rank0, key))]))
    rank0.merge_state(rank1)  # torchmetrics' public merge of a second state
    load = lambda v: (full[v], SPACINGS[v])  # noqa: E731
    expected = summarize_volumes(single, load, return_per_volume=True)
    for merged in (gathered.compute(), rank0.compute()):
        assert all(torch.equal(merged[k].cpu(), single[k].cpu()) for k in RECORD_KEYS)
        assert summarize_volumes(merged, load, return_per_volume=True) == expected
    # Shift by 2 px at full resolution along x: HD = 2 * sx, per volume.
    assert expected[1][0]["hd_volume_mm"] == pytest.approx(2 * 0.8)
    assert expected[1][1]["hd_volume_mm"] == pytest.approx(2 * 0.7)
    # Sharded per-volume work: each simulated rank scores its share, the merged rows are one process's rows.
    shares = [volume_share(record_volumes(single), rank, 2) for rank in range(2)]
    assert shares == [[0], [1]]
    rows = [volume_figures(single, load, (0,), 0.5, share) for share in shares]
    assert gather_volume_rows(rows[1] | rows[0]) == expected[1]
    assert list(gather_volume_rows(rows[1] | rows[0])) == [0, 1]
    assert mean_volume_figures(expected[1]) == expected[0]
    assert 0 < expected[0]["dice_volume"] < 1


def test_summarize_volumes_empty_prediction_is_finite():
    _, full = make_volumes()
    metric = SliceRecords()
    for s in range(full[1].shape[1]):
        metric.update(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), torch.tensor([1]), torch.tensor([s]))
    records = metric.compute()
    means = summarize_volumes(records, lambda v: (full[v], SPACINGS[v]))
    diagonal = math.sqrt((5 * 1.0) ** 2 + (64 * 0.6) ** 2 + (64 * 0.7) ** 2)
    assert means == pytest.approx({"dice_volume": 0.0, "hd95_volume_mm": diagonal, "hd_volume_mm": diagonal})
    assert summarize_slices(records) == pytest.approx({"dice_slice": 1.0, "hd_slice_px": 0.0})
    with pytest.raises(ValueError):
        summarize_volumes({key: value[:0] for key, value in records.items()}, lambda v: (full[v], SPACINGS[v]))


# -- per-volume figures in worker processes ---------------------------------------------------------
def noisy_volumes(count: int = 4):
    """Two-channel volumes of 5-8 slices: training-resolution (32x32) soft probabilities whose upsampled threshold
    differs from the 64x64 targets here and there (islands, ragged borders), so every figure is a non-trivial float."""
    rng = np.random.default_rng(7)
    probs, full = {}, {}
    for v in range(count):
        depth = 5 + v
        liver = np.zeros((depth, 64, 64), dtype=bool)
        liver[:, 10 + v : 50, 12 : 52 - v] = True
        lesion = np.zeros_like(liver)
        lesion[1:-1, 20:30, 25 + v : 35] = True
        full[v] = np.stack([liver, lesion])
        coarse = full[v][:, :, ::2, ::2].astype(np.float32) * 0.7 + rng.random((2, depth, 32, 32), dtype=np.float32) * 0.3
        coarse[0, depth // 2, 2:5, 2:5] = 0.9  # an island the largest component removes
        probs[v] = torch.from_numpy(coarse)
    metric = SliceRecords()
    for v, p in probs.items():
        batch = p.permute(1, 0, 2, 3)  # (Z, C, h, w)
        metric.update(batch, batch >= 0.5, torch.full((len(batch),), v), torch.arange(len(batch)))
    return metric.compute(), full


class RecordingLoad:
    """``load_target`` that leaves a file per call naming the process that made it (a forked worker's calls
    cannot be seen otherwise). With ``wait_for`` N, a call returns once N processes have called (10 s at most), so
    that one fast worker cannot take every volume before the others start (the assertion must not depend on timing)."""

    def __init__(self, full: dict, spacing: tuple, folder, wait_for: int = 1):
        self.full, self.spacing, self.folder, self.wait_for = full, spacing, folder, wait_for

    def __call__(self, v: int):
        (self.folder / f"{v}-{os.getpid()}").touch()
        deadline = time.monotonic() + 10
        while len(self.processes()) < self.wait_for and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.full[v], self.spacing

    def processes(self) -> set[int]:
        return {int(path.name.split("-")[1]) for path in self.folder.iterdir()}


def test_volume_figures_in_worker_processes_equal_the_in_process_figures(tmp_path):
    records, full = noisy_volumes()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = RecordingLoad(full, (2.5, 0.8, 0.7), tmp_path / "one")
    two = RecordingLoad(full, (2.5, 0.8, 0.7), tmp_path / "two", wait_for=2)
    in_process = volume_figures(records, one, (0,), 0.5, workers=1)
    in_workers = volume_figures(records, two, (0,), 0.5, workers=2)
    assert in_workers == in_process  # every float to the last bit, and the volumes in the same order
    assert list(in_workers) == [0, 1, 2, 3]
    assert all(0 < figures["dice_volume"] < 1 and figures["hd_volume_mm"] > 0 for figures in in_process.values())
    assert one.processes() == {os.getpid()}
    assert len(two.processes()) == 2 and os.getpid() not in two.processes()  # two forked workers did the work
    # A share of the volumes, in workers, gives the same rows as in-process.
    assert volume_figures(records, two, (0,), 0.5, volumes=[3, 1], workers=2) == {3: in_process[3], 1: in_process[1]}


def test_metric_workers_automatic_count(monkeypatch):
    monkeypatch.setattr(volume_scoring, "_usable_cpus", lambda: 16)
    big = volume_scoring.PARALLEL_MIN_VOXELS
    assert metric_workers(20, big) == 16  # the cores, capped...
    assert metric_workers(5, big) == 5  # ...by the volumes
    assert metric_workers(20, big, local_processes=4) == 4  # a node's ranks share its cores
    assert metric_workers(20, big, local_processes=32) == 1
    # No pool for a single volume or a small share: unit tests and smoke runs fork nothing.
    assert metric_workers(1, 100 * big) == 1
    assert metric_workers(20, big - 1) == 1
    records, _ = noisy_volumes()
    assert share_voxels(records, [0, 2]) == (5 + 7) * 2 * 32 * 32
    assert share_voxels(records, []) == 0
    assert metric_workers(4, share_voxels(records, range(4))) == 1
    # An explicit count overrides the rule, capped by the volumes.
    assert metric_workers(4, 10, requested=3) == 3
    assert metric_workers(4, big, requested=9) == 4
    assert metric_workers(1, big, requested=9) == 1
    with pytest.raises(ValueError):
        metric_workers(4, big, requested=0)
    monkeypatch.setattr(volume_scoring.sys, "platform", "darwin")  # workers are forked: Linux only
    assert metric_workers(20, big) == 1 and metric_workers(20, big, requested=4) == 1


def test_summarize_records_scores_in_the_requested_workers(tmp_path):
    records, full = noisy_volumes(3)
    rows = {}
    for count in (1, 2):
        (tmp_path / str(count)).mkdir()
        load = RecordingLoad(full, (1.0, 0.7, 0.7), tmp_path / str(count))
        module = BaselineUNet(base_channels=4, out_channels=2, metric_workers=count)
        module._trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams=SimpleNamespace(target="both"), eval_target=load),
                                          world_size=1, num_devices=1, global_rank=0)
        figures, rows[count] = module.summarize_records(records)
        assert (os.getpid() in load.processes()) == (count == 1)
        assert module.hparams.metric_workers == count
    assert rows[2] == rows[1] and sorted(rows[1]) == [0, 1, 2]
    with pytest.raises(CheckpointError, match="metric_workers"):
        BaselineUNet(metric_workers=0)


def test_reassembly_in_chunks_equals_the_whole_stack():
    probs = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (11, 2, 24, 24), dtype=np.uint8))
    whole = reassemble_volume(probs, (61, 50), 0.5, chunk=len(probs))
    assert whole.shape == (2, 11, 61, 50) and whole.any() and not whole.all()
    assert torch.equal(reassemble_volume(probs, (61, 50), 0.5, chunk=4), whole)
