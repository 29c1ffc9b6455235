"""The U-Net variants of the mined 2D cascade (experiments/variants/, experiments/mask_mining_cascade_2d_dice_*.yaml),
their study (experiments/studies/mask_mining_architectures.yaml) and the table's gain from mining. No training: each
chain's stages are built through the CLI as `lits run` assembles them, one stage's untrained weights handed to the next."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.blocks import ChannelSELayer
from monai.networks.blocks.denseblock import ConvDenseBlock
from monai.networks.blocks.dynunet_block import UnetResBlock
from scipy import stats
from torch import nn

from experiments.commands import study as study_module
from experiments.commands.stages import load_experiment, stage_command
from experiments.commands.study import load_study, report
from experiments.commands.study_tables import LITS_LIVER_LESION, before_and_after, markdown_table, summarize

ROOT = Path(__file__).parents[2]
TABLE1 = "mask_mining_cascade_2d_dice"
# experiment -> (block, se, norm) of every network of its chain; the first is the paper's 2D cascade (Table 1)
VARIANTS = {
    TABLE1: ("residual", True, "batch"),
    f"{TABLE1}_plain": ("plain", False, "batch"),
    f"{TABLE1}_residual": ("residual", False, "batch"),
    f"{TABLE1}_dense": ("dense", False, "batch"),
    f"{TABLE1}_se": ("plain", True, "batch"),
    f"{TABLE1}_instance_norm": ("residual", True, "instance"),
}
STUDY = ROOT / "experiments" / "studies" / "mask_mining_architectures.yaml"


def built_variant(network: nn.Module) -> tuple[str, bool, str]:
    """(block, se, norm) read off the layers the U-Net was built from, not off the arguments it was given."""
    first = network.encoder.blocks[0]
    block = first[0] if isinstance(first, nn.Sequential) and isinstance(first[-1], ChannelSELayer) else first
    kind = "residual" if isinstance(block, UnetResBlock) else "dense" if isinstance(block[0], ConvDenseBlock) else "plain"
    norms = {type(m) for m in network.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d))}
    assert len(norms) == 1, norms
    return kind, any(isinstance(m, ChannelSELayer) for m in network.modules()), "batch" if norms == {nn.BatchNorm2d} else "instance"


@pytest.mark.parametrize("name", VARIANTS)
def test_every_stage_of_a_variant_chain_builds_its_variant(name, tmp_path, monkeypatch):
    """Liver, lesion and both mining stages as `lits run` starts them; the mined bases are the liver and lesion stages'
    networks, so a mining stage without the chain's variant fails here as on LiTS (MaskMining refuses another block or
    se)."""
    from experiments.commands.cli import LitsCLI
    from lightning_modules import MaskMining

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["lits"])  # LightningCLI warns about pytest's own arguments beside args=
    _, stages = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    assert [s["name"] for s in stages] == ["liver", "lesion", "mine_liver", "mine"]
    # narrow networks: the variant is in the layers' kinds, not their width
    overrides = ["--model.init_args.base_channels=4", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.accelerator=cpu", "--trainer.devices=1"]
    handed_over = {}
    for stage in stages:
        command = stage_command(stage, tmp_path / stage["name"], tmp_path, overrides, handed_over)
        assert command[0] == "fit"
        cli = LitsCLI(args=command[1:], run=False)
        module = cli.model
        assert module.hparams.in_channels == 2 * cli.datamodule.hparams.context_slices + 1 == 5, stage["name"]
        assert built_variant(module.model) == VARIANTS[name], stage["name"]
        assert (module.hparams.block, module.hparams.se, module.hparams.norm) == VARIANTS[name], stage["name"]
        path = tmp_path / f"{stage['name']}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        handed_over[stage["name"]] = str(path)
    assert isinstance(module, MaskMining) and module.hparams.loss == "dice" and module.model.error_head is not None


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != TABLE1])
def test_a_variant_chain_is_the_table1_chain_with_its_overlays_stacked_on_every_stage(name):
    _, plain = load_experiment(ROOT / "experiments" / f"{TABLE1}.yaml")
    _, variant = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    overlays = variant[0]["config"][1:]
    assert overlays and all(c.parent.name == "variants" for c in overlays)
    for ours, theirs in zip(variant, plain, strict=True):
        assert ours["config"] == theirs["config"] + overlays, ours["name"]
        assert (ours["weights"], ours.get("args")) == (theirs["weights"], theirs.get("args")), ours["name"]


def test_variant_overlays_set_one_backbone_argument_and_nothing_else():
    overlays = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "experiments" / "variants").glob("*.yaml")}
    assert overlays == {"residual": {"model": {"init_args": {"block": "residual"}}},
                        "dense": {"model": {"init_args": {"block": "dense"}}},
                        "plain": {"model": {"init_args": {"block": "plain"}}},
                        "se": {"model": {"init_args": {"se": True}}},
                        "no_se": {"model": {"init_args": {"se": False}}},
                        "instance_norm": {"model": {"init_args": {"norm": "instance"}}}}


def test_the_study_runs_every_variant_chain_for_three_paired_seeds(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(STUDY)
    assert {path.stem for path in study["models"].values()} == set(VARIANTS)
    shipped = {p.stem for p in (ROOT / "experiments").glob(f"{TABLE1}_*.yaml")}
    assert shipped <= set(VARIANTS)  # a new variant file is a row of the study too
    assert study["models"]["residual + SE"].stem == TABLE1 and study["baseline"] == "residual + SE"
    assert (study["table"], study["inc"], study["seeds"], study["rows"]) == ("lits_liver_lesion", True, [0, 1, 2], {m: m for m in study["models"]})


# -- mining's gain: after minus before per seed, on hand-made figures ----------------------------------------------
# per seed: the lesion Dice (val, test) before and after mining; seed 2 has no test split figures
BEFORE = {"val": [0.50, 0.60, 0.55], "test": [0.40, 0.52, None]}
AFTER = {"val": [0.56, 0.61, 0.60], "test": [0.47, 0.50, None]}


def mined_runs(shift: float = 0.0) -> dict[int, dict]:
    runs = {}
    for seed in range(3):
        figures = {}
        for split in ("val", "test"):
            if BEFORE[split][seed] is not None:
                figures |= {f"{split}/liver/dice": 0.9, f"{split}/before/liver/dice": 0.9,
                            f"{split}/before/lesion/dice": BEFORE[split][seed] + shift, f"{split}/lesion/dice": AFTER[split][seed] + shift}
        runs[seed] = figures
    return runs


def test_mining_gain_is_the_mean_and_std_of_the_paired_differences():
    expanded, references = before_and_after({"plain": mined_runs(), "dense": mined_runs(0.1)}, LITS_LIVER_LESION)
    rows = {row["model"]: row for row in summarize(expanded, "plain", references, LITS_LIVER_LESION)}
    for label in ("plain", "dense"):
        gain = rows[f"{label} Inc."]
        assert gain["reference"] == label and "reference" not in rows[label]
        # val: differences 0.06, 0.01, 0.05; test: 0.07, -0.02 (seed 2 has no test figures)
        assert gain["Lesion Dice (val) difference mean"] == pytest.approx(0.04)
        assert gain["Lesion Dice (val) difference std"] == pytest.approx(math.sqrt(0.0007))
        assert gain["Lesion Dice (test) difference mean"] == pytest.approx(0.025)
        assert gain["Lesion Dice (test) difference std"] == pytest.approx(math.sqrt(0.00405))
        assert gain["Liver Dice (val) difference mean"] == 0.0 and gain["Liver Dice (val) difference std"] == 0.0
        assert math.isnan(gain["Lesion Dice (train) difference mean"])
    table = markdown_table(list(rows.values()), "plain", inc=True, metrics=LITS_LIVER_LESION)
    val_p = stats.ttest_rel(AFTER["val"], BEFORE["val"]).pvalue
    test_p = stats.ttest_rel(AFTER["test"][:2], BEFORE["test"][:2]).pvalue
    gain_table = table.split("against the same model before mask mining (Inc.: after).\n\n")[1]
    assert gain_table.splitlines()[0] == "| Model | runs | " + " | ".join(LITS_LIVER_LESION) + " |"
    assert (f"| plain | 3 | n/a | n/a | +0.0000 ± 0.0000 (p=nan t, nan W) | +0.0400 ± 0.0265 (p={val_p:.3g} t, 0.25 W) "
            f"| +0.0000 ± 0.0000 (p=nan t, nan W) | +0.0250 ± 0.0636 (p={test_p:.3g} t, 1 W) |") in gain_table.splitlines()
    assert [line.split(" | ")[0] for line in gain_table.splitlines()[2:4]] == ["| plain", "| dense"]
    assert gain_table.splitlines()[-1].startswith("Mining's gain: after (Inc.) minus before, per seed")
    assert "Mining's gain" not in markdown_table(list(rows.values()), "plain", metrics=LITS_LIVER_LESION)


def test_the_study_report_has_a_gain_row_per_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(study_module, "log_to_wandb", lambda *a, **k: None)
    study = load_study(STUDY)
    results = {label: mined_runs(0.01 * i) for i, label in enumerate(study["models"])}
    report(study, tmp_path, results, [])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["model"] for row in rows] == [name for label in study["models"] for name in (label, f"{label} Inc.")]
    gains = (tmp_path / "results.md").read_text().split("\n\n")[2].splitlines()[2:]
    assert [line.split(" | ")[0][2:] for line in gains] == list(study["models"])
    assert all("+0.0400 ± 0.0265" in line for line in gains)  # every variant got the same gain, shifted figures
