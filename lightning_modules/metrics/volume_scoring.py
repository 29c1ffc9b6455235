"""Per-volume figures of an epoch's slice records: each volume reassembled at its original resolution, reduced to
its largest component and scored (``metrics``' kernels), in worker processes where a share of volumes is large.

``volume_figures`` scores the volumes a rank is given (``SegmentationTask.summarize_records`` shares them out
over DDP ranks and gathers the rows); ``metric_workers`` chooses how many forked workers score them. Every volume
goes through the same ``_score_rows`` on the same inputs, in this process or in a worker, so the figures are the
same to the last bit whatever the number of workers or ranks. ``summarize_volumes`` is the one-process summary;
``reassemble_volume`` the upsampling of a volume's slice probabilities that both (and the cascade) use.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.metrics.slice_records import MASK_KEYS, unpack_bits
from lightning_modules.metrics.slice_volume import SLICE_KEYS, VOLUME_KEYS, as_bool_array, largest_connected_component, slice_mask_figures, volume_mask_figures


def summarize_volumes(
    records: dict[str, torch.Tensor],
    load_target: Callable[[int], tuple[np.ndarray, tuple[float, float, float]]],
    largest_component_channels: Sequence[int] = (0,),
    threshold: float = 0.5,
    return_per_volume: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Per-volume Dice, hd95 and Hausdorff (mm) at the original resolution, averaged over volumes.

    ``per_volume`` (with ``return_per_volume``) also holds each volume's TP, FP and FN voxel counts
    (``COUNT_KEYS``) of the final (reassembled, largest-component) prediction.

    ``load_target(v)`` returns ``(target_full bool (C, Z0, H0, W0), (sz, sy, sx) mm)``; only the evaluated
    slices ``target_full[:, slice_indices]`` are compared, so partially evaluated volumes compare like for like.
    """
    if len(records["volume_index"]) == 0:
        raise ValueError("no slice records to summarise")
    per_volume = volume_figures(records, load_target, largest_component_channels, threshold)
    means = mean_volume_figures(per_volume)
    return (means, per_volume) if return_per_volume else means


def mean_volume_figures(per_volume: dict[int, dict[str, float]]) -> dict[str, float]:
    """The mean over volumes of each of ``VOLUME_KEYS``."""
    return {key: float(np.mean([figures[key] for figures in per_volume.values()])) for key in VOLUME_KEYS}


def record_volumes(records: dict[str, torch.Tensor]) -> list[int]:
    """The volume indices present in ``SliceRecords.compute()``, ascending."""
    return torch.unique(records["volume_index"].cpu()).tolist()


def reassemble_volume(probs_u8: torch.Tensor, size: tuple[int, int], threshold: float, chunk: int = 32) -> torch.Tensor:
    """(Z, C, h, w) uint8 probabilities -> bool (C, Z, H0, W0) at the original in-plane size.

    Interpolated ``chunk`` slices at a time: each slice is interpolated on its own, so the result is that of the whole
    stack, without a float32 copy of the whole volume at full resolution (1 GB for 987 slices at 512x512) in memory.
    """
    probs_u8 = probs_u8.cpu()  # CPU: bit-reproducible interpolation whatever the accelerator
    depth, channels = probs_u8.shape[:2]
    if tuple(probs_u8.shape[-2:]) == tuple(size):
        return (probs_u8.float() / 255 >= threshold).permute(1, 0, 2, 3).contiguous()
    out = torch.empty((channels, depth, *size), dtype=torch.bool)
    for start in range(0, depth, chunk):
        probs = probs_u8[start : start + chunk].float() / 255
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        out[:, start : start + chunk] = (probs >= threshold).permute(1, 0, 2, 3)
    return out


# ~256 record slices at 256x256: a smaller share is scored before forking workers would pay back (docs/benchmarks.md)
PARALLEL_MIN_VOXELS = 1 << 24


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cpusets), not the machine's
    except AttributeError:
        return os.cpu_count() or 1


