"""The preprocessing cache: content, reuse, rebuild, and resume after an interrupted run."""

import os

import numpy as np
import pytest

import datamodules.cache as cache
from datamodules.cache import CachedVolume, PreprocessSettings, build_cache
from datamodules.nifti import DataError, discover, load_pair
from tests.synthetic import tiny_volume, write_pair

SETTINGS = PreprocessSettings(-100.0, 600.0, 16)


def entry_stamps(entries):
    return {e.name: (e / "meta.json").stat().st_mtime_ns for e in entries}


def test_entry_content(tiny_lits, tmp_path):
    pairs = discover(tiny_lits)
    entries = build_cache(pairs, tmp_path / "cache", SETTINGS, workers=1, progress=False)
    volume = CachedVolume(entries[0])
    hu, label, (sx, sy, sz) = load_pair(pairs[0])
    assert volume.image.shape == volume.label.shape == (10, 16, 16)
    assert volume.image.dtype == np.float16 and 0 <= volume.image.min() and volume.image.max() <= 1
    assert volume.spacing == (sz, sy, sx)
    full = volume.label_full()
    assert full.shape == (10, 32, 32)
    # display orientation: rows anterior->posterior (y reversed), columns right->left (x reversed)
    np.testing.assert_array_equal(full[3], label[::-1, ::-1, 3].T)
    assert set(np.unique(volume.label)) <= {0, 1, 2}


def test_reused_when_unchanged_and_rebuilt_when_inputs_or_settings_change(tiny_lits, tmp_path):
    pairs = discover(tiny_lits)
    entries = build_cache(pairs, tmp_path / "cache", SETTINGS, workers=2, progress=False)
    first = entry_stamps(entries)
    assert entry_stamps(build_cache(pairs, tmp_path / "cache", SETTINGS, workers=2, progress=False)) == first

    write_pair(tiny_lits, "2", *tiny_volume(42))  # new content for volume 2
    os.utime(tiny_lits / "volume-2.nii.gz", ns=(1, 1))  # a different mtime even on coarse clocks
    second = entry_stamps(build_cache(discover(tiny_lits), tmp_path / "cache", SETTINGS, workers=1, progress=False))
    assert [k for k in first if first[k] != second[k]] == ["2"]

    bigger = PreprocessSettings(-100.0, 600.0, 32)
    third = entry_stamps(build_cache(discover(tiny_lits), tmp_path / "cache", bigger, workers=1, progress=False))
    assert all(third[k] != second[k] for k in third)
    assert CachedVolume(tmp_path / "cache" / "0").image.shape[-1] == 32


def test_interrupted_run_leaves_no_partial_entry_and_resumes(tiny_lits, tmp_path, monkeypatch):
    pairs = discover(tiny_lits)
    real = cache.preprocess_volume
    calls = []

    def killed_on_third(files, settings, entry):
        calls.append(files.volume_id)
        if len(calls) == 3:
            # simulate a kill while the entry is being written: its temporary folder exists, the entry does not
            (entry.parent / f".tmp-{entry.name}-dead").mkdir()
            raise KeyboardInterrupt
        real(files, settings, entry)

    monkeypatch.setattr(cache, "preprocess_volume", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(pairs, tmp_path / "cache", SETTINGS, workers=1, progress=False)
    complete = sorted(p.name for p in (tmp_path / "cache").iterdir() if (p / "meta.json").exists())
    assert complete == ["0", "1"]
    assert not (tmp_path / "cache" / "2").exists()

    monkeypatch.setattr(cache, "preprocess_volume", lambda f, s, e: (calls.append(f.volume_id), real(f, s, e)))
    calls.clear()
    build_cache(pairs, tmp_path / "cache", SETTINGS, workers=1, progress=False)
    assert calls == ["2", "3", "4", "5"]  # only the unfinished volumes
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [str(i) for i in range(6)]  # leftovers cleaned


def test_bad_volume_in_a_worker_fails_with_its_one_line_error(tiny_lits, tmp_path):
    hu, label = tiny_volume(0)
    label[1, 1, 1] = 7
    write_pair(tiny_lits, "3", hu, label)
    with pytest.raises(DataError, match="segmentation-3.nii.gz: label values"):
        build_cache(discover(tiny_lits), tmp_path / "cache", SETTINGS, workers=2, progress=False)
    assert not (tmp_path / "cache" / "3").exists()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.parametrize("size", [8, 12, 32])
def test_resizing_matches_torch_reference(size):
    import torch
    import torch.nn.functional as F

    labels = np.random.default_rng(0).integers(0, 3, (2, 16, 16)).astype(np.uint8)
    expected = F.interpolate(torch.from_numpy(labels)[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    np.testing.assert_array_equal(cache.resize_labels(labels, size), expected.to(torch.uint8).numpy())
    image = np.random.default_rng(1).random((2, 16, 16)).astype(np.float32)
    resized = cache.resize_image(image, size).astype(np.float32)
    assert resized.shape == (2, size, size)
    if size == 8:  # an integer factor averages each 2x2 block exactly
        np.testing.assert_allclose(resized, image.reshape(2, 8, 2, 8, 2).mean((2, 4)), atol=1e-3)
