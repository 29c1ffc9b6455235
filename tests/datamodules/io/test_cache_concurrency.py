"""Several processes building one cache at once, as every node's rank 0 does in a multi-node run."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.io import cache
from datamodules.io.atomic import temporary_path
from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.locks import lock_for
from datamodules.io.nifti import discover
from datamodules.io.preprocess import PreprocessSettings
from datamodules.io.volume3d import resample_volume

SETTINGS = PreprocessSettings(image_size=16)
FORK = multiprocessing.get_context("fork")


def _build_at_once(start, log: Path, pairs, cache_dir: Path, spacing: float | None) -> None:
    """A child: log every build it does, wait for its sibling, then build the cache (and resample it)."""
    torch.set_num_threads(1)  # forked after the parent used its OpenMP pool, which a child cannot reuse
    real_build, real_resample = cache.preprocess_volume, np.save

    def logged(files, settings, entry):
        with open(log, "a") as out:
            out.write(f"entry {files.volume_id}\n")
        real_build(files, settings, entry)

    cache.preprocess_volume = logged
    start.wait()
    entries = build_cache(pairs, cache_dir, SETTINGS, workers=1, progress=False)
    if spacing is not None:
        def logged_save(path, array):
            with open(log, "a") as out:
                out.write(f"save {'image' if 'image3d_' in Path(path).name else 'label'}\n")
            real_resample(path, array)

        np.save = logged_save
        for entry in entries:
            resample_volume(CachedVolume(entry), spacing)


def build_in_two_processes(tmp_path: Path, pairs, spacing: float | None = None) -> list[str]:
    """Two forked processes build ``tmp_path/cache`` at the same moment; the builds they did, both logs together."""
    start, log = FORK.Barrier(2), tmp_path / "builds.log"
    children = [FORK.Process(target=_build_at_once, args=(start, log, pairs, tmp_path / "cache", spacing)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]  # both builders succeed
    return log.read_text().splitlines()


def assert_same_entries(left: Path, right: Path, ids) -> None:
    for volume_id in ids:
        a, b = CachedVolume(left / volume_id), CachedVolume(right / volume_id)
        assert a.meta == b.meta
        for name in ("image", "label", "roi_image", "label_box"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_two_builders_of_one_fresh_cache_both_succeed_and_build_each_entry_once(tiny_lits, tmp_path):
    pairs = discover(tiny_lits)
    builds = build_in_two_processes(tmp_path, pairs)
    ids = [p.volume_id for p in pairs]
    # each entry was built by one of them; the other found it done (it built others meanwhile, or waited)
    assert sorted(builds) == sorted(f"entry {i}" for i in ids)
    assert_same_entries(tmp_path / "cache", Path(build_cache(pairs, tmp_path / "single", SETTINGS, workers=1, progress=False)[0]).parent, ids)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_two_processes_resampling_one_entry_build_it_once(tiny_lits, tmp_path):
    pairs = discover(tiny_lits)[:2]
    builds = build_in_two_processes(tmp_path, pairs, spacing=2.5)
    assert sorted(line for line in builds if line.startswith("save")) == ["save image"] * 2 + ["save label"] * 2  # 2 entries, once each
    single = build_cache(pairs, tmp_path / "single", SETTINGS, workers=1, progress=False)
    for shared, alone in zip([tmp_path / "cache" / p.volume_id for p in pairs], single):
        a, b = resample_volume(CachedVolume(shared), 2.5), resample_volume(CachedVolume(alone), 2.5)
        assert a.meta["shape"] == b.meta["shape"] and a.meta["z_positions"] == b.meta["z_positions"]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_a_builder_leaves_another_builders_temporary_folder_alone(tiny_lits, tmp_path):
    """What crashed a 2-node run: a builder starting cleared the other's in-progress folder."""
    pairs = discover(tiny_lits)
    cache_dir = tmp_path / "cache"
    build_cache(pairs[:1], cache_dir, SETTINGS, workers=1, progress=False)
    entry = cache_dir / pairs[1].volume_id
    lock = lock_for(entry)
    lock.acquire()  # another node is writing entry 1 right now...
    busy = temporary_path(entry).with_name(temporary_path(entry).name.replace(f"-{os.getpid()}-", "-999999-"))
    busy.mkdir()
    (busy / "image.npy").write_bytes(b"being written")
    waiting = FORK.Process(target=_build_at_once, args=(FORK.Barrier(1), tmp_path / "builds.log", pairs, cache_dir, None))
    waiting.start()
    others = [cache_dir / p.volume_id / "meta.json" for p in pairs if p.volume_id != entry.name]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(path.exists() for path in others)  # it built the others first...
    waiting.join(0.5)
    assert waiting.is_alive() and (busy / "image.npy").exists()  # ...and waits for entry 1, its folder untouched
    lock.release()  # ...and was killed: its folder is a leftover now, removed by whoever takes the lock
    waiting.join(60)
    assert waiting.exitcode == 0 and not busy.exists() and json.loads((entry / "meta.json").read_text())["volume_id"] == entry.name
