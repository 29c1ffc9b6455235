"""The 3D benchmarks (``python -m benchmarks --volumetric``) at toy sizes on the CPU: every figure is measured and
finite, the Lightning and plain-loop sides do the same training, and the sliding-window chain maps a prediction
back onto the volume's own slices and pixels."""

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import volumetric
from benchmarks.device_training import suite_task, lightning_seconds, plain_seconds, random_batches
from datamodules.io.cache import build_cache
from datamodules.io.preprocess import PreprocessSettings
from datamodules.io.nifti import discover
from datamodules.io.phantom import write_phantom_dataset
from lightning_modules.inference.cascade_2d import liver_mask

CROP = (16, 32, 32)  # the smallest 3D U-Net input with instance norm (an axis of 32 at least)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # as the benchmark itself runs on the CPU: a second thread waits for a busy core at every operation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("volumetric")
    step = volumetric.bench_train_step(CROP, "cpu", steps=1, warmup=1, repeats=1)
    predict = volumetric.bench_predict(work, quick=True, roi=CROP, shape=(64, 64, 12), image_size=64)
    write_phantom_dataset(work / "crop_data", volumes=1, seed=2, shape=(64, 64, 40), spacing=(1.6, 1.6, 2.5))
    entries = build_cache(discover(work / "crop_data"), work / "crop_cache", PreprocessSettings(image_size=64), workers=1, progress=False)
    crops = volumetric.bench_crop_loading(entries, samples=4, augment=False, crop=CROP, warm=1)
    augmented = volumetric.bench_crop_loading(entries, samples=2, augment=True, crop=CROP, warm=1)
    return {"device": "cpu", "threads": 1, "train_step": step, "predict": predict, "crops": crops,
            "crops_augmented": augmented, "wall_s": 1.0}


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_figure_is_measured(result, capsys):
    step = result["train_step"]
    assert {r["implementation"] for r in step["rows"]} == {"lightning", "plain", "basicunet"}
    assert all(_positive(r["slices_per_s"]) and r["size"] == CROP for r in step["rows"])
    assert _positive(step["32-true"]["lightning_vs_plain"]) and _positive(step["32-true"]["basicunet_vs_suite"])
    predict = result["predict"]
    assert predict["shape"] == "64x64x12" and predict["resampled_shape"] == [12, 64, 64]
    assert predict["mask_shape"] == [12, 64, 64]  # the original slices at the original in-plane size
    assert predict["liver_fraction"] == 1.0  # the head predicts liver everywhere: one component, kept whole
    assert all(_positive(seconds) for seconds in predict["parts"].values()) and len(predict["parts"]) == 5
    assert predict["seconds"] == pytest.approx(sum(predict["parts"].values()))
    for crops, augment in ((result["crops"], False), (result["crops_augmented"], True)):
        assert crops["augment"] is augment and crops["sample_shape"] == [1, *CROP] and _positive(crops["crops_per_s"])

    volumetric.print_report(result)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("(the whole run")
    figures = json.loads(json.dumps(volumetric.summary(result)))
    assert figures["step_crop"] == list(CROP) and figures["predict3d_volume"] == "64x64x12"
    for key in ("step3d_s_fp32", "step3d_vs_plain_loop_fp32", "basicunet3d_vs_suite_fp32", "predict3d_s_per_volume",
                "crops3d_per_s", "crops3d_augmented_per_s"):
        assert _positive(figures[key]), key
    assert "step3d_vs_plain_loop_bf16" not in figures  # bf16 is timed on an accelerator only


def test_each_configuration_keeps_its_best_repeat(monkeypatch):
    seconds = iter([3.0, 2.0, 5.0, 1.0, 4.0, 6.0])  # lightning, plain, basicunet per repeat

    def fake(device, batch_sizes, size, **kwargs):
        return [{"implementation": name, "batch": 2, "size": size, "precision": "32-true", "compiled": False,
                 "channels_last": False, "slices_per_s": 2 / next(seconds)} for name in ("lightning", "plain", "basicunet")]

    monkeypatch.setattr(volumetric, "bench_training", fake)
    step = volumetric.bench_train_step(CROP, repeats=2)
    best = {r["implementation"]: 2 / r["slices_per_s"] for r in step["rows"]}
    assert best == pytest.approx({"lightning": 1.0, "plain": 2.0, "basicunet": 5.0})
    assert step["32-true"]["lightning_vs_plain"] == pytest.approx(0.5)
    assert step["32-true"]["basicunet_vs_suite"] == pytest.approx(2.5)


def test_lightning_and_the_plain_loop_train_the_same_weights():
    batches = random_batches(3, 2, CROP, torch.device("cpu"), channels_last=False)
    task = suite_task(3)
    lightning_seconds(batches, 1, torch.device("cpu"), "32-true", False, False, task=task)
    network = suite_task(3).model
    plain_seconds(network, task.segmentation_loss, batches, 1, torch.device("cpu"), "32-true", False, False)
    initial, trained, plain = suite_task(3).model.state_dict(), task.model.state_dict(), network.state_dict()
    assert trained.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(trained[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(initial["encoder.blocks.0.0.weight"], plain["encoder.blocks.0.0.weight"])  # both trained


def test_sliding_window_chain_returns_the_volume_on_its_own_slices(tmp_path):
    # 5 mm slices: the 2.5 mm grid has 23 slices, original slice i on resampled slice 2i, so a bug in either
    # direction of the z mapping (or in the windows' blending) moves the noisy thresholded slices against
    # the reference. A pointwise "network" commutes with resampling and blending, so the chain must give the
    # mask that the cache's own 2D slices give through the same upsampling.
    write_phantom_dataset(tmp_path / "data", volumes=1, seed=3, shape=(64, 64, 12), spacing=(1.6, 1.6, 5.0))
    predict = lambda window: (window - 0.2) * 40.0  # noqa: E731 - logits of a threshold at 40 HU
    mask, parts, volume = volumetric.predict_volume(predict, tmp_path / "data", tmp_path / "work", (16, 16, 16), image_size=32)
    assert volume.full_shape == (12, 64, 64) and mask.shape == (12, 64, 64) and mask.dtype == bool
    assert np.load(next(volume.entry.glob("image3d_2.5mm.npy"))).shape == (23, 32, 32)
    image = torch.from_numpy(np.asarray(volume.image, dtype=np.float32))[:, None]
    expected = liver_mask(torch.sigmoid(predict(image)), (64, 64))
    assert 0.05 < expected.mean() < 0.95  # a mask with edges everywhere, not a trivial one
    assert np.count_nonzero(mask != expected) <= 1e-4 * mask.size
