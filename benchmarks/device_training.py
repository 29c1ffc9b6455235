"""``python -m benchmarks --device cuda``: training throughput and validation time on an accelerator.

Training slices/s at 256x256 (batch 10 and batch 64) of three implementations of the same step (one
forward, the suite's Dice loss, backward, Adam), each in fp32 and in bf16-mixed, eager and
``torch.compile``d:

* ``lightning``: the suite's ``BaselineUNet`` under a Lightning ``Trainer`` (precision and cuDNN
  autotuning through the Trainer's own flags: the settings of ``experiments/gpu.yaml``);
* ``plain``: the same network and loss in a plain PyTorch loop (``torch.autocast`` for bf16);
* ``basicunet``: MONAI's ``BasicUNet`` with the same widths (16-256, 16 in its last up-block),
  instance norm and LeakyReLU 0.2, in the same plain loop.

The batches are random and already on the device, so the figures are the step's alone (data
loading has its own benchmarks). Each configuration runs ``warmup`` steps (for ``torch.compile``
these include the compilation) and then ``steps`` timed steps, the device synchronised at both ends;
its peak device memory is read over the whole run. The default memory layout (NCHW) is the suite's; one
extra group times channels-last (``ChannelsLast``) at the largest batch in bf16. A time budget stops the matrix early on a slow
machine; skipped configurations are reported as such, never estimated.

``size`` may also be a tuple of spatial sizes: (D, H, W) times the 3D networks (``spatial_dims=3``) on
(B, 1, D, H, W) crops (``benchmarks/volumetric.py``); ``slices_per_s`` then counts crops, and the
channels-last group is left out (``ChannelsLast`` converts 4D tensors only).

The host read-back of a progress-bar loss (``progress_bar_readback``): the Lightning step at batch 10 in bf16 with
the training losses in the progress bar, as the suite once logged them everywhere (Lightning then
reads them back to the host at every batch end: one device synchronisation per step), against without (what
``base.losses_in_progress_bar`` now chooses on an accelerator), alternated twice, the faster of each kept.

Validation time per volume: ``lits predict`` and one ``lits test`` pass of the 2D cascade on a
512x512x100 phantom volume on the device (``benchmarks/cascade_inference.py``).
"""

from __future__ import annotations

import contextlib
import time

import pytorch_lightning as pl
import torch
from monai.networks.nets import BasicUNet

import lightning_modules.base as base
from lightning_modules import BaselineUNet
from lightning_modules.base import adam
from lightning_modules.callbacks.channels_last import ChannelsLast

IMPLEMENTATIONS = ("lightning", "plain", "basicunet")
PRECISIONS = ("32-true", "bf16-mixed")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spatial_shape(size: int | tuple[int, ...]) -> tuple[int, ...]:
    """(size, size) for an int (2D slices), else the tuple itself ((D, H, W) for 3D crops)."""
    return (size, size) if isinstance(size, int) else tuple(int(n) for n in size)


