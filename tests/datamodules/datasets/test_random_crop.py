"""The 2D liver network's random crops (the mask-mining paper's section 3.3: random 256x256 crops of the 512x512
slices, batch 12; evaluation on whole slices): ``--data.random_crop``, and the Table 1 liver stages that use it."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules import LiTSDataModule
from datamodules.errors import ConfigError
from tests.synthetic import fitted_datamodule

ROOT = Path(__file__).parents[3]


def datamodule(root, tmp_path, **kwargs) -> LiTSDataModule:
    options = dict(split=[4, 1, 1], image_size=32, batch_size=12, context_slices=1, augmentation={"enabled": False},
                   preprocess_workers=1)
    return fitted_datamodule(root, tmp_path, **(options | kwargs))


def test_training_samples_random_crops_while_evaluation_sees_whole_slices(tiny_lits, tmp_path):
    module = datamodule(tiny_lits, tmp_path, random_crop=16)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (12, 3, 16, 16) and batch["mask"].shape == (12, 1, 16, 16)
    assert next(iter(module.val_dataloader()))["image"].shape[-2:] == (32, 32)
    dataset = module.datasets["train"]
    torch.manual_seed(0)
    origins = set()
    for _ in range(40):
        sample = dataset[5]
        volume, z = dataset.volumes[dataset.index[5][0]], int(sample["slice_index"])
        whole = np.asarray(volume.image[z - 1 : z + 2], dtype=np.float32)
        labels = np.asarray(volume.label[z]) >= 1
        # the crop's image and mask are the same window of the whole slice
        (y0, x0), = {(y, x) for y in range(17) for x in range(17) if np.array_equal(whole[:, y : y + 16, x : x + 16], sample["image"].numpy())
                     and np.array_equal(labels[y : y + 16, x : x + 16], sample["mask"][0].numpy() > 0.5)} or {(None, None)}
        assert y0 is not None
        origins.add((y0, x0))
    assert len(origins) > 10  # drawn anew at every read, anywhere in the slice


@pytest.mark.parametrize("settings, message", [
    (dict(random_crop=24), "multiple of 16"),
    (dict(random_crop=48), "no larger than --data.image_size=32"),
    (dict(random_crop=16, sampling="liver_roi"), "--data.random_crop crops the whole 2D slices"),
    (dict(random_crop=16, spatial_dims=3), "--data.random_crop crops the whole 2D slices"),
])
def test_bad_random_crops_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        LiTSDataModule(image_size=32, **settings)
    assert "\n" not in str(error.value)


def stacked_data(*configs: str) -> dict:
    data = {}
    for config in configs:
        data |= yaml.safe_load((ROOT / "experiments" / config).read_text()).get("data") or {}
    return data


@pytest.mark.parametrize("config", ["cascade_liver_2d.yaml", "mask_mining_retrain_liver.yaml"])
def test_the_table1_liver_networks_train_on_256_crops_of_whole_512_slices_batch_12(config):
    data = stacked_data(config)
    assert (data["image_size"], data["random_crop"], data["batch_size"]) == (512, 256, 12)
    assert data.get("sampling", "slices") == "slices" and data["context_slices"] == 2
    # the quickstart's CPU overlay trains on its whole 64x64 slices, and says why
    quick = stacked_data(config, "cascade_2d_quickstart_cpu.yaml")
    assert quick["random_crop"] is None and quick["image_size"] == 64
    assert "random_crop: null" in (ROOT / "experiments" / "cascade_2d_quickstart_cpu.yaml").read_text()
