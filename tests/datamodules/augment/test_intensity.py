"""The optional intensity augmentation (``augmentation.intensity_shift`` / ``intensity_scale``), both paths."""

import numpy as np
import pytest
import torch

from datamodules.augment.batch import BatchAugmentation
from datamodules.augment.sample import augment, training_augmentation


def constant_batch(n=64, value=0.5):
    image = torch.full((n, 1, 8, 8), value)
    mask = torch.zeros(n, 1, 8, 8)
    return {"image": image, "mask": mask, "label": torch.zeros(n)}


def test_off_by_default_leaves_the_draws_and_images_as_before():
    plain, zero = BatchAugmentation(), BatchAugmentation(intensity_shift=0.0, intensity_scale=0.0)
    batch = {"image": torch.rand(4, 1, 16, 16), "mask": (torch.rand(4, 1, 16, 16) > 0.5).float(), "label": torch.zeros(4)}
    a, b = plain(batch), zero(batch)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_batch_path_scales_then_shifts_each_image_within_its_range():
    augmentation = BatchAugmentation(flip_prob=0, rotate_degrees=0, prob=0, intensity_shift=0.1, intensity_scale=0.2)
    params = augmentation.draw(64)
    out = augmentation.apply(constant_batch(), params)
    expected = 0.5 * params["scale"] + params["shift"]  # hand formula per sample
    assert torch.allclose(out["image"][:, 0, 4, 4].double(), expected, atol=1e-6)
    assert params["scale"].min() >= 0.8 and params["scale"].max() <= 1.2 and params["scale"].std() > 0.05
    assert params["shift"].abs().max() <= 0.1 and params["shift"].std() > 0.02
    assert torch.equal(out["mask"], constant_batch()["mask"])  # masks untouched


def test_sample_path_draws_the_same_distributions():
    transform = training_augmentation(flip_prob=0, rotate_degrees=0, prob=0, intensity_shift=0.1, intensity_scale=0.2)
    values = np.array([float(augment(transform, {"image": torch.full((1, 8, 8), 0.5), "mask": torch.zeros(1, 8, 8)})["image"][0, 4, 4])
                       for _ in range(200)])
    # 0.5 * (1 + U(-0.2, 0.2)) + U(-0.1, 0.1) lies within [0.3, 0.7], centred on 0.5
    assert values.min() >= 0.3 - 1e-6 and values.max() <= 0.7 + 1e-6
    assert abs(values.mean() - 0.5) < 0.03 and values.std() > 0.04


@pytest.mark.parametrize("shift, scale", [(-0.1, 0.0), (0.0, 1.0)])
def test_bad_values_are_refused_in_one_line(shift, scale, tmp_path):
    from datamodules import LiTSDataModule
    from datamodules.errors import ConfigError
    with pytest.raises(ConfigError, match="intensity"):
        LiTSDataModule(root=str(tmp_path), augmentation={"intensity_shift": shift, "intensity_scale": scale})