def metric_workers(volumes: int, voxels: int, local_processes: int = 1, requested: int | None = None) -> int:
    """How many worker processes ``volume_figures`` should score ``volumes`` volumes with.

    Args:
        volumes: the volumes to score (a rank's share).
        voxels: the voxels of their slice records (training resolution, channels included: ``share_voxels``).
        local_processes: the processes of this machine that score volumes at the same time (the DDP ranks of the
            node), which share its CPUs.
        requested: an explicit count (``SegmentationTask``'s ``metric_workers``); None: automatic.

    Automatic: the CPUs this process may use divided among ``local_processes``, capped by ``volumes``; 1 (in this
    process: no pool, no fork) for a single volume or fewer than ``PARALLEL_MIN_VOXELS`` voxels, where the work is
    shorter than starting workers is worth (unit tests, smoke runs). A request is capped by ``volumes`` too. Always 1
    off Linux, where the workers could not be forked (spawning one would re-import the suite and pickle the data).
    """
    if requested is not None and requested < 1:
        raise ValueError(f"metric_workers must be at least 1 (or None: automatic), got {requested}")
    if volumes <= 1 or not sys.platform.startswith("linux"):
        return 1
    if requested is not None:
        return min(requested, volumes)
    if voxels < PARALLEL_MIN_VOXELS:
        return 1
    return max(1, min(volumes, _usable_cpus() // max(1, local_processes)))


def share_voxels(records: dict[str, torch.Tensor], volumes: Sequence[int]) -> int:
    """The voxels (training resolution, channels included) of the slice records of ``volumes``."""
    probs = records["probs_u8"]
    if len(probs) == 0 or not len(volumes):
        return 0
    wanted = torch.as_tensor([int(v) for v in volumes], dtype=torch.long)
    return int(torch.isin(records["volume_index"].cpu(), wanted).sum()) * math.prod(probs.shape[1:])


def _volume_jobs(records: dict[str, torch.Tensor], volumes: Sequence[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(volume, its record rows in slice order, its slice indices) per volume; checked here, in the calling process,
    so that a warning is issued where it can be seen whatever the number of workers."""
    volume_index, slice_index = records["volume_index"].cpu(), records["slice_index"].cpu()
    jobs = []
    for v in volumes:
        rows = torch.nonzero(volume_index == v).flatten()
        rows = rows[torch.argsort(slice_index[rows], stable=True)]
        slices = slice_index[rows]
        if len(slices) > 1 and bool((slices[1:] == slices[:-1]).any()):
            raise ValueError(f"volume {v}: duplicated slice records (use SliceRecords.compute())")
        if len(slices) > 1 and bool((slices[1:] - slices[:-1] != 1).any()):
            warnings.warn(f"volume {v}: evaluated slices are not contiguous; z-distances treat them as adjacent")
        jobs.append((int(v), rows, slices))
    return jobs


def _score_volume(
    v: int,
    volume_probs: torch.Tensor,
    slices: torch.Tensor,
    load_target: Callable[[int], tuple[np.ndarray, tuple[float, float, float]]],
    largest_component_channels: Sequence[int],
    threshold: float,
) -> dict[str, float]:
    """One volume's figures from its (Z, C, h, w) uint8 records in slice order: the one computation of both paths."""
    target_full, spacing = load_target(v)
    target_full = as_bool_array(target_full)
    contiguous = len(slices) and int(slices[-1]) - int(slices[0]) == len(slices) - 1
    target = target_full[:, int(slices[0]) : int(slices[-1]) + 1] if contiguous else target_full[:, slices.numpy()]
    if target.shape[0] != volume_probs.shape[1]:
        raise ValueError(f"volume {v}: {volume_probs.shape[1]} predicted channels, {target.shape[0]} in target")
    pred = reassemble_volume(volume_probs, tuple(target.shape[-2:]), threshold).numpy()
    pred = largest_connected_component(pred, largest_component_channels)
    return volume_mask_figures(pred, target, spacing)


def _score_rows(
    v: int,
    inputs: dict[str, torch.Tensor],
    slices: torch.Tensor,
    load_target: Callable[[int], tuple[np.ndarray, tuple[float, float, float]]],
    largest_component_channels: Sequence[int],
    threshold: float,
) -> dict:
    """One volume's row from its records in slice order (``inputs``: ``probs_u8`` and, for the per-slice figures,
    ``MASK_KEYS``): ``_score_volume``'s figures, plus its slices' Dice and Hausdorff (px) under ``SLICE_KEYS`` (tuples
    of floats: float32 values, pickled exactly) with the masks. The one computation of both paths."""
    figures = _score_volume(v, inputs["probs_u8"], slices, load_target, largest_component_channels, threshold)
    if MASK_KEYS[0] in inputs:
        width = inputs["probs_u8"].shape[-1]
        dice, hd = slice_mask_figures(*(unpack_bits(inputs[key], width) for key in MASK_KEYS))
        figures |= {SLICE_KEYS[0]: tuple(dice.tolist()), SLICE_KEYS[1]: tuple(hd.tolist())}
    return figures


_WORKER_SHARE: tuple | None = None  # a worker's (inputs, jobs, load_target, channels, threshold), inherited at fork


def _start_worker(share: tuple) -> None:
    global _WORKER_SHARE
    # The pool is the parallelism: one core per worker. The floats do not depend on it: torch's CPU interpolation
    # computes each output pixel as one fixed weighted sum whatever the thread count (checked at 1-16 threads).
    torch.set_num_threads(1)
    _WORKER_SHARE = share


def _score_in_worker(job: int) -> dict:
    inputs, jobs, load_target, channels, threshold = _WORKER_SHARE
    v, rows, slices = jobs[job]
    return _score_rows(v, {key: value[rows] for key, value in inputs.items()}, slices, load_target, channels, threshold)


def _score_in_workers(jobs: list, inputs: dict[str, torch.Tensor], load_target: Callable, channels: Sequence[int],
                      threshold: float, workers: int) -> dict[int, dict]:
    """``_score_rows`` of every job in ``workers`` forked processes (``inputs``: the records it reads).

    Forked, so that the records, the jobs and ``load_target`` (a bound method of the data module) reach the workers
    through the inherited memory, never pickled: only a job's number goes out and its figures (floats, pickled
    exactly) come back. A forked child must not touch CUDA, so records on an accelerator are brought to the CPU
    here first (this share's rows only).
    """
    if any(value.device.type != "cpu" for value in inputs.values()):
        wanted = torch.cat([rows for _, rows, _ in jobs])
        inputs = {key: value[wanted.to(value.device)].cpu() for key, value in inputs.items()}
        ends = np.cumsum([len(rows) for _, rows, _ in jobs]).tolist()
        jobs = [(v, torch.arange(end - len(rows), end), slices) for (v, rows, slices), end in zip(jobs, ends)]
    # Longest volumes first, so that the last ones to start are short and the workers finish together.
    order = sorted(range(len(jobs)), key=lambda job: -len(jobs[job][1]))
    executor = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_worker, initargs=((inputs, jobs, load_target, tuple(channels), threshold),))
    try:
        # Python 3.12+ warns of any fork in a threaded process; the children take no lock another thread may hold
        # (no CUDA, no logging, no DataLoader): they compute, then answer through the pool's own pipes.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)
            futures = {job: executor.submit(_score_in_worker, job) for job in order}  # the first submit forks them all
        return {jobs[job][0]: futures[job].result() for job in range(len(jobs))}
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def volume_figures(
    records: dict[str, torch.Tensor],
    load_target: Callable[[int], tuple[np.ndarray, tuple[float, float, float]]],
    largest_component_channels: Sequence[int] = (0,),
    threshold: float = 0.5,
    volumes: Sequence[int] | None = None,
    workers: int = 1,
    with_slices: bool = False,
) -> dict[int, dict]:
    """``summarize_volumes``' per-volume figures (and voxel counts), for ``volumes`` only (default: every volume
    in ``records``). Each volume's figures depend on its own records alone, so DDP ranks can each take a share
    of the volumes and gather the rows (``SegmentationTask.summarize_records``), and ``workers`` > 1 processes
    (forked, Linux; ``metric_workers`` chooses how many) can each score one volume at a time: every volume goes
    through the same ``_score_rows`` on the same inputs, so the figures are the same to the last bit whatever
    ``workers`` is. ``load_target`` is called in the workers then.

    ``with_slices``: each row also holds its slices' Dice and Hausdorff (px) under ``SLICE_KEYS`` (slice order), so
    the per-slice figures are sharded and computed in the workers like the volumes' (``split_slice_figures`` takes
    them out of the gathered rows for ``summarize_slices``)."""
    jobs = _volume_jobs(records, record_volumes(records) if volumes is None else volumes)
    inputs = {key: records[key] for key in ("probs_u8", *(MASK_KEYS if with_slices else ()))}
    if workers > 1 and len(jobs) > 1 and sys.platform.startswith("linux"):
        return _score_in_workers(jobs, inputs, load_target, largest_component_channels, threshold, workers)
    return {v: _score_rows(v, {key: value[rows.to(value.device)] for key, value in inputs.items()}, slices, load_target,
                           largest_component_channels, threshold)
            for v, rows, slices in jobs}
