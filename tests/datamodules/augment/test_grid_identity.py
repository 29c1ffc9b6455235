"""Image and mask are resampled on one grid with one corner convention, on both augmentation paths: one blob pushed
through as the image and as the mask must come out in the same place. Where the bilinear image is exactly 0 or 1
every pixel it reads had that value, so the nearest-neighbour mask, which reads one of them, must agree there; a
mask resampled on another grid (transposed, other corners, other draw) disagrees on whole bands of pixels."""

from __future__ import annotations

import math

import pytest
import torch
from monai import transforms as mt

from datamodules.augment.batch import BatchAugmentation
from datamodules.augment.sample import InPlaneAugmentation, augment, training_augmentation

H, W = 24, 40  # not square: a swapped height and width would show


def blob(centre=(9.0, 26.0), radii=(5.0, 8.0)) -> torch.Tensor:
    """A (1, H, W) float ellipse off the image centre (so that a flip or rotation moves it)."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return ((((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2) < 1).float()[None]


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """(row, col) centre of mass of an (H, W) weight map."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    weights = mask.double()
    return torch.stack([(weights * y).sum(), (weights * x).sum()]) / weights.sum()


def check_same_place(image: torch.Tensor, mask: torch.Tensor) -> None:
    """``image`` (bilinear) and ``mask`` (nearest) of one blob, (H, W): equal wherever the image is sure, same centre."""
    sure = (image < 1e-4) | (image > 1 - 1e-4)
    assert sure.double().mean() > 0.8
    assert torch.equal(mask[sure] > 0.5, image[sure] > 0.5)
    if mask.any():
        assert torch.dist(centroid(mask), centroid(image)) < 0.5


def fixed(n=1, flip=(False, False), angle=0.0, zoom=1.0) -> dict:
    return {"flip": torch.tensor([flip] * n), "rotated": torch.full((n,), angle != 0.0), "angle": torch.full((n,), angle, dtype=torch.float64),
            "zoomed": torch.full((n,), zoom != 1.0), "zoom": torch.full((n,), zoom, dtype=torch.float64)}


def test_batch_path_resamples_image_and_mask_on_one_grid():
    n = 48
    shape = blob().expand(n, 1, H, W)
    augmentation = BatchAugmentation(flip_prob=0.5, rotate_degrees=30.0, zoom_range=(0.8, 1.25), prob=1.0)
    augmentation.seed(3)
    out = augmentation({"image": shape.clone(), "mask": shape.clone()})
    for i in range(n):
        check_same_place(out["image"][i, 0], out["mask"][i, 0])
    # the draws moved the blob, in different ways: the test is not passing on unchanged samples
    centres = torch.stack([centroid(out["image"][i, 0]) for i in range(n)])
    assert torch.cdist(centres, centroid(shape[0, 0])[None]).min() > 0.5 and centres.std(0).min() > 1.0


@pytest.mark.parametrize("channels", [1, 2])
def test_sample_path_resamples_image_and_mask_on_one_grid(channels):
    transform = training_augmentation(flip_prob=0.5, rotate_degrees=30.0, zoom_range=(0.8, 1.25), prob=1.0)
    transform.set_random_state(seed=5)
    for _ in range(12):
        out = augment(transform, {"image": blob().expand(3, H, W).clone(), "mask": blob().expand(channels, H, W).clone()})
        assert out["image"].shape == (3, H, W) and out["mask"].shape == (channels, H, W)
        for c in range(channels):
            check_same_place(out["image"][0], out["mask"][c])


def test_three_d_sample_path_gives_every_slice_the_same_grid():
    transform = InPlaneAugmentation(flip_prob=0.5, rotate_degrees=30.0, zoom_range=(0.8, 1.25), prob=1.0).set_random_state(seed=2)
    volume = blob().expand(4, H, W)[None].clone()  # (K=1, D=4, H, W)
    for _ in range(4):
        out = transform({"image": volume.clone(), "mask": volume.clone()})
        for d in range(4):
            assert torch.equal(out["image"][0, d], out["image"][0, 0]) and torch.equal(out["mask"][0, d], out["mask"][0, 0])
        check_same_place(torch.as_tensor(out["image"][0, 0]), torch.as_tensor(out["mask"][0, 0]))


@pytest.mark.parametrize(
    "params, monai",
    [
        (dict(angle=0.3), mt.Compose([mt.Rotate(0.3, padding_mode="border")])),
        (dict(angle=-0.45), mt.Compose([mt.Rotate(-0.45, padding_mode="border")])),
        (dict(flip=(True, False)), mt.Compose([mt.Flip(0)])),
        (dict(flip=(False, True)), mt.Compose([mt.Flip(1)])),
        (dict(flip=(True, True), angle=0.2), mt.Compose([mt.Flip(0), mt.Flip(1), mt.Rotate(0.2, padding_mode="border")])),
        (dict(zoom=1.25), mt.Compose([mt.Zoom(1.25, mode="bilinear", padding_mode="edge")])),  # 24 -> 30, 40 -> 50: MONAI's size is exact
    ],
    ids=["rotate+", "rotate-", "flip-rows", "flip-columns", "flips+rotate", "zoom"],
)
def test_both_paths_put_a_non_square_blob_in_the_same_place(params, monai):
    out = BatchAugmentation().apply({"image": blob()[None], "mask": blob()[None]}, fixed(**params))
    expected = torch.as_tensor(monai(blob())).as_subclass(torch.Tensor)[0]  # bilinear, MONAI's default
    torch.testing.assert_close(out["image"][0, 0][4:-4, 4:-4], expected[4:-4, 4:-4], atol=2e-5, rtol=0)
    assert torch.dist(centroid(out["mask"][0, 0]), centroid(expected)) < 0.5
    check_same_place(out["image"][0, 0], out["mask"][0, 0])


def test_a_quarter_turn_moves_the_blob_where_the_hand_says():
    # MONAI's rotation convention (batch.py): output (row, col) reads input R(angle) @ (row, col) about the centre,
    # R = [[cos, -sin], [sin, cos]]. A square image and a small square blob: at angle pi/2, output (r, c) reads input
    # (-c, r) (centred), so the input's pixel (r0, c0) lands at (c0, -r0): centred (-8.5, 3.5) -> (3.5, 8.5).
    size = 32
    image = torch.zeros(1, 1, size, size)
    image[0, 0, 7, 19] = 1.0  # centred: (7 - 15.5, 19 - 15.5) = (-8.5, 3.5)
    out = BatchAugmentation().apply({"image": image, "mask": image.clone()}, fixed(angle=math.pi / 2))
    target = (round(15.5 + 3.5), round(15.5 + 8.5))
    assert out["mask"][0, 0].nonzero().tolist() == [list(target)]
    assert out["image"][0, 0].argmax().item() == target[0] * size + target[1]
    reference = torch.as_tensor(mt.Rotate(math.pi / 2, mode="nearest", padding_mode="border")(image[0])).as_subclass(torch.Tensor)
    assert reference[0].nonzero().tolist() == [list(target)]
