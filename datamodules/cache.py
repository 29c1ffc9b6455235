"""The one-time preprocessing cache: windowed, resized axial slices stored for memory-mapped access.

One entry (a folder) per volume:

=================  ===================  ==================================================
file               array                content
=================  ===================  ==================================================
``image.npy``      float16 (Z, S, S)    HU clipped to the window, scaled to [0, 1], resized
``label.npy``      uint8 (Z, S, S)      full label map (0/1/2), nearest-neighbour resized
``label_box.npy``  uint8                full label map at the original resolution, cropped
                                        to its bounding box (``meta.json``'s ``label_box``)
``meta.json``      -                    spacing, shapes, and the fingerprint of inputs+settings
=================  ===================  ==================================================

Slices are stored in radiological display orientation (rows anterior->posterior, columns patient
right->left, ``z`` inferior->superior), so figures need no flipping. Spacing is ``(sz, sy, sx)``
in mm, matching the (Z, H, W) arrays.

An entry is written into a temporary folder and renamed into place only once complete, with
``meta.json`` written last: a killed run leaves no half-written entry, and the next run rebuilds
only what is missing. An entry is reused while its fingerprint (source files' path, size and
mtime, and the preprocessing settings) is unchanged, and rebuilt otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .nifti import VolumeFiles, load_pair

CACHE_FORMAT = 2


@dataclass(frozen=True)
class PreprocessSettings:
    hu_min: float = -100.0
    hu_max: float = 600.0
    image_size: int = 256


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


def to_display(array: np.ndarray) -> np.ndarray:
    """Canonical (X, Y, Z) -> display (Z, rows, cols), rows anterior->posterior, columns patient right->left (a view)."""
    return array[::-1, ::-1, :].transpose(2, 1, 0)


def window(hu: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Clip HU to the window and scale to [0, 1], in one float32 pass plus two in-place ones."""
    image = np.empty(hu.shape, dtype=np.float32)  # C-contiguous even when ``hu`` is a strided view
    np.clip(hu, settings.hu_min, settings.hu_max, out=image, casting="unsafe")
    image -= settings.hu_min
    image *= 1.0 / (settings.hu_max - settings.hu_min)
    return image


def resize_image(slices: np.ndarray, size: int) -> np.ndarray:
    """(Z, H, W) float32 -> float16 (Z, size, size).

    Downsampling averages the source pixels under each output pixel ('area', an exact 2x2 mean for
    LiTS' 512 -> 256), which is antialiased and cheap; upsampling is bilinear.
    """
    tensor = torch.from_numpy(slices)[:, None]
    height, width = slices.shape[1:]
    if height % size == 0 and width % size == 0:
        resized = F.avg_pool2d(tensor, kernel_size=(height // size, width // size))
    elif size <= min(height, width):
        resized = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].half().numpy()


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(Z, H, W) label map -> (Z, size, size) by nearest neighbour, the same pixels torch's 'nearest-exact' picks."""
    height, width = labels.shape[1:]
    if height % size == 0 and width % size == 0:  # an integer factor k picks every k-th pixel from k // 2
        step_y, step_x = height // size, width // size
        return np.ascontiguousarray(labels[:, step_y // 2 :: step_y, step_x // 2 :: step_x])
    rows = np.minimum(((np.arange(size) + 0.5) * labels.shape[1] / size).astype(np.int64), labels.shape[1] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * labels.shape[2] / size).astype(np.int64), labels.shape[2] - 1)
    return np.ascontiguousarray(labels[:, rows][:, :, cols])


def foreground_box(labels: np.ndarray) -> list[list[int]]:
    """[start, stop) per axis of the non-zero labels (empty boxes for an empty map)."""
    box = []
    for axis in range(labels.ndim):
        present = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        box.append([int(present[0]), int(present[-1]) + 1] if present.size else [0, 0])
    return box


def preprocess_volume(files: VolumeFiles, settings: PreprocessSettings, entry: Path) -> None:
    """Read one pair, window, resize and write its cache entry atomically at ``entry``."""
    hu, labels, (sx, sy, sz) = load_pair(files)
    hu, labels = to_display(hu), to_display(labels)
    # The full-resolution labels are kept only inside their bounding box: a liver fills a few percent of a CT.
    box = foreground_box(labels)
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", resize_image(window(hu, settings), settings.image_size))
        np.save(tmp / "label.npy", resize_labels(labels, settings.image_size))
        np.save(tmp / "label_box.npy", labels[tuple(slice(a, b) for a, b in box)])
        meta = {
            "volume_id": files.volume_id,
            "spacing": [sz, sy, sx],
            "full_shape": list(labels.shape),
            "label_box": box,
            "fingerprint": fingerprint(files, settings),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}"
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


def build_cache(
    pairs: list[VolumeFiles],
    cache_dir: str | Path,
    settings: PreprocessSettings,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Preprocess every pair whose entry is missing or stale; return the entry folders in ``pairs`` order."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in list(cache_dir.glob(".tmp-*")) + list(cache_dir.glob(".trash-*")):
        shutil.rmtree(leftover, ignore_errors=True)  # from a killed run
    entries = [cache_dir / files.volume_id for files in pairs]
    todo = [(f, e) for f, e in zip(pairs, entries) if not _is_current(e, f, settings)]
    if not todo:
        return entries
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    bar = tqdm(total=len(todo), desc=f"Preprocessing {len(todo)} volume(s) into {cache_dir}", unit="vol", disable=not progress)
    with bar:
        if workers == 1:
            for files, entry in todo:
                preprocess_volume(files, settings, entry)
                bar.update()
        else:
            # one thread per worker: the parallelism is over volumes
            with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                futures = [pool.submit(preprocess_volume, f, settings, e) for f, e in todo]
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
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

    @property
    def num_slices(self) -> int:
        return self.meta["full_shape"][0]

    def label_full(self) -> np.ndarray:
        """The label map at the original resolution, (Z, H, W) uint8."""
        labels = np.zeros(self.meta["full_shape"], dtype=np.uint8)
        labels[tuple(slice(a, b) for a, b in self.meta["label_box"])] = np.load(self.entry / "label_box.npy")
        return labels

    def __getstate__(self):
        # Memory maps are reopened in each DataLoader worker instead of being pickled.
        return {"entry": self.entry, "meta": self.meta, "volume_id": self.volume_id, "spacing": self.spacing}
