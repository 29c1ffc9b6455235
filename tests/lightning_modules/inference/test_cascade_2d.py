"""The cascade's whole-volume inference on hand-made volumes and predictors whose output is known."""

import numpy as np
import pytest
import torch

from lightning_modules.inference.cascade_2d import context_stack, dilate_in_plane, liver_mask, mask_box, predict_volume, slice_probabilities


def threshold_predictor(low, high, calls=None):
    """A 'network' that calls a pixel foreground when the centre channel lies in [low, high)."""
    def predict(batch):
        if calls is not None:
            calls.append(tuple(batch.shape))
        centre = batch[:, batch.shape[1] // 2 : batch.shape[1] // 2 + 1]
        return ((centre >= low) & (centre < high)).float()
    return predict


def test_context_stack_repeats_edge_slices():
    slices = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    stacked = context_stack(slices, torch.tensor([0, 3]), 1)
    assert stacked.shape == (2, 3, 2, 2)
    assert stacked[0, :, 0, 0].tolist() == [0, 0, 1] and stacked[1, :, 0, 0].tolist() == [2, 3, 3]


@pytest.mark.parametrize("shape", [(5, 16, 16), (3, 21, 35)])
def test_slice_probabilities_pads_to_16_and_crops_back(shape):
    calls = []
    slices = torch.rand(shape)
    probs = slice_probabilities(threshold_predictor(0.5, 2.0, calls), slices, in_channels=3, batch_size=2)
    assert probs.shape == (shape[0], 1, *shape[1:])
    assert torch.equal(probs[:, 0], (slices >= 0.5).float())
    assert all(c[1] == 3 and c[2] % 16 == 0 and c[3] % 16 == 0 for c in calls) and len(calls) == (shape[0] + 1) // 2


def test_liver_mask_keeps_the_largest_component_at_full_resolution():
    probs = torch.zeros(4, 1, 8, 8)
    probs[1:3, 0, 1:5, 1:5] = 0.9  # large blob
    probs[0, 0, 7, 7] = 0.9  # small far blob
    mask = liver_mask(probs, (16, 16))
    assert mask.shape == (4, 16, 16) and not mask[0].any()
    assert mask[1:3].sum() == 2 * 8 * 8  # each 4x4 block becomes 8x8 under 2x bilinear upsampling at threshold 0.5


def test_mask_box_and_dilation():
    mask = np.zeros((6, 20, 20), dtype=bool)
    mask[2:4, 5:8, 10:12] = True
    assert mask_box(mask, margin=3, margin_slices=1) == [[1, 5], [2, 11], [7, 15]]
    assert mask_box(mask, margin=30, margin_slices=9) == [[0, 6], [0, 20], [0, 20]]
    assert mask_box(np.zeros((2, 3, 3), bool), 1, 1) is None
    dilated = dilate_in_plane(mask, 2)
    assert dilated[2, 3, 10] and not dilated[2, 2, 9] and not dilated[1].any()  # disk in-plane, never across slices


def test_predict_volume_finds_lesions_inside_the_liver_only():
    # Full resolution 4 x 32 x 32: liver (0.6) with a lesion (0.2) inside, and a lesion-like blob (0.2) far outside.
    full = np.zeros((4, 32, 32), dtype=np.float32)
    full[:, 8:24, 8:24] = 0.6
    full[1:3, 12:16, 12:16] = 0.2
    full[:, 28:31, 1:4] = 0.2
    small = torch.from_numpy(full[:, ::2, ::2].copy())  # the 'resized' stack the liver network sees
    reads = []

    def read_image(box):
        reads.append(box)
        out = np.zeros([b - a for a, b in box], np.float32)
        region = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(box, full.shape))
        out[tuple(slice(r.start - a, r.stop - a) for r, (a, _) in zip(region, box))] = full[region]
        return out

    liver = threshold_predictor(0.1, 1.0)  # calls lesions liver too (LiTS: lesions are liver)
    lesion = threshold_predictor(0.1, 0.3)
    result = predict_volume(liver, lesion, small, read_image, full.shape, region_margin=2, region_margin_slices=0,
                            lesion_dilation=1, probabilities=True)
    labels = result["labels"]
    assert labels.shape == full.shape and labels.dtype == np.uint8
    assert (labels[1:3, 12:16, 12:16] == 2).all()
    assert (labels == 2).sum() == 2 * 16  # only the lesion inside the liver
    assert (labels[:, 28:31, 1:4] == 0).all()  # the far blob is neither liver (largest component) nor lesion
    assert ((labels >= 1) == (full >= 0.1) & (np.arange(32)[None, :, None] < 26)).all()
    assert result["roi_box"].tolist() == [[0, 4], [6, 26], [6, 26]] and reads == [[[0, 4], [6, 26], [6, 26]]]
    assert result["lesion_probability"][:, :6].max() == 0 and result["liver_probability"].shape == full.shape
    # a liver-only model gives 0/1 and never reads the full-resolution image
    reads.clear()
    only_liver = predict_volume(liver, None, small, read_image, full.shape)["labels"]
    assert set(np.unique(only_liver)) == {0, 1} and not reads
