"""The one-time preprocessing cache: windowed, resized axial slices stored for memory-mapped access.

One entry (a folder) per volume:

=================  =====================  ==================================================
file               array                  content
=================  =====================  ==================================================
``image.npy``      float16 (Z, S, S)      HU clipped to the window, scaled to [0, 1], resized
``label.npy``      uint8 (Z, S, S)        full label map (0/1/2), nearest-neighbour resized
``label_box.npy``  uint8                  full label map at the original resolution, cropped
                                          to its bounding box (``meta.json``'s ``label_box``)
``roi_image.npy``  float16 (Zr, Hr, Wr)   windowed like ``image.npy`` but NOT resized: the full
                                          in-plane resolution inside ``roi_box``, the liver's
                                          bounding box grown by ``roi_margin_px`` pixels in-plane
                                          and ``roi_margin_slices`` slices, clipped to the volume
                                          ((0, 0, 0) and an empty box for a volume without liver)
``meta.json``      -                      spacing, shapes, boxes, ``label_counts`` (voxels of
                                          label 0/1/2) and the fingerprint of inputs+settings
=================  =====================  ==================================================

Boxes are ``[[z0, z1], [y0, y1], [x0, x1]]``, half-open, in full-resolution display coordinates.
The liver network reads the resized stack; a lesion network reads the full-resolution region
around the liver through ``CachedVolume.read_image`` / ``read_labels``.

Slices are stored in radiological display orientation (rows anterior->posterior, columns patient
right->left, ``z`` inferior->superior), so figures need no flipping. Spacing is ``(sz, sy, sx)``
in mm, matching the (Z, H, W) arrays.

An entry is written into a temporary folder and renamed into place only once complete, with
``meta.json`` written last: a killed run leaves no half-written entry, and the next run rebuilds
only what is missing. An entry is reused while its fingerprint (source files' path, size and
mtime, and the preprocessing settings) is unchanged, and rebuilt otherwise.

Several processes may build one cache at once: in a multi-node run every node's local rank 0 runs
``prepare_data`` on the shared file system. A builder writes an entry only while it holds that entry's
lock (``.locks/<volume id>.lock``, see ``datamodules.io.locks``), rechecks the entry once it holds it,
and names its temporary folder after itself. A builder first takes the entries no one else is building,
then waits for the others, which it then finds done: two nodes share the work instead of doing it twice.
Leftovers of a killed builder are removed only by a builder holding their entry's lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.io.atomic import TEMPORARY_PREFIX, temporary_path
from datamodules.io.locks import acquire, lock_for, temporaries_of
from datamodules.io.nifti import VolumeFiles, load_pair
from datamodules.io.preprocess import (
    PreprocessSettings, box_slices, foreground_box, grow_box, read_box, resize_image, resize_labels, to_display, window,
)

CACHE_FORMAT = 3


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(files: VolumeFiles, settings: PreprocessSettings) -> dict:
    return {
        "format": CACHE_FORMAT,
        "settings": asdict(settings),
        "image": _file_stamp(files.image),
        "label": _file_stamp(files.label),
    }


def preprocess_volume(files: VolumeFiles, settings: PreprocessSettings, entry: Path) -> None:
    """Read one pair, window, resize and write its cache entry atomically at ``entry``."""
    hu, labels, (sx, sy, sz) = load_pair(files)
    hu, labels = to_display(hu), to_display(labels)
    # The full-resolution labels are kept only inside their bounding box: a liver fills a few percent of a CT.
    box = foreground_box(labels)
    roi = grow_box(box, (settings.roi_margin_slices, settings.roi_margin_px, settings.roi_margin_px), labels.shape)
    boxed_labels = labels[box_slices(box)]
    nonzero, lesion = np.count_nonzero(boxed_labels), np.count_nonzero(boxed_labels == 2)  # labels are 0 outside the box
    windowed = window(hu, settings)
    # The ROI is a view of the windowed float32 stack (no second windowing pass); torch's half() is the fast conversion.
    roi_image = torch.from_numpy(windowed[box_slices(roi)]).half().numpy()
    tmp = temporary_path(entry)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", resize_image(windowed, settings.image_size))
        np.save(tmp / "label.npy", resize_labels(labels, settings.image_size))
        np.save(tmp / "label_box.npy", boxed_labels)
        np.save(tmp / "roi_image.npy", roi_image)
        meta = {
            "volume_id": files.volume_id,
            "spacing": [sz, sy, sx],
            "full_shape": list(labels.shape),
            "label_box": box,
            "roi_box": roi,
            "label_counts": [int(labels.size - nonzero), int(nonzero - lesion), int(lesion)],
            "fingerprint": fingerprint(files, settings),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            trash = temporary_path(entry)
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(entry: Path, files: VolumeFiles, settings: PreprocessSettings) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint(files, settings)


def leftovers(entry: Path, names: list[str]) -> list[Path]:
    """Temporary folders of ``entry`` among ``names`` (its cache folder's): this version's and older versions'
    (``.tmp-<id>-<hex>``, ``.trash-<id>-<hex>``)."""
    legacy = re.compile(rf"\.(tmp|trash)-{re.escape(entry.name)}-[^-]+")
    return temporaries_of(entry, names) + [entry.parent / n for n in names if legacy.fullmatch(n)]


def build_entry(files: VolumeFiles, settings: PreprocessSettings, entry: Path, wait: bool = True) -> bool:
    """Build ``entry`` unless it is current, holding its lock. Returns False, having done nothing, when another
    builder holds the lock and ``wait`` is False; True once the entry is current."""
    lock = lock_for(entry)
    if not acquire(lock, wait):
        return False
    try:
        if not _is_current(entry, files, settings):  # another builder may have finished it while we waited
            for leftover in leftovers(entry, [p.name for p in entry.parent.iterdir()]):
                shutil.rmtree(leftover, ignore_errors=True)  # a killed builder's: writers write only under the lock
            preprocess_volume(files, settings, entry)
    finally:
        lock.release()
    return True


def _remove_idle_leftovers(cache_dir: Path, entries: list[Path]) -> None:
    """Remove killed builders' leftovers beside existing entries (e.g. an old entry being deleted when the kill
    came), each under its entry's lock, skipping entries another builder is working on."""
    names = [p.name for p in cache_dir.iterdir() if p.name.startswith((TEMPORARY_PREFIX, ".trash-"))]
    for entry in entries if names else []:
        found = leftovers(entry, names)
        if found and acquire(lock := lock_for(entry), wait=False):
            try:
                for leftover in found:
                    shutil.rmtree(leftover, ignore_errors=True)
            finally:
                lock.release()


