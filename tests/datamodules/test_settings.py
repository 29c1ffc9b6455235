"""The data module's grouped settings: nested config, plain hyperparameters, and checkpoints of either layout."""

import io

import pytest
import torch
from jsonargparse import ArgumentParser

from datamodules import LiTSDataModule
from datamodules.settings import FLAT_NAMES, SETTING_GROUPS, Augmentation, LiverRoi, Volume3D, data_setting, grouped_data_config


def parse(*args):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LiTSDataModule, "data")
    parser.add_argument("--config", action="config")
    return parser.instantiate_classes(parser.parse_args(list(args))).data


def test_groups_are_nested_config_with_the_old_defaults(tmp_path):
    data = parse()
    assert data.augmentation == Augmentation(True, "sample", 0.5, 15.0, (0.9, 1.1), 0.5)
    assert data.liver_roi == LiverRoi(256, 16, "truth", 64, 4) and data.volume_3d == Volume3D([64, 128, 128], 16, 1)
    assert (data.phantom.volumes, data.phantom.seed, tuple(data.phantom.shape), tuple(data.phantom.spacing)) == (17, 0, (192, 192, 48), (2.0, 2.0, 5.0))
    (tmp_path / "a.yaml").write_text("data:\n  augmentation:\n    prob: 0.9\n  volume_3d:\n    crop_margin: 8\n")
    (tmp_path / "b.yaml").write_text("data:\n  augmentation:\n    applied_to: batch\n  volume_3d:\n    crop_size: [16, 32, 32]\n")
    data = parse(f"--config={tmp_path / 'a.yaml'}", f"--config={tmp_path / 'b.yaml'}", "--data.augmentation.flip_prob=0.3")
    assert data.augmentation == Augmentation(applied_to="batch", flip_prob=0.3, prob=0.9)  # stacked configs merge within a group
    assert data.volume_3d == Volume3D([16, 32, 32], crop_margin=8)
    assert data.batch_augmentation is not None and data.batch_augmentation.flip_prob == 0.3


def test_hyperparameters_are_plain_and_load_with_weights_only():
    data = LiTSDataModule(augmentation={"flip_prob": 0.2}, liver_roi=LiverRoi(crop_size=64), phantom={"volumes": 3})
    assert data.augmentation.flip_prob == 0.2 and data.liver_roi.crop_size == 64 and data.phantom.volumes == 3
    assert data.hparams.augmentation["flip_prob"] == 0.2 and data.hparams.liver_roi["crop_size"] == 64
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": dict(data.hparams)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]
    assert LiTSDataModule(**saved).hparams == data.hparams  # a checkpoint's hyperparameters rebuild the data module


def test_data_setting_reads_grouped_and_flat_checkpoints():
    grouped = dict(LiTSDataModule(volume_3d={"crop_size": [16, 32, 32]}, liver_roi={"roi_from": "prediction"}).hparams)
    flat = {"image_size": 64, "crop_size_3d": [16, 32, 32], "roi_from": "prediction", "crop_margin": 8}
    for saved in (grouped, flat):
        assert data_setting(saved, "volume_3d.crop_size") == [16, 32, 32]
        assert data_setting(saved, "liver_roi.roi_from") == "prediction"
    assert data_setting(flat, "image_size") == 64 and data_setting(grouped, "image_size") == 256
    assert data_setting(flat, "liver_roi.crop_margin") == data_setting(flat, "volume_3d.crop_margin") == 8
    assert data_setting({}, "augmentation.prob", 0.5) == 0.5 and data_setting({"target": "liver"}, "volume_3d.crop_size") is None


def test_every_grouped_setting_has_its_flat_name():
    grouped = {f"{group}.{name}" for group, cls in SETTING_GROUPS.items() for name in cls.__dataclass_fields__}
    added_after_grouping = {"augmentation.intensity_shift", "augmentation.intensity_scale"}  # no flat checkpoint has them
    assert grouped - added_after_grouping == set(FLAT_NAMES)


@pytest.mark.parametrize("group", list(SETTING_GROUPS))
def test_an_unknown_setting_in_a_group_is_refused(group):
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_setting'"):
        LiTSDataModule(**{group: {"no_such_setting": 1}})


def test_a_flat_config_of_an_old_run_folder_is_grouped():
    flat = {"root": "data", "augment": False, "augment_on": "batch", "phantom_volumes": 3, "crop_size": 64, "crop_margin": 8,
            "crop_size_3d": [16, 32, 32], "image_size": 32}
    grouped = grouped_data_config(flat)
    assert grouped == {"root": "data", "image_size": 32, "augmentation": {"enabled": False, "applied_to": "batch"},
                       "phantom": {"volumes": 3}, "liver_roi": {"crop_size": 64, "crop_margin": 8},
                       "volume_3d": {"crop_size": [16, 32, 32], "crop_margin": 8}}
    data = LiTSDataModule(**grouped)
    assert data.liver_roi.crop_margin == data.volume_3d.crop_margin == 8 and data.batch_augmentation is None
    assert grouped_data_config(dict(data.hparams)) == dict(data.hparams)
