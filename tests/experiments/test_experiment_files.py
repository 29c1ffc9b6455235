"""Every shipped experiment, stage config and study parses: each stage builds its model and data module through the CLI."""

from pathlib import Path

import pytest
import torch
import yaml

from experiments.commands.stages import load_experiment
from experiments.commands.study import load_study
from tests.experiments.test_architectures_study import VARIANTS
from tests.experiments.test_table1_setup import CASCADES, PAPER_NETWORK, network_variant

ROOT = Path(__file__).parents[2]

def _is_experiment(path: Path) -> bool:
    """An experiment or a whole `lits fit` config, not a settings file meant to be stacked on one (no class_path)."""
    spec = yaml.safe_load(path.read_text()) or {}
    return "stages" in spec or "class_path" in (spec.get("model") or {})


ALL_EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if _is_experiment(p))
# the 2D cascade's U-Net variants are built stage by stage, with their real handovers, in test_architectures_study.py
EXPERIMENTS = [p for p in ALL_EXPERIMENTS if p.stem not in VARIANTS]
BUILT: set[tuple] = set()  # stages shared by several experiments (the same configs and handovers) are built once
STUDIES = sorted((ROOT / "experiments" / "studies").glob("*.yaml"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from lightning_modules import BaselineUNet, CMUNet, CombinedLiverLesion, EncoderPretraining

    folder = tmp_path_factory.mktemp("ckpts")
    paths = {}
    modules = (("encoder", EncoderPretraining()), ("unet", BaselineUNet()), ("cmunet", CMUNet()),
               ("lesion", BaselineUNet(in_channels=5, norm="batch")), ("combined", CombinedLiverLesion(in_channels=5, norm="batch", block="residual", se=True)),
               ("unet 3d plain se=False", BaselineUNet(spatial_dims=3, norm="batch")),
               ("unet 3d residual se=True", BaselineUNet(spatial_dims=3, norm="batch", block="residual", se=True)))
    # a cascade's lesion network of each backbone variant (experiments/variants/): mining refuses another block or se
    modules += tuple((f"lesion {block} se={se}", BaselineUNet(in_channels=5, norm="batch", block=block, se=se))
                     for block in ("plain", "residual", "dense") for se in (False, True))
    for name, module in modules:
        paths[name] = str(folder / f"{name}.ckpt")
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, paths[name])
    return paths


def model_init_args(configs: list[Path]) -> dict:
    """A stage's model arguments as its stacked configs set them."""
    init_args = {}
    for config in configs:
        init_args |= (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}
    return init_args


def handover(argument: str, sources, configs: list[Path], checkpoints: dict) -> str:
    """A stand-in for the checkpoint an earlier stage would hand over."""
    init_args = model_init_args(configs)
    variant = f"{init_args.get('block', 'plain')} se={init_args.get('se', False)}"
    if init_args.get("spatial_dims", 2) == 3:  # the 3D cascade: 3D liver and lesion networks of one input channel
        return checkpoints[f"unet 3d {variant}"]
    if argument.endswith("encoder_checkpoint"):
        return checkpoints["encoder"]
    if argument.endswith("miner_checkpoints"):
        return "[" + ",".join([checkpoints["unet"]] * len(sources)) + "]"
    if any("combined" in c.name for c in configs):
        return checkpoints["combined"]
    if argument.endswith("base_checkpoint") and any("lesion" in c.name or "liver" in c.name for c in configs):
        # a cascade's liver or lesion network (2 context slices) of the stage's block and se
        return checkpoints[f"lesion {variant}"]
    return checkpoints["cmunet"] if any("cmunet" in c.name for c in configs) else checkpoints["unet"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_stage_of_every_experiment_builds(path, checkpoints, tmp_path, monkeypatch):
    from experiments.commands.cli import LitsCLI

    monkeypatch.chdir(ROOT)
    _, stages = load_experiment(path)
    for stage in stages:
        args = [x for c in stage["config"] for x in ("--config", str(c))] + list(stage.get("args", []))
        weights = dict(stage["weights"])
        if not weights and any(yaml.safe_load(c.read_text())["model"].get("class_path", "").endswith("MaskMining") for c in stage["config"]):
            weights["model.init_args.base_checkpoint"] = "base"  # a retraining config run on its own needs its base
        args += [f"--{a}={handover(a, s, stage['config'], checkpoints)}" for a, s in weights.items()]
        if tuple(args) in BUILT:
            continue
        BUILT.add(tuple(args))
        args += ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1"]
        cli = LitsCLI(args=args, run=False)
        assert cli.model.hparams.get("in_channels", 1) == 2 * cli.datamodule.hparams.context_slices + 1, stage["name"]
        if path in CASCADES:  # Table 1: the paper's network, built as its layers show, 5 input slices in 2D
            assert network_variant(cli.model.model) == PAPER_NETWORK, stage["name"]
            assert cli.model.hparams.in_channels == (5 if cli.model.hparams.spatial_dims == 2 else 1), stage["name"]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_study_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(path)
    assert study["baseline"] in study["models"] and len(study["seeds"]) >= 2


SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
RUN_FILES = [p for p in ALL_EXPERIMENTS if "stages" in (yaml.safe_load(p.read_text()) or {})]


def test_every_run_study_and_sweep_yaml_fits_its_declared_schema():
    """The schemas of experiments/commands/yaml_schema.py accept every shipped file as it is (strict types, no unknown key)."""
    from experiments.commands.yaml_schema import Experiment, Study, Sweep, read_yaml, validate

    assert RUN_FILES and STUDIES and SWEEPS
    for schema, paths in ((Experiment, RUN_FILES), (Study, STUDIES), (Sweep, SWEEPS)):
        for path in paths:
            validate(schema, read_yaml(path), path)


def test_gpu_overlay_stacks_and_keeps_the_experiment_name(monkeypatch):
    from types import SimpleNamespace

    from experiments.commands.cli import LitsCLI

    monkeypatch.chdir(ROOT)
    overlay = yaml.safe_load((ROOT / "experiments" / "gpu.yaml").read_text())
    assert overlay == {"trainer": {"accelerator": "gpu", "precision": "bf16-mixed", "benchmark": True}}
    assert not _is_experiment(ROOT / "experiments" / "gpu.yaml")
    configs = [ROOT / "experiments" / "cmunet.yaml", ROOT / "experiments" / "gpu.yaml"]
    stub = SimpleNamespace(config={"config": configs, "name": None}, _get=lambda config, key, default=None: config.get(key, default))
    assert LitsCLI._run_name(stub) == "cmunet"  # not "gpu": the run folder is named after the experiment
    stub.config["name"] = "mine"
    assert LitsCLI._run_name(stub) == "mine"