def random_batches(count: int, batch_size: int, size: int | tuple[int, ...], device: torch.device, channels_last: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        image = torch.rand(batch_size, 1, *spatial_shape(size), generator=generator)
        mask = (image > 0.6).float()
        if channels_last:
            image, mask = (t.contiguous(memory_format=torch.channels_last) for t in (image, mask))
        batches.append({"image": image.to(device), "mask": mask.to(device)})
    return batches


class _Timer(pl.Callback):
    """Wall time from the start of batch ``skip`` to the end of batch ``last``, the device synchronised at both."""

    def __init__(self, skip: int, last: int, device: torch.device):
        self.skip, self.last, self.device = skip, last, device
        self.seconds = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.skip:
            _synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            _synchronize(self.device)
            self.seconds = time.perf_counter() - self.start


def suite_task(spatial_dims: int = 2) -> BaselineUNet:
    torch.manual_seed(0)
    return BaselineUNet(lr=1e-3, scheduler="none", spatial_dims=spatial_dims)


def _basic_unet(spatial_dims: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, features=(16, 32, 64, 128, 256, 16),
                     act=("LeakyReLU", {"negative_slope": 0.2, "inplace": True}), norm=("instance", {"affine": True}))


def lightning_seconds(batches, warmup, device, precision, compiled, channels_last, task: BaselineUNet | None = None) -> float:
    """``task``: the module to train (default: a fresh ``suite_task`` of the batches' dimensionality); the caller may read its weights after."""
    task = task if task is not None else suite_task(batches[0]["image"].ndim - 2)
    if compiled:
        task.model = torch.compile(task.model)
    timer = _Timer(warmup, len(batches) - 1, device)
    callbacks = [timer] + ([ChannelsLast()] if channels_last else [])
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_epochs=1, precision=precision, benchmark=device.type == "cuda",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.seconds


def plain_seconds(network, loss, batches, warmup, device, precision, compiled, channels_last) -> float:
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = adam(network.parameters(), lr=1e-3)
    step_network = torch.compile(network) if compiled else network
    network.train()
    torch.backends.cudnn.benchmark = device.type == "cuda"
    for index, batch in enumerate(batches):
        if index == warmup:
            _synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            output = step_network(batch["image"])
            value = loss(output["seg"] if isinstance(output, dict) else output, batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    _synchronize(device)
    return time.perf_counter() - start


def bench_training(device: str = "cuda", batch_sizes=(10, 64), size: int | tuple[int, ...] = 256, steps: int = 30, warmup: int = 5,
                   compile_modes=(False, True), precisions=PRECISIONS, channels_last: bool = False,
                   budget_s: float = 240.0) -> list[dict]:
    """One row per (batch, precision, compiled, implementation): slices/s and peak device memory, or ``skipped``.

    Eager runs come first (every batch size), then the largest batch in the other memory layout (bf16
    only: the layout's own effect), then ``torch.compile`` from the largest batch down: the budget cuts the costliest.
    """
    device = torch.device(device)
    spatial_dims = len(spatial_shape(size))
    loss = suite_task().segmentation_loss
    groups = []
    if False in compile_modes:
        groups += [(b, False, channels_last, precisions) for b in batch_sizes]
        if "bf16-mixed" in precisions and spatial_dims == 2:
            groups.append((max(batch_sizes), False, not channels_last, ("bf16-mixed",)))
    if True in compile_modes:
        groups += [(b, True, channels_last, precisions) for b in sorted(batch_sizes, reverse=True)]
    started = time.perf_counter()
    rows = []
    for batch_size, compiled, layout, group_precisions in groups:
        batches = random_batches(warmup + steps, batch_size, size, device, layout)
        for precision in group_precisions:
            for implementation in IMPLEMENTATIONS:
                row = {"implementation": implementation, "batch": batch_size, "size": size, "precision": precision,
                       "compiled": compiled, "channels_last": layout}
                rows.append(row)
                if time.perf_counter() - started > budget_s:
                    row["skipped"] = f"time budget of {budget_s:.0f} s spent"
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    if implementation == "lightning":
                        seconds = lightning_seconds(batches, warmup, device, precision, compiled, layout)
                    else:
                        network = suite_task(spatial_dims).model if implementation == "plain" else _basic_unet(spatial_dims)
                        seconds = plain_seconds(network, loss, batches, warmup, device, precision, compiled, layout)
                except Exception as error:  # one failing configuration (e.g. a compiler missing) must not lose the rest
                    row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    continue
                row["slices_per_s"] = steps * batch_size / seconds
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rows


@contextlib.contextmanager
def _losses_in_progress_bar(shown: bool):
    """The training losses in the progress bar (``True``: how the suite once logged them) or not, whatever the device."""
    chosen = base.losses_in_progress_bar
    base.losses_in_progress_bar = lambda device: shown
    try:
        yield
    finally:
        base.losses_in_progress_bar = chosen


def progress_bar_readback(device: str = "cuda", batch_size: int = 10, size: int = 256, steps: int = 30, warmup: int = 5,
                          precision: str = "bf16-mixed") -> dict:
    """Seconds of ``steps`` Lightning steps with and without the losses in the progress bar (module docstring), and
    their ratio (> 1: the read-back cost time)."""
    device = torch.device(device)
    batches = random_batches(warmup + steps, batch_size, size, device, channels_last=False)
    seconds = {True: float("inf"), False: float("inf")}
    for shown in (True, False, True, False):
        with _losses_in_progress_bar(shown):
            seconds[shown] = min(seconds[shown], lightning_seconds(batches, warmup, device, precision, False, False))
    return {"batch": batch_size, "precision": precision, "with_s": seconds[True], "without_s": seconds[False],
            "ratio": round(seconds[True] / seconds[False], 3)}


def find(rows: list[dict], implementation: str, batch: int, precision: str, compiled: bool = False, channels_last: bool = False) -> dict:
    """The row of that configuration, or ``{}``."""
    for r in rows:
        if (r["implementation"], r["batch"], r["precision"], r["compiled"], r["channels_last"]) == (implementation, batch, precision, compiled, channels_last):
            return r
    return {}


def ratio(numerator: dict, denominator: dict) -> float | None:
    """Time per slice of ``numerator`` over ``denominator``'s (rows of ``bench_training``): > 1 means slower."""
    if numerator.get("slices_per_s") and denominator.get("slices_per_s"):
        return round(denominator["slices_per_s"] / numerator["slices_per_s"], 3)
    return None


def print_table(rows: list[dict], unit: str = "slices") -> None:
    """``unit``: what ``slices_per_s`` counts, for the header (``crops`` for 3D rows)."""
    print(f"\n{'implementation':12s} {'batch':>5s} {'precision':11s} {'mode':14s} {unit + '/s':>10s} {'peak GiB':>9s}")
    for r in rows:
        mode = ("compile" if r["compiled"] else "eager") + (" NHWC" if r["channels_last"] else "")
        if "skipped" in r:
            print(f"{r['implementation']:12s} {r['batch']:5d} {r['precision']:11s} {mode:14s} skipped: {r['skipped']}")
        else:
            memory = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-"
            print(f"{r['implementation']:12s} {r['batch']:5d} {r['precision']:11s} {mode:14s} {r['slices_per_s']:10,.0f} {memory:>9s}")
