"""The mask-mining paper's Table 1 setups as the YAMLs configure them: the paper's network in every stage (residual
blocks with squeeze-and-excitation, batch norm, 5 input slices in 2D), its liver and lesion losses, and both networks
of each cascade mined (the liver network first, then the lesion network in the mined liver's region). The networks the
stages build through the CLI are checked layer by layer in test_experiment_files.py (``network_variant``)."""

from pathlib import Path

import pytest
import yaml
from monai.networks.blocks import ChannelSELayer
from monai.networks.blocks.denseblock import ConvDenseBlock
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

from experiments.commands.stages import load_experiment
from experiments.commands.study import load_study

ROOT = Path(__file__).parents[2]
PAPER_NETWORK = ("residual", True, "batch")
CASCADES = [ROOT / "experiments" / f"mask_mining_cascade_{dims}_{loss}.yaml" for dims in ("2d", "3d") for loss in ("dice", "pwce")]


def network_variant(network: nn.Module) -> tuple[str, bool, str]:
    """(block, se, norm) of a U-Net read off the layers it was built from, not off the arguments it was given."""
    first = network.encoder.blocks[0]
    block = first[0] if isinstance(first, nn.Sequential) and isinstance(first[-1], ChannelSELayer) else first
    kind = "residual" if isinstance(block, UnetResBlock) else "dense" if isinstance(block[0], ConvDenseBlock) else "plain"
    norms = {"batch" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "instance" for m in network.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))}
    assert len(norms) == 1, norms
    return kind, any(isinstance(m, ChannelSELayer) for m in network.modules()), norms.pop()


def stacked(configs, key: str) -> dict:
    values = {}
    for config in configs:
        section = yaml.safe_load(Path(config).read_text()).get(key) or {}
        if key == "model":
            values |= {"class_path": section["class_path"]} if "class_path" in section else {}
            section = section.get("init_args") or {}
        values |= section
    return values


def test_the_table1_study_runs_the_cascades_checked_here(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "experiments" / "studies" / "mask_mining_table1.yaml")
    assert {Path(p).resolve() for label, p in study["models"].items() if not label.startswith("Cmb")} == set(CASCADES)


@pytest.mark.parametrize("path", CASCADES, ids=lambda p: p.stem)
def test_every_stage_of_a_table1_cascade_is_the_papers_network(path):
    _, stages = load_experiment(path)
    for stage in stages:
        model, data = stacked(stage["config"], "model"), stacked(stage["config"], "data")
        assert (model["block"], model["se"]) == PAPER_NETWORK[:2], stage["name"]
        if "class_path" in model and model["class_path"].endswith("BaselineUNet"):  # a mined network takes its base's norm
            assert model["norm"] == "batch", stage["name"]
        if "_2d_" in path.name:
            assert model["in_channels"] == 5 and data["context_slices"] == 2, stage["name"]
        else:
            assert model["spatial_dims"] == data["spatial_dims"] == 3, stage["name"]


@pytest.mark.parametrize("path", CASCADES, ids=lambda p: p.stem)
def test_the_papers_liver_and_lesion_losses(path):
    _, stages = load_experiment(path)
    liver, lesion = (stacked(stages[i]["config"], "model") for i in (0, 1))
    # the liver: pwce with the distance-transform weight maps, in 3D too; lesions: that pwce over a smooth Dice
    assert (liver["seg_loss"], liver["distance_weights"]) == ("pwce", True)
    assert (lesion["seg_loss"], lesion["distance_weights"]) == ("pwce_over_dice", True)


@pytest.mark.parametrize("path", CASCADES, ids=lambda p: p.stem)
def test_a_cascade_mines_its_liver_network_then_its_lesion_network_in_the_mined_liver(path):
    _, stages = load_experiment(path)
    assert [s["name"] for s in stages] == ["liver", "lesion", "mine_liver", "mine"]
    liver, lesion, mine_liver, mine = stages
    assert mine_liver["weights"] == {"model.init_args.base_checkpoint": "liver"}
    assert stacked(mine_liver["config"], "data")["target"] == "liver"
    assert stacked(mine_liver["config"], "model")["class_path"] == "lightning_modules.MaskMining"
    # the lesion network is mined in the cascade of the mined liver network; "before" runs the unmined one
    assert mine["weights"] == {"model.init_args.base_checkpoint": "lesion", "model.init_args.liver_checkpoint": "mine_liver",
                               "model.init_args.base_liver_checkpoint": "liver"}
    assert stacked(mine["config"], "data")["target"] == "lesion"
    assert mine_liver["args"] == mine["args"] and f"--model.init_args.loss={path.stem.rsplit('_', 1)[1]}" in mine["args"]
    # the two liver networks see the same data: the cascade hands the mined one over in the lesion network's place
    for key in ("image_size", "hu_window"):
        assert stacked(mine_liver["config"], "data")[key] == stacked(liver["config"], "data")[key] == stacked(mine["config"], "data")[key]
