"""The 3D cascade's whole-volume inference (lightning_modules/cascade_3d.py) with oracle networks: predictors that
read the label straight from the image's intensity, so the cascade's own geometry (sliding window, region, mapping
back to the original grid) is what is tested."""

import numpy as np
import pytest
import torch

from datamodules.io.volume3d import interpolate_z, original_positions, resampled_positions
from lightning_modules.inference.cascade_3d import predict_volume_3d, resampled_box, window_probabilities

LIVER, LESION = 0.6, 0.3  # image intensities of the two labels; background 0


def liver_oracle(window: torch.Tensor) -> torch.Tensor:
    return (window > 0.15).float()


def lesion_oracle(window: torch.Tensor) -> torch.Tensor:
    return ((window > 0.15) & (window < 0.45)).float()


def phantom(shape=(20, 64, 64)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:17, 10:50, 12:44] = 1
    labels[6:10, 20:30, 20:28] = 2
    labels[12:15, 35:41, 30:36] = 2
    return labels


def image_of(labels: np.ndarray) -> np.ndarray:
    return np.select([labels == 2, labels == 1], [LESION, LIVER], 0.0).astype(np.float32)


def test_same_grid_gives_the_truth():
    labels = phantom()
    image = torch.from_numpy(image_of(labels))
    result = predict_volume_3d(liver_oracle, lesion_oracle, image, np.arange(len(labels), dtype=np.float64), labels.shape,
                               roi_size=(16, 32, 32), lesion_dilation=0)
    np.testing.assert_array_equal(result["labels"], labels)
    (z0, z1), (y0, y1), (x0, x1) = result["roi_box"].tolist()
    assert z0 <= 3 and z1 >= 17 and y0 <= 10 and y1 >= 50 and x0 <= 12 and x1 >= 44


def test_resampled_grid_maps_back_to_the_original_volume():
    """Twice as coarse in-plane and 5 mm slices resampled to 2.5 mm: the labels come back on the original grid."""
    labels = phantom((20, 64, 64))
    small = torch.from_numpy(image_of(labels[:, ::2, ::2]))
    positions = resampled_positions(20, 5.0, 2.5)
    image = interpolate_z(small[None], positions, "nearest")[0]
    result = predict_volume_3d(liver_oracle, lesion_oracle, image, original_positions(20, 5.0, 2.5), labels.shape,
                               roi_size=(16, 16, 16), lesion_dilation=2, probabilities=True)
    found = result["labels"]
    assert found.shape == labels.shape
    for part in (1, 2):
        truth, pred = labels >= part, found >= part
        dice = 2 * (truth & pred).sum() / (truth.sum() + pred.sum())
        assert dice > 0.85, (part, dice)
    assert result["lesion_probability"].shape == labels.shape
    assert (result["lesion_probability"][found == 2] >= 0.5).all()  # a lesion voxel is where the lesion network said so


def test_no_liver_and_liver_only():
    labels = phantom()
    empty = predict_volume_3d(liver_oracle, lesion_oracle, torch.zeros(labels.shape), np.arange(20.0), labels.shape, (16, 32, 32))
    assert not empty["labels"].any() and not empty["roi_box"].any()
    liver_only = predict_volume_3d(liver_oracle, None, torch.from_numpy(image_of(labels)), np.arange(20.0), labels.shape, (16, 32, 32))
    np.testing.assert_array_equal(liver_only["labels"], (labels >= 1).astype(np.uint8))


@pytest.mark.parametrize(
    "box, expected",
    [
        ([[5, 6], [10, 12], [10, 12]], [[0, 16], [0, 32], [0, 32]]),  # widened to one window, inside the volume
        ([[0, 20], [0, 64], [0, 64]], [[0, 39], [0, 64], [0, 64]]),  # the whole volume: clipped
        ([[10, 11], [30, 34], [30, 34]], [[12, 28], [16, 48], [16, 48]]),  # centred on the box where the volume allows
    ],
)
def test_resampled_box(box, expected):
    positions = original_positions(20, 5.0, 2.5)  # original slice i is resampled slice 2i; 39 resampled slices
    got = resampled_box(box, positions, (64, 64), (39, 64, 64), margin=0, margin_slices=0, roi_size=(16, 32, 32))
    assert got[1:] == expected[1:]
    if box[0] == [0, 20]:
        assert got[0] == expected[0]
    assert got[0][1] - got[0][0] >= 16 and got[0][0] <= 2 * box[0][0] and got[0][1] >= 2 * (box[0][1] - 1) + 1


def fixed_network(seed: int = 0):
    """A random but fixed 3D convolution with a sigmoid: its output depends on what pads the volume (unlike the oracles)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(1, 1, 5, padding=2, padding_mode="replicate")
    return lambda window: torch.sigmoid(conv(window) * 4)


@pytest.mark.parametrize("shape", [(7, 40, 24), (9, 12, 12)])  # thinner than the window along z; and on every axis
def test_volume_smaller_than_the_window_equals_padding_and_cropping_back(shape):
    from monai.transforms import SpatialPad

    from datamodules.datasets.crops3d import AIR

    roi = (16, 16, 16)
    image = torch.rand(shape)
    network = fixed_network()
    with torch.no_grad():
        probs = window_probabilities(network, image, roi)
        padded_size = [max(n, k) for n, k in zip(shape, roi)]
        padded = SpatialPad(padded_size, method="symmetric", value=AIR)(image[None]).as_tensor()[0]
        start = [(p - n) // 2 for p, n in zip(padded_size, shape)]
        expected = window_probabilities(network, padded, roi)[tuple(slice(s, s + n) for s, n in zip(start, shape))]
    assert probs.shape == shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(probs, network(image[None, None])[0, 0].detach(), atol=1e-3)  # the padding did matter at the edges


def test_thin_slab_through_the_cascade():
    """A 6-slice slab against 16-slice windows: label maps of the slab's own shape, equal to the truth."""
    labels = phantom((6, 64, 64))
    labels[:] = phantom()[6:12]
    result = predict_volume_3d(liver_oracle, lesion_oracle, torch.from_numpy(image_of(labels)), np.arange(6.0), labels.shape,
                               roi_size=(16, 32, 32), lesion_dilation=0, probabilities=True)
    assert result["labels"].shape == result["lesion_probability"].shape == labels.shape
    np.testing.assert_array_equal(result["labels"], labels)
    assert result["roi_box"][0].tolist() == [0, 6]
