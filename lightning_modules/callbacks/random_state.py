"""Every random stream a training epoch draws from, saved in each checkpoint and restored on resume.

A run killed during epoch k and resumed from ``last.ckpt`` (written at the end of epoch k-1) must
train epoch k exactly as the uninterrupted run did. Lightning restores the weights, optimiser,
scheduler and loop counters, but not the random streams, and two things reset them on resume: MONAI's
``DataLoader`` reseeds the dataset's transforms and resets torch's global generator to its initial
seed when it is built (at fit start), so a resumed run would replay epoch 1's shuffling, crop
centres and augmentations at epoch k.

``RandomStateCheckpoint`` stores, at every checkpoint, torch's CPU and CUDA generators, NumPy's and
Python's global generators, and the ``np.random.RandomState`` of every MONAI randomizable transform
reachable from the training dataset (in the main process: with ``num_workers > 0`` each epoch's worker
seeds derive from torch's generator, which is restored too); on resume it puts them back at the start
of the first resumed epoch and rebuilds that epoch's iterator, which Lightning created (drawing its
seeds and prefetching a batch) before the restore. Persistent DataLoader workers keep the seeds they
were started with, so ``persistent_workers`` runs resume reproducibly but not identically.
The sampler's order (``RandomSampler``/``WeightedRandomSampler`` draw from torch's generator when the
epoch's iterator is created) and the lesion crops' centres (torch's generator) follow.
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch


def randomizables(obj, found: list, seen: set) -> list:
    """MONAI randomizable objects (with an ``R`` RandomState) reachable through attributes and lists, in a fixed order."""
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray, torch.Tensor)):
        return found
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for item in obj:
            randomizables(item, found, seen)
        return found
    if isinstance(getattr(obj, "R", None), np.random.RandomState):
        found.append(obj)
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        if not key.startswith("__"):
            randomizables(value, found, seen)
    return found


def _numpy_state(state: tuple) -> dict:
    """A NumPy RandomState state as a tensor and plain numbers: checkpoints load with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _from_numpy_state(state: dict) -> tuple:
    return state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"]


def _train_dataset(trainer: pl.Trainer):
    return getattr(trainer.train_dataloader, "dataset", None)


class RandomStateCheckpoint(pl.Callback):
    """Saves every random stream of training in checkpoints; restores them at the first resumed epoch, or, from a
    checkpoint written mid-epoch (``--checkpoint_every_n_steps``), replays the epoch's data draws up to it."""

    def __init__(self) -> None:
        self._pending: dict | None = None
        self._epoch_start: dict | None = None  # the streams as this epoch began
        self._iterator_first = False  # whether this epoch's iterator was built before they were taken

    def state(self, trainer: pl.Trainer) -> dict:
        dataset = _train_dataset(trainer)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_numpy_state(t.R.get_state()) for t in randomizables(dataset, [], set())] if dataset is not None else [],
        }

    def _restore(self, trainer: pl.Trainer, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_from_numpy_state(state["numpy"]))
        random.setstate(state["python"])
        transforms = randomizables(_train_dataset(trainer), [], set())
        if len(transforms) == len(state["transforms"]):
            for transform, saved in zip(transforms, state["transforms"]):
                transform.R.set_state(_from_numpy_state(saved))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["random_state"] = self.state(trainer) | {
            "epoch_start": self._epoch_start, "iterator_first": self._iterator_first,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.ready}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._pending = checkpoint.get("random_state")

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning does not call on_train_epoch_start when it resumes mid-epoch, and restarts a plain DataLoader
        # from its first batch: replay the epoch from its start up to the checkpoint's batch, then restore the
        # streams as saved (the same ones where only the data pipeline draws; the model's own draws come back).
        state = self._pending
        if state is None or state.get("epoch_start") is None or not 0 < state["batches"] < trainer.num_training_batches:
            return  # not a mid-epoch checkpoint: on_train_epoch_start restores it
        self._pending = None
        fetcher = trainer.fit_loop._data_fetcher
        if state["iterator_first"]:
            iter(fetcher)
            self._restore(trainer, state["epoch_start"])
        else:
            self._restore(trainer, state["epoch_start"])
            iter(fetcher)
        for _ in range(state["batches"]):
            next(fetcher.iterator)
        self._restore(trainer, state)
        self._epoch_start, self._iterator_first = state["epoch_start"], state["iterator_first"]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            # a fresh run builds its first epoch's iterator (in setup_data) before this hook; every later epoch after it
            self._epoch_start, self._iterator_first = self.state(trainer), trainer.current_epoch == 0
            return
        state, self._pending = self._pending, None
        self._restore(trainer, state)
        self._epoch_start, self._iterator_first = self.state(trainer), False
        # On resume Lightning built the epoch's iterator before this hook (uninterrupted epochs > 0 build it
        # after): its seeds and first prefetched batch were drawn from the reset streams. Build it again.
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)
