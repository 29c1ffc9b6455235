"""(a) Preprocessing (decode + reorient + window + resize + write the cache) against a plain nibabel decode."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.io.cache import build_cache
from datamodules.io.preprocess import PreprocessSettings
from datamodules.io.nifti import discover


def best_of(repeats: int, *functions) -> list[float]:
    """Run the functions alternately ``repeats`` times; the best wall time of each."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, function in enumerate(functions):
            start = time.perf_counter()
            function()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bench_preprocess(root: Path, work: Path, repeats: int) -> dict:
    pairs = discover(root)
    settings = PreprocessSettings(image_size=256)

    def decode():
        for files in pairs:
            np.asanyarray(nib.load(files.image).dataobj)
            np.asanyarray(nib.load(files.label).dataobj)

    def preprocess(workers):
        shutil.rmtree(work / "cache", ignore_errors=True)
        build_cache(pairs, work / "cache", settings, workers=workers, progress=False)

    # the suite's default (one process per core, parallel over volumes), and a single process
    decode_s, default_s, single_s = best_of(repeats, decode, lambda: preprocess(None), lambda: preprocess(1))
    return {"volumes": len(pairs), "decode_s": decode_s, "preprocess_s": default_s, "ratio": default_s / decode_s,
            "single_s": single_s, "single_ratio": single_s / decode_s, "workers": os.cpu_count()}
