"""CombinedLiverLesion is trained on what it is scored on: its liver network on whole slices at the evaluation's scale,
its lesion network on full-resolution crops fed the liver probability the evaluation would feed it at those pixels."""

import numpy as np
import pytest
import torch

from lightning_modules import CombinedLiverLesion
from lightning_modules.inference.cascade_2d import predict_volume, upsample_probabilities
from lightning_modules.inference.liver_guided import LiverGuided, crop_probability, region_probability

TINY = dict(base_channels=4)


def ramp(depth: int, size: int) -> torch.Tensor:
    """(Z, 1, size, size) probabilities that change along every axis: any misplaced pixel shows."""
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (depth, size, size)), indexing="ij")
    return ((0.3 * y + 0.7 * x + 2 * z) / (size + 2 * depth)).clamp(0, 1)[:, None]


@pytest.mark.parametrize("full", [(64, 64), (96, 80)])
def test_the_crops_liver_probability_is_the_evaluations_resized_back_probability(full):
    probs = ramp(3, 32)
    evaluated = upsample_probabilities(probs, full)  # the cascade's liver probability at full resolution
    origins = torch.tensor([[0, 0], [10, 23], [full[0] - 16, full[1] - 16], [-5, full[1] - 9]])
    cut = crop_probability(probs[[0, 1, 2, 1]], origins, torch.tensor([full] * 4), 16)
    for crop, z, (y0, x0) in zip(cut[:, 0].numpy(), [0, 1, 2, 1], origins.tolist()):
        expected = np.pad(evaluated[z], 16)[y0 + 16 : y0 + 32, x0 + 16 : x0 + 32]  # 0 beyond the slice
        np.testing.assert_allclose(crop, expected, rtol=0, atol=1e-6)
    box = [[1, 3], [7, 40], [5, full[1]]]
    np.testing.assert_allclose(region_probability(probs, full, box).numpy(), evaluated[1:3, 7:40, 5:], rtol=0, atol=1e-6)


def test_evaluation_feeds_the_lesion_network_the_liver_probability_of_its_region():
    model = CombinedLiverLesion(**TINY).eval()
    liver, _, lesion, channels = model.cascade_networks({"image": torch.zeros(6, 32, 32), "full_shape": torch.tensor([6, 64, 64])})
    assert isinstance(lesion, LiverGuided) and channels == 1
    probs = ramp(6, 32)
    probs[:, :, 8:24, 8:24] += 0.5  # a liver in the middle slices
    probs[[0, 5]] = 0
    seen = []
    result = predict_volume(lambda image: probs[: len(image)] if len(image) == 6 else None, LiverGuided(lambda image: seen.append(image) or image[:, -1:]),
                            torch.zeros(6, 32, 32), lambda box: np.zeros([b - a for a, b in box], np.float32), (6, 64, 64),
                            region_margin=0, region_margin_slices=0, lesion_dilation=0, batch_size=16)
    (z0, z1), (y0, y1), (x0, x1) = result["roi_box"].tolist()
    guide = torch.cat(seen)[:, -1, : y1 - y0, : x1 - x0]
    np.testing.assert_allclose(guide.numpy(), upsample_probabilities(probs, (64, 64))[z0:z1, y0:y1, x0:x1], rtol=0, atol=1e-6)


def batch_of(size: int = 32, full: int = 64, crop: int = 16) -> dict:
    torch.manual_seed(0)
    mask = torch.zeros(4, 2, size, size)
    mask[:3, 0, 8:24, 8:24] = 1
    mask[:3, 1, 12:16, 12:16] = 1
    crop_mask = torch.zeros(4, 2, crop, crop)
    crop_mask[:3, :, 4:10, 4:10] = 1
    return {"image": torch.rand(4, 1, size, size), "mask": mask, "crop_image": torch.rand(4, 1, crop, crop), "crop_mask": crop_mask,
            "crop_origin": torch.tensor([[16, 16], [20, 30], [0, 48], [0, 0]]), "crop_valid": torch.tensor([1.0, 1.0, 1.0, 0.0]),
            "full_size": torch.tensor([[full, full]] * 4), "volume_index": torch.zeros(4, dtype=torch.long)}


def test_training_sees_whole_slices_for_the_liver_and_guided_crops_for_lesions(monkeypatch):
    model = CombinedLiverLesion(**TINY)
    batch, inputs = batch_of(), {}
    for name, network in (("liver", model.liver_model), ("lesion", model.model)):
        network.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, [args[0]]) and None)
    monkeypatch.setattr(model, "log_dict", lambda *args, **kwargs: None)
    loss = model.training_step(batch, 0)
    assert inputs["liver"][0] is batch["image"]  # whole (32 px) slices, as evaluation resizes them, the liver-free one too
    lesion_input = inputs["lesion"][0]
    assert lesion_input.shape == (3, 2, 16, 16)  # the valid crops at full resolution, CT + liver probability
    with torch.no_grad():
        liver = torch.sigmoid(model.liver_model(batch["image"])["seg"])
    expected = crop_probability(liver[:3], batch["crop_origin"][:3], batch["full_size"][:3], 16)
    torch.testing.assert_close(lesion_input[:, 1:], expected)
    torch.testing.assert_close(lesion_input[:, :1], batch["crop_image"][:3])
    loss.backward()
    assert all(p.grad is not None for p in model.liver_model.parameters())
    # the lesion term's gradient reaches the liver network through the probability map
    model.zero_grad()
    model.compute_losses({"liver": {"seg": model(batch["image"])["seg"].detach()}, "lesion": model.lesion_outputs(batch, model(batch["image"]))},
                         batch)["lesion_loss"].backward()
    assert model.liver_model.segmentation_head.weight.grad.abs().sum() > 0
