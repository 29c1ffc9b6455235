"""The preprocessing cache: content, reuse, rebuild, and resume after an interrupted run."""

import os

import numpy as np
import pytest

import datamodules.io.cache as cache
from datamodules.io.cache import CachedVolume, build_cache
from datamodules.errors import DataError
from datamodules.io.nifti import discover, load_pair
from datamodules.io.preprocess import PreprocessSettings, resize_image, resize_labels, to_display
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
    # leftovers cleaned; the builders' lock files stay (see datamodules.io.locks)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != ".locks") == [str(i) for i in range(6)]


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
    np.testing.assert_array_equal(resize_labels(labels, size), expected.to(torch.uint8).numpy())
    image = np.random.default_rng(1).random((2, 16, 16)).astype(np.float32)
    resized = resize_image(image, size).astype(np.float32)
    assert resized.shape == (2, size, size)
    if size == 8:  # an integer factor averages each 2x2 block exactly
        np.testing.assert_allclose(resized, image.reshape(2, 8, 2, 8, 2).mean((2, 4)), atol=1e-3)


# -- the full-resolution region around the liver (format 3) ------------------------------------------------
ROI_SETTINGS = PreprocessSettings(-100.0, 600.0, 16, roi_margin_px=3, roi_margin_slices=1)


def windowed_display(hu):
    """The NIfTI's HU windowed to [-100, 600] -> [0, 1] directly, in display orientation (the reference)."""
    return np.clip((to_display(hu).astype(np.float64) + 100.0) / 700.0, 0.0, 1.0)


def padded_box(array, box, pad=40):
    """``array[box]`` with zeros where ``box`` leaves the array (box may have negative starts)."""
    padded = np.pad(array, pad)
    return padded[tuple(slice(a + pad, b + pad) for a, b in box)]


def test_roi_box_image_and_label_counts(tiny_lits, tmp_path):
    pairs = discover(tiny_lits)
    entries = build_cache(pairs, tmp_path / "cache", ROI_SETTINGS, workers=1, progress=False)
    for files, entry in zip(pairs, entries):
        volume = CachedVolume(entry)
        hu, label, _ = load_pair(files)
        labels = to_display(label)
        present = np.argwhere(labels >= 1)
        liver = [(int(a), int(b) + 1) for a, b in zip(present.min(0), present.max(0))]
        assert volume.liver_box == tuple(liver)
        margins = (1, 3, 3)
        expected = tuple((max(0, a - m), min(n, b + m)) for (a, b), m, n in zip(liver, margins, labels.shape))
        assert volume.roi_box == expected and volume.meta["roi_box"] == [list(axis) for axis in expected]
        assert volume.full_shape == labels.shape == (10, 32, 32)
        assert volume.roi_image.dtype == np.float16
        assert volume.roi_image.shape == tuple(b - a for a, b in expected)
        reference = windowed_display(hu)[tuple(slice(a, b) for a, b in expected)]
        np.testing.assert_allclose(volume.roi_image.astype(np.float32), reference, atol=5e-4, rtol=0)  # float16 rounding
        assert volume.label_counts == tuple(int(c) for c in np.bincount(label.ravel(), minlength=3))
    # the margins are part of the fingerprint
    stamps = entry_stamps(entries)
    wider = PreprocessSettings(-100.0, 600.0, 16, roi_margin_px=64, roi_margin_slices=4)
    rebuilt = build_cache(pairs, tmp_path / "cache", wider, workers=1, progress=False)
    assert all(stamps[k] != v for k, v in entry_stamps(rebuilt).items())
    volume = CachedVolume(rebuilt[0])
    z0, z1 = volume.liver_box[0]
    assert volume.roi_box == ((max(0, z0 - 4), min(10, z1 + 4)), (0, 32), (0, 32))  # clipped to the volume
    # full resolution: the resized stack (16 x 16) is its 2 x 2 block mean
    roi = volume.roi_image.astype(np.float32)
    z = np.arange(*volume.roi_box[0])
    np.testing.assert_allclose(volume.image[z].astype(np.float32), roi.reshape(len(z), 16, 2, 16, 2).mean((2, 4)), atol=1e-3)


@pytest.mark.parametrize(
    "box",
    [
        ((4, 6), (10, 20), (8, 22)),  # inside the cached region
        ((0, 10), (0, 32), (0, 32)),  # the whole volume: partly outside the cached region
        ((-3, 4), (-7, 12), (25, 40)),  # beyond the volume on every axis
        ((12, 14), (0, 5), (0, 5)),  # entirely outside the volume
        ((5, 6), (-20, 50), (-20, 50)),  # larger than the volume in-plane
    ],
)
def test_read_image_and_labels_pad_outside(tiny_lits, tmp_path, box):
    pairs = discover(tiny_lits)[:1]
    volume = CachedVolume(build_cache(pairs, tmp_path / "cache", ROI_SETTINGS, workers=1, progress=False)[0])
    hu, label, _ = load_pair(pairs[0])
    image, labels = volume.read_image(box), volume.read_labels(box)
    shape = tuple(b - a for a, b in box)
    assert image.shape == labels.shape == shape and image.dtype == np.float32 and labels.dtype == np.uint8
    # labels: exact everywhere (label_box holds every non-zero label), 0 beyond the volume
    np.testing.assert_array_equal(labels, padded_box(to_display(label), box))
    np.testing.assert_array_equal(labels, padded_box(volume.label_full(), box))
    # image: exactly the cached full-resolution values inside roi_box, 0.0 elsewhere
    cached = np.zeros(volume.full_shape, dtype=np.float32)
    cached[tuple(slice(a, b) for a, b in volume.roi_box)] = volume.roi_image
    np.testing.assert_array_equal(image, padded_box(cached, box))
    inside = padded_box(np.pad(np.ones(volume.roi_image.shape, bool), [(a, n - b) for (a, b), n in zip(volume.roi_box, volume.full_shape)]), box)
    np.testing.assert_allclose(image[inside], padded_box(windowed_display(hu), box)[inside], atol=5e-4, rtol=0)
    assert not image[~inside].any()


def test_volume_without_liver_has_an_empty_roi(tmp_path):
    hu, label = tiny_volume(0)
    write_pair(tmp_path / "data", "0", hu, np.zeros_like(label))
    volume = CachedVolume(build_cache(discover(tmp_path / "data"), tmp_path / "cache", ROI_SETTINGS, workers=1, progress=False)[0])
    assert volume.roi_box == volume.liver_box == ((0, 0), (0, 0), (0, 0))
    assert volume.roi_image.shape == (0, 0, 0)
    assert volume.label_counts == (label.size, 0, 0)
    assert not volume.read_image(((0, 10), (0, 32), (0, 32))).any()
    assert not volume.read_labels(((2, 5), (-1, 8), (3, 40))).any()
