"""The config schema of every module: the arguments LightningCLI resolves through ``**kwargs``, their defaults, and checkpoints.

Subclasses take only their own arguments and pass the shared ones to their parent through ``**kwargs``
(jsonargparse follows ``super().__init__(**kwargs)``), so these tests pin what a user sees: every
argument with the default it had when each class still repeated its parent's whole list.
"""

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

import lightning_modules
from lightning_modules import BaselineUNet, BaseTask, CMUNet, CombinedLiverLesion, CombinedMaskMining, EncoderPretraining, MaskMining, PretrainedUNet
from datamodules.errors import ConfigError

ROOT = Path(__file__).parents[2]
TINY = dict(base_channels=4)

# Each module's arguments and defaults as they were before the subclasses stopped repeating their parents'
# argument lists (captured from the old signatures, where every argument was spelled out).
BACKBONE = dict(in_channels=1, base_channels=16, norm="instance")
OPTIMISATION = dict(lr=0.01, weight_decay=0.0, scheduler="cosine_warm_restarts", restart_period=10, min_lr=0.0, step_size=30, step_gamma=0.1)
EVALUATION = dict(out_channels=1, threshold=0.5, largest_component=True, num_overlays=4)
BEFORE = {
    BaselineUNet: dict(init_checkpoint=None, **BACKBONE, **OPTIMISATION, **EVALUATION),
    PretrainedUNet: dict(**BACKBONE, **OPTIMISATION, **EVALUATION, encoder_checkpoint=None, freeze_encoder_epochs=0),
    CMUNet: dict(**BACKBONE, **OPTIMISATION, **EVALUATION, seg_weight=0.5, cls_weight=0.5, focal_alpha=0.8, focal_gamma=2.0,
                 encoder_checkpoint=None),
    EncoderPretraining: dict(**BACKBONE, **OPTIMISATION, focal_alpha=0.5, focal_gamma=2.0),
    MaskMining: dict(base_checkpoint="", loss="dice", miner_checkpoints=None, class_weights=None, distance_weights=False,
                     distance_w0=10.0, distance_sigma=5.0, cls_weight=0.0, focal_alpha=0.8, focal_gamma=2.0, in_channels=1,
                     out_channels=1, lr=1e-4, weight_decay=1e-5, scheduler="step", restart_period=10, min_lr=0.0, step_size=10,
                     step_gamma=0.5, threshold=0.5, largest_component=True, num_overlays=4),
}
# What the refactoring adds, on purpose:
# * every segmentation module chooses its segmentation loss (MaskMining already had the distance-map settings);
# * PretrainedUNet inherits BaselineUNet's init_checkpoint (a whole model to start from; its encoder_checkpoint,
#   if given, then replaces the encoder): it was already in its saved hyperparameters, now it is in its schema too;
# * MaskMining inherits the backbone's base_channels and norm: already in its saved hyperparameters, where they
#   now record the base checkpoint's architecture instead of the unused defaults.
# * every segmentation module can be a cascade's lesion network (its liver network and region settings).
# * every module chooses the backbone's variant (2D or 3D, block, squeeze-and-excitation); the defaults are the paper's.
# * every segmentation module sets the 3D evaluation's sliding window (overlap, blending).
# * every segmentation module chooses the worker processes of its per-volume metrics (null: automatic).
# * MaskMining names the unmined liver network of a cascade whose liver network was mined too.
SEG_LOSS = dict(seg_loss="dice", distance_weights=False, distance_w0=10.0, distance_sigma=5.0,
                liver_checkpoint=None, region_margin=16, region_margin_slices=2, lesion_dilation=8,
                sw_overlap=0.25, sw_mode="gaussian", metric_workers=None)
