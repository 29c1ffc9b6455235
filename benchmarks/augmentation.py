"""Training augmentation throughput: MONAI per sample (a DataLoader worker) against the batch path on a device.

``augmentation_throughput`` times the two ways ``LiTSDataModule`` can augment training slices
(``augmentation.applied_to``): ``"sample"``, MONAI's ``training_augmentation`` applied to one sample after another
as a DataLoader worker does (``finish_sample``, one process with one intra-op thread, which is what
PyTorch gives each worker), and ``"batch"``, ``BatchAugmentation`` on a whole collated batch already on
``device``. Both use the default strengths (flip 0.5 per axis, rotation +-15 degrees and zoom 0.9-1.1,
each with probability 0.5) on one-channel float32 slices with a 0/1 mask, the class label included.
The two sides alternate until the time budget is spent (at least two rounds each), and each side's
best round counts, because these machines are noisy.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from datamodules.augment.batch import BatchAugmentation
from datamodules.augment.sample import training_augmentation
from datamodules.datasets.slices import finish_sample


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@contextmanager
def _threads(count: int):
    """Run a block with ``count`` intra-op threads, restoring the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def augmentation_throughput(device: str = "cpu", size: int = 256, batch: int = 32, seconds_budget: float = 4.0) -> dict:
    """Augmented slices/s of the per-sample MONAI path and of the batch path on ``device``, ``size`` x ``size``.

    On a CPU the headline comparison gives both paths the same resources, one thread: a DataLoader
    worker's against the batch path's (the all-threads figure of the batch path, what a CPU run's main
    process would reach, is reported beside it; on a busy machine it can fall below the one-thread one).

    Returns a dict:

    ==========================================  =======================================================
    key                                         value
    ==========================================  =======================================================
    ``augment_sample_slices_per_s``             MONAI per sample, one process, one thread (a worker)
    ``augment_batch_slices_per_s``              ``BatchAugmentation`` on ``device``, batches of
                                                ``batch`` (on a CPU: one thread)
    ``augment_batch_vs_sample``                 the second over the first
    ``augment_batch_all_threads_slices_per_s``  CPU only: the batch path with torch's ``threads``
    ``device``, ``size``, ``batch``             the settings
    ``threads``                                 torch's intra-op threads (the process's, not the worker's)
    ==========================================  =======================================================
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator)
    masks = (images > 0.5).float()
    samples = [{"image": images[i].clone(), "mask": masks[i].clone()} for i in range(batch)]
    transform = training_augmentation()
    on_device = {"image": images.to(device), "mask": masks.to(device), "label": torch.zeros(batch, device=device)}
    augmentation = BatchAugmentation()

    def per_sample() -> None:
        with _threads(1):
            for sample in samples:
                finish_sample(dict(sample), transform, 0, 0, "benchmark")

    def on_batch() -> None:
        augmentation(on_device)
        _synchronize(device)

    def on_batch_one_thread() -> None:
        with _threads(1):
            on_batch()

    sides = [per_sample, on_batch_one_thread, on_batch] if device.type == "cpu" else [per_sample, on_batch]
    for side in sides:  # warm-up: MONAI's first call, CUDA context and kernels
        side()
    best = [float("inf")] * len(sides)
    start, rounds = time.perf_counter(), 0
    while rounds < 2 or time.perf_counter() - start < seconds_budget:
        for i, side in enumerate(sides):
            best[i] = min(best[i], _seconds(side))
        rounds += 1
    sample_rate, batch_rate = batch / best[0], batch / best[1]
    figures = {
        "augment_sample_slices_per_s": round(sample_rate, 1),
        "augment_batch_slices_per_s": round(batch_rate, 1),
        "augment_batch_vs_sample": round(batch_rate / sample_rate, 2),
    }
    if device.type == "cpu":
        figures["augment_batch_all_threads_slices_per_s"] = round(batch / best[2], 1)
    return figures | {"device": str(device), "size": size, "batch": batch, "threads": torch.get_num_threads()}
