"""The HU window at and above its top (bone, contrast, metal: 600 HU and more), where the synthetic test volumes never
reach: exact mapped values of ``window`` and of a cache entry built from a NIfTI volume holding them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.io.cache import preprocess_volume
from datamodules.io.nifti import VolumeFiles
from datamodules.io.preprocess import PreprocessSettings, window
from tests.synthetic import write_pair

# HU -> (HU clipped to [-100, 600] + 100) / 700, by hand
HAND = {-1024: 0.0, -101: 0.0, -100: 0.0, -99: 1 / 700, 0: 1 / 7, 250: 0.5, 530: 0.9, 599: 699 / 700,
        600: 1.0, 601: 1.0, 1200: 1.0, 3071: 1.0}


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_window_maps_the_top_and_beyond_to_exactly_one(dtype):
    hu = np.array(list(HAND), dtype=dtype)
    image = window(hu, PreprocessSettings())
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, list(HAND.values()), rtol=1e-6, atol=0)
    exact = {value: image[i] for i, value in enumerate(HAND) if HAND[value] in (0.0, 0.5, 1.0)}
    assert all(mapped == HAND[value] for value, mapped in exact.items()), exact  # 0, 1/2 and 1 exactly
    assert (np.diff(image) >= 0).all()  # monotone: no value above the top comes back below 1


def test_window_of_a_strided_view_above_the_top():
    hu = np.full((4, 6, 8), 1200, dtype=np.int16)[::-1, ::2].transpose(2, 1, 0)  # as to_display hands it over
    image = window(hu, PreprocessSettings(hu_min=-160.0, hu_max=240.0))
    assert image.flags.c_contiguous and image.shape == (8, 3, 4) and (image == 1.0).all()


def test_a_cache_entry_stores_the_mapped_values_of_a_bright_volume(tmp_path):
    # One HU value per slice (display slice z holds HAND's z-th value); labels 1 everywhere, so the full-resolution
    # region around the liver is the whole volume. 4x4 in-plane resized to 2x2: exact 2x2 means of equal values.
    values = list(HAND)
    hu = np.empty((4, 4, len(values)), dtype=np.int16)
    hu[:] = np.array(values, dtype=np.int16)
    labels = np.ones(hu.shape, dtype=np.uint8)
    image_path, label_path = write_pair(tmp_path / "lits", "bright", hu, labels)
    entry = tmp_path / "cache" / "bright"
    entry.parent.mkdir()
    preprocess_volume(VolumeFiles("bright", image_path, label_path), PreprocessSettings(image_size=2), entry)
    image, roi = np.load(entry / "image.npy"), np.load(entry / "roi_image.npy")
    assert image.dtype == roi.dtype == np.float16 and image.shape == (len(values), 2, 2) and roi.shape == (len(values), 4, 4)
    expected = np.array([np.float16(HAND[value]) for value in values])  # float16 of the hand value
    assert (image == expected[:, None, None]).all() and (roi == expected[:, None, None]).all()
    assert expected[values.index(600)] == expected[values.index(3071)] == 1.0 and expected[values.index(599)] < 1.0
    assert json.loads((entry / "meta.json").read_text())["label_counts"] == [0, hu.size, 0]