VARIANT = dict(spatial_dims=2, block="plain", se=False)
ADDED = {
    BaselineUNet: dict(**SEG_LOSS, **VARIANT),
    PretrainedUNet: dict(**SEG_LOSS, **VARIANT, init_checkpoint=None),
    CMUNet: dict(**SEG_LOSS, **VARIANT),
    EncoderPretraining: VARIANT,
    MaskMining: dict(**SEG_LOSS, **VARIANT, base_channels=16, norm="instance", base_liver_checkpoint=None),
}
EXPECTED = {cls: {**BEFORE[cls], **ADDED[cls]} for cls in BEFORE}
# Modules added since: their whole schema.
COMBINED = dict(liver_loss="dice", liver_weight=1.0, lesion_weight=1.0)
EXPECTED[CombinedLiverLesion] = {**EXPECTED[BaselineUNet], **COMBINED}
del EXPECTED[CombinedLiverLesion]["init_checkpoint"]
EXPECTED[CombinedMaskMining] = {**EXPECTED[MaskMining], **COMBINED}
MINING = (MaskMining, CombinedMaskMining)  # built from a base checkpoint


def resolved_defaults(cls) -> dict:
    """The init_args LightningCLI's model parser (subclass mode of BaseTask) resolves for ``cls``, nothing given."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(BaseTask, "model", required=True)
    config = parser.parse_args([f"--model={cls.__module__.split('.')[0]}.{cls.__name__}"])
    return dict(config.model.init_args)


def print_config(*args) -> dict:
    """``lits fit ARGS --print_config``: the model part of the printed config."""
    from experiments.commands.cli import LitsCLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_code:
        LitsCLI(args=["fit", *args, "--print_config"])
    assert exit_code.value.code in (0, None)
    return yaml.safe_load(out.getvalue())["model"]


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_every_argument_keeps_its_default(cls):
    assert resolved_defaults(cls) == EXPECTED[cls]


@pytest.mark.parametrize("cls", [BaselineUNet, PretrainedUNet, CMUNet, EncoderPretraining], ids=lambda c: c.__name__)
def test_print_config_lists_every_argument_with_its_default(cls):
    model = print_config(f"--model=lightning_modules.{cls.__name__}")
    assert model["class_path"] == f"lightning_modules.{cls.__name__}"
    assert model["init_args"] == EXPECTED[cls]


def test_print_config_of_a_mask_mining_experiment():
    # LitsCLI's default model is BaselineUNet, and jsonargparse carries a previous class's init_args over to a new
    # class_path, so `--model=...MaskMining` alone would show BaselineUNet's optimisation values: the shipped
    # MaskMining YAMLs therefore spell out the paper's lr, weight_decay and step schedule, and give exactly the
    # class's own defaults.
    model = print_config("--config", str(ROOT / "experiments" / "mask_mining_retrain_unet.yaml"))
    assert model["class_path"] == "lightning_modules.MaskMining"
    assert model["init_args"] == EXPECTED[MaskMining]


def save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save(BaselineUNet(), tmp_path_factory.mktemp("base") / "base.ckpt")


@pytest.fixture(scope="module")
def bases(base_ckpt, tmp_path_factory):
    """The base checkpoint each mining module is built from."""
    combined = save(CombinedLiverLesion(), tmp_path_factory.mktemp("combined") / "combined.ckpt")
    return {MaskMining: base_ckpt, CombinedMaskMining: combined}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_a_module_built_without_arguments_has_the_old_hyperparameters(cls, bases):
    module = cls(base_checkpoint=bases[cls]) if cls in MINING else cls()
    expected = EXPECTED[cls] | (dict(base_checkpoint=bases[cls]) if cls in MINING else {})
    assert dict(module.hparams) == expected


def test_mask_mining_keeps_the_papers_optimisation_and_takes_overrides(base_ckpt):
    module = MaskMining(base_checkpoint=base_ckpt)
    assert (module.hparams.lr, module.hparams.weight_decay, module.hparams.scheduler) == (1e-4, 1e-5, "step")
    assert (module.hparams.step_size, module.hparams.step_gamma) == (10, 0.5)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 1e-5
    changed = MaskMining(base_checkpoint=base_ckpt, lr=0.5, step_size=3, restart_period=2, threshold=0.4)
    assert (changed.hparams.lr, changed.hparams.step_size, changed.hparams.restart_period, changed.hparams.threshold) == (0.5, 3, 2, 0.4)
    assert changed.hparams.weight_decay == 1e-5


def test_mask_mining_records_the_base_architecture(tmp_path):
    # a batch-norm base: the next round reads its norm from this round's hyperparameters
    base = save(BaselineUNet(base_channels=4, norm="batch"), tmp_path / "batch.ckpt")
    first = MaskMining(base_checkpoint=base)
    assert (first.hparams.base_channels, first.hparams.norm) == (4, "batch")
    second = MaskMining(base_checkpoint=save(first, tmp_path / "round1.ckpt"))
    assert second.base_architecture.norm == "batch" and second.base_architecture.has_error_head


def test_scheduler_is_checked():
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        BaselineUNet(scheduler="linear", **TINY)


# -- checkpoint round trip -------------------------------------------------------------------------------------
def write_checkpoint(module, path):
    """A Lightning checkpoint of ``module`` as ``Trainer.save_checkpoint`` writes one (weights and hyperparameters)."""
    import pytorch_lightning as pl

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


@pytest.mark.parametrize("cls, extra", [
    (BaselineUNet, dict(lr=0.002, seg_loss="pwce_over_dice", distance_weights=True, distance_sigma=3.0)),
    (PretrainedUNet, dict(freeze_encoder_epochs=2, seg_loss="pwce")),
    (CMUNet, dict(seg_weight=0.3, seg_loss="pwce", weight_decay=0.1)),
    (EncoderPretraining, dict(focal_alpha=0.7, scheduler="step", step_size=3)),
    (MaskMining, dict(loss="pwce", class_weights=[1.0, 2.0, 3.0, 4.0], distance_weights=True, step_gamma=0.2)),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_load_from_checkpoint_rebuilds_every_module(cls, extra, tmp_path, base_ckpt):
    torch.manual_seed(0)
    module = cls(base_checkpoint=base_ckpt, **extra) if cls is MaskMining else cls(**TINY, **extra)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))  # weights that only the checkpoint can give back
    torch.manual_seed(1)
    restored = cls.load_from_checkpoint(write_checkpoint(module, tmp_path / "module.ckpt"))
    assert dict(restored.hparams) == dict(module.hparams)
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys() and all(torch.equal(state[k], restored_state[k]) for k in state)


def test_every_exported_module_is_covered():
    tasks = {getattr(lightning_modules, name) for name in lightning_modules.__all__}
    concrete = {t for t in tasks if isinstance(t, type) and issubclass(t, BaseTask)} - {BaseTask, lightning_modules.SegmentationTask}
    assert concrete == set(EXPECTED)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_every_argument_has_its_help(cls):
    from jsonargparse._parameter_resolvers import get_signature_parameters

    undocumented = [p.name for p in get_signature_parameters(cls, "__init__") if not p.doc]
    assert undocumented == []


# CombinedMaskMining's CLI-built checkpoint is rebuilt by tests/experiments/test_combined_mining_run.py (lits predict).
@pytest.mark.parametrize("cls", [c for c in EXPECTED if c is not CombinedMaskMining], ids=lambda c: c.__name__)
def test_load_from_checkpoint_of_a_module_built_by_the_cli(cls, tmp_path):
    # LightningCLI saves the resolved config as the hyperparameters and rebuilds the module through jsonargparse
    from experiments.commands.cli import LitsCLI

    base = tmp_path / "batch.ckpt"
    save(BaselineUNet(base_channels=4, norm="batch"), base)
    if cls is MaskMining:
        args = ["--config", str(ROOT / "experiments" / "mask_mining_retrain_unet.yaml"), f"--model.init_args.base_checkpoint={base}"]
    else:
        args = [f"--model=lightning_modules.{cls.__name__}", "--model.init_args.base_channels=4", "--model.init_args.lr=0.02"]
    module = LitsCLI(args=[*args, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], run=False).model
    assert type(module) is cls and module.hparams["_class_path"] == f"lightning_modules.{cls.__name__}"
    expected = EXPECTED[cls] | (dict(base_checkpoint=str(base), base_channels=4, norm="batch") if cls is MaskMining else dict(base_channels=4, lr=0.02))
    assert {k: v for k, v in module.hparams.items() if not k.startswith("_")} == expected
    restored = cls.load_from_checkpoint(write_checkpoint(module, tmp_path / "module.ckpt"))
    assert dict(restored.hparams) == expected
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys() and all(torch.equal(state[k], restored_state[k]) for k in state)