def _build_all(todo: list, settings: PreprocessSettings, workers: int, wait: bool, bar) -> list:
    """``build_entry`` for every (files, entry) of ``todo``; the ones another builder held (only when not ``wait``)."""
    held = []
    if not todo:
        return held
    if workers == 1:
        for files, entry in todo:
            if build_entry(files, settings, entry, wait):
                bar.update()
            else:
                held.append((files, entry))
        return held
    # one thread per worker: the parallelism is over volumes
    with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(build_entry, f, settings, e, wait): (f, e) for f, e in todo}
        try:
            for future in as_completed(futures):
                if future.result():
                    bar.update()
                else:
                    held.append(futures[future])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return held


def build_cache(
    pairs: list[VolumeFiles],
    cache_dir: str | Path,
    settings: PreprocessSettings,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Preprocess every pair whose entry is missing or stale; return the entry folders in ``pairs`` order.

    Safe to run in several processes at once on one ``cache_dir`` (see the module docstring): entries
    another builder holds are left to it first, then waited for.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = [cache_dir / files.volume_id for files in pairs]
    todo = [(f, e) for f, e in zip(pairs, entries) if not _is_current(e, f, settings)]
    _remove_idle_leftovers(cache_dir, [e for e in entries if e.exists()])
    if not todo:
        return entries
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    bar = tqdm(total=len(todo), desc=f"Preprocessing {len(todo)} volume(s) into {cache_dir}", unit="vol", disable=not progress)
    with bar:
        held = _build_all(todo, settings, workers, wait=False, bar=bar)
        _build_all(held, settings, max(1, min(workers, len(held))), wait=True, bar=bar)
    return entries


class CachedVolume:
    """Read access to one cache entry; the arrays are memory-mapped on first use (per process)."""

    def __init__(self, entry: str | Path):
        self.entry = Path(entry)
        self.meta = json.loads((self.entry / "meta.json").read_text())
        self.volume_id: str = self.meta["volume_id"]
        self.spacing: tuple[float, float, float] = tuple(self.meta["spacing"])

    @cached_property
    def image(self) -> np.ndarray:
        return np.load(self.entry / "image.npy", mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray:
        return np.load(self.entry / "label.npy", mmap_mode="r")

    @cached_property
    def roi_image(self) -> np.ndarray:
        """Windowed image at full in-plane resolution inside ``roi_box``, float16 (Zr, Hr, Wr)."""
        return np.load(self.entry / "roi_image.npy", mmap_mode="r")

    @cached_property
    def label_box(self) -> np.ndarray:
        """Full-resolution labels inside ``liver_box``, uint8 (every non-zero label of the volume is in it)."""
        return np.load(self.entry / "label_box.npy", mmap_mode="r")

    @property
    def num_slices(self) -> int:
        return self.meta["full_shape"][0]

    @property
    def full_shape(self) -> tuple[int, int, int]:
        """(Z, H, W) at the original resolution."""
        return tuple(self.meta["full_shape"])

    @property
    def liver_box(self) -> tuple[tuple[int, int], ...]:
        """Bounding box of the labels >= 1 (liver and lesions), ``((z0, z1), (y0, y1), (x0, x1))``; all (0, 0) without liver."""
        return tuple(tuple(axis) for axis in self.meta["label_box"])

    @property
    def roi_box(self) -> tuple[tuple[int, int], ...]:
        """The region cached in ``roi_image``: ``liver_box`` grown by the ROI margins, clipped to the volume."""
        return tuple(tuple(axis) for axis in self.meta["roi_box"])

    @property
    def label_counts(self) -> tuple[int, int, int]:
        """Voxels of label 0 (background), 1 (liver), 2 (lesion) at the original resolution."""
        return tuple(self.meta["label_counts"])

    def read_image(self, box) -> np.ndarray:
        """Windowed full-resolution image in ``box`` (``((z0, z1), (y0, y1), (x0, x1))``, half-open), float32 (z, h, w).

        ``box`` may extend beyond the cached ``roi_box`` and beyond the volume: those voxels are
        0.0, the window's lower bound (outside the cached region the true image is unknown).
        """
        return read_box(self.roi_image, self.roi_box, box, np.float32)

    def read_labels(self, box) -> np.ndarray:
        """Full-resolution labels (0/1/2) in ``box``, uint8 (z, h, w); 0 outside the volume (exact everywhere)."""
        return read_box(self.label_box, self.liver_box, box, np.uint8)

    def label_full(self) -> np.ndarray:
        """The label map at the original resolution, (Z, H, W) uint8."""
        labels = np.zeros(self.meta["full_shape"], dtype=np.uint8)
        labels[box_slices(self.meta["label_box"])] = np.load(self.entry / "label_box.npy")
        return labels

    def __getstate__(self):
        # Memory maps are reopened in each DataLoader worker instead of being pickled.
        return {"entry": self.entry, "meta": self.meta, "volume_id": self.volume_id, "spacing": self.spacing}
