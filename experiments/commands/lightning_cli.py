"""The ``lits`` command's training side: LightningCLI over the suite's modules and the LiTS DataModule.

``lits fit|validate|test|preprocess`` (``LitsCLI``) run here; ``experiments/commands/cli.py``
is the entry point, which imports this module (torch, Lightning, MONAI, W&B: ~6 s on a 2-core CPU) only for
these commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from datamodules import LiTSDataModule
from datamodules.errors import ConfigError
from datamodules.io.atomic import write_json_atomically
from experiments.commands.console import HistoryCSVLogger, quiet_library_noise, wandb_offline_hint
from experiments.commands.names import check_name, inside
from experiments.commands.wandb_mode import configure_wandb_mode
from lightning_modules import BaseTask
from lightning_modules.callbacks.random_state import RandomStateCheckpoint
from lightning_modules.networks.checkpoints import read_task_checkpoint

RUN_VERSION_ENV = "LITS_RUN_VERSION"  # shared with DDP worker processes, which inherit the environment
CHECKPOINT_KEYWORDS = ("best", "last", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


class LitsTrainer(pl.Trainer):
    def preprocess(self, model: pl.LightningModule, datamodule: LiTSDataModule) -> None:
        """Check the data and build the preprocessing cache, without training."""
        datamodule.prepare(check_split=False)
        print(f"cache ready: {datamodule.data_root} -> {datamodule.entries_dir}")


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


class EpochHistory(pl.Callback):
    """Appends each validation epoch's figures to ``history.jsonl`` in the run folder, flushed at once.

    The CSV logger buffers 100 steps; this file is what a watcher (``lits sweep``'s early termination)
    reads while the run goes on, and what survives a kill.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        folder = trainer.log_dir  # a collective call under DDP (a broadcast): every rank makes it
        if not trainer.is_global_zero or not folder:
            return
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        with open(Path(folder) / "history.jsonl", "a") as handle:
            handle.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step, **figures}) + "\n")


class ConfigToLoggers(SaveConfigCallback):
    """Saves config.yaml in the run folder and sends the whole resolved config to W&B."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.clone().as_dict(), allow_val_change=True)


def _next_version(folder: Path) -> str:
    existing = [int(p.name.split("_")[1]) for p in folder.glob("version_*") if p.name.split("_")[1].isdigit()]
    return f"version_{max(existing, default=-1) + 1}"


class LitsCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        # The subcommand asked for (`lits fit ...`): only its parser gets the Trainer's, the model's and the data's
        # arguments. Each full subcommand parser costs a quarter of a second to build, paid by every stage of a run.
        words = sys.argv[1:] if args is None else args
        self._requested = next((w for w in words if w in self.subcommands()), None) if isinstance(words, list) else None
        super().__init__(
            BaseTask,
            LiTSDataModule,
            trainer_class=LitsTrainer,
            subclass_mode_model=True,
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            parser_kwargs={"description": "Liver segmentation experiments (CMU-Net, mask mining). Also: `lits synth`, `lits run`, `lits study`, `lits sweep`, `lits predict`, `lits evaluate` (each with --help)."},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no --weights_only: a checkpoint is data, read with weights_only=True (fit, validate and test below)
        commands = {k: v | {"weights_only"} for k, v in LightningCLI.subcommands().items() if k != "predict"}
        return {**commands, "preprocess": {"model", "datamodule"}}

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        if self._requested is None or subcommand == self._requested:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        self._subcommand_method_arguments[subcommand] = []
        return self.init_parser(**kwargs)  # listed by --help, never parsed in this process

    # -- --ckpt_path: read as data only ------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        """Parses the command line, then checks that ``--ckpt_path`` is a checkpoint of the suite's tasks: Lightning
        reads its hyperparameters next, and a foreign file gets one line here instead of torch's paragraph."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in CHECKPOINT_KEYWORDS:
            read_task_checkpoint(str(ckpt_path))

    def fit(self, **kwargs) -> None:
        self.trainer.fit(**kwargs, weights_only=True)

    def validate(self, **kwargs) -> None:
        self.trainer.validate(**kwargs, weights_only=True)

    def test(self, **kwargs) -> None:
        self.trainer.test(**kwargs, weights_only=True)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=Optional[str], default=None, help="Run name (default: the last --config file's name)")
        parser.add_argument("--wandb_project", type=str, default="lits-suite", help="W&B project")
        parser.add_argument("--run_dir", type=Optional[str], default=None, help="Exact run folder (default: <default_root_dir>/<name>/version_<n>)")
        parser.add_argument("--checkpoint_every_n_steps", type=Optional[int], default=None,
                            help="Also write last.ckpt every N training steps, for epochs that take hours (default: at epoch ends only); best.ckpt stays the best validation epoch")
        parser.set_defaults({"model": {"class_path": "lightning_modules.BaselineUNet"}})

    # -- run folder and loggers ------------------------------------------------------------------
    def _run_name(self) -> str:
        # the last experiment file's name: overlays stacked after it (gpu.yaml, *_cpu.yaml, variants/*.yaml) name no model class
        config = [Path(str(c)) for c in self._get(self.config, "config") or []]
        experiments = [c for c in config if "class_path" in ((_read_yaml(c) or {}).get("model") or {})] or config
        name = self._get(self.config, "name")
        return check_name(name, "--name") if name is not None else (experiments[-1].stem if experiments else "lits")

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        metric, mode = self.model.monitor
        every = self._get(self.config, "checkpoint_every_n_steps")
        if every is not None and every < 1:
            raise ConfigError(f"--checkpoint_every_n_steps must be a whole number of training steps, 1 or more; got {every}")
        # With step checkpoints two callbacks write last.ckpt: neither may take the other's file for a stale one and
        # write last-v1.ckpt instead (Lightning's version counter)
        versions = every is None
        self.trainer_defaults["callbacks"] = [
            ModelCheckpoint(monitor=metric, mode=mode, save_last=True, filename="best", auto_insert_metric_name=False,
                            enable_version_counter=versions),
            RandomStateCheckpoint(),  # a resumed run draws what the uninterrupted one would have
        ]
        if every is not None:  # after the best one, which stays the trainer's checkpoint_callback (after_fit reads it)
            self.trainer_defaults["callbacks"].append(
                ModelCheckpoint(every_n_train_steps=every, save_top_k=0, save_last=True, enable_version_counter=False))
        if self.subcommand == "preprocess":
            kwargs["logger"] = False  # nothing to log, and no run folder
        elif trainer_config.get("logger") in (None, True):
            name = self._run_name()
            run_dir = self._get(self.config, "run_dir")
            if run_dir:  # a fixed folder, e.g. a stage of `lits run`, which resumes in place
                csv_logger, title = HistoryCSVLogger(run_dir, name="", version=""), str(run_dir)
            else:
                root = Path(trainer_config.get("default_root_dir") or "runs")
                inside(root, root / name, f"run folder of --name={name}")
                version = os.environ.setdefault(RUN_VERSION_ENV, _next_version(root / name))
                csv_logger, title = HistoryCSVLogger(root, name=name, version=version), f"{name}/{version}"
            wandb_logger = WandbLogger(
                project=self._get(self.config, "wandb_project"),
                name=title,
                group=name,
                save_dir=csv_logger.log_dir,
                log_model=False,
            )
            # Lightning passes `anonymous=None`, which W&B >= 0.19 warns about on every run
            getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
            kwargs["logger"] = [csv_logger, wandb_logger]
            self.trainer_defaults["callbacks"] += [LearningRateMonitor(), EpochHistory()]
            if rank_zero_only.rank == 0:  # the global rank (torchrun's RANK, SLURM's SLURM_PROCID): on several nodes the
                # others chose their version before rank 0 made its folder; their folder would be an empty stray
                Path(csv_logger.log_dir).mkdir(parents=True, exist_ok=True)
        return super().instantiate_trainer(**kwargs)

    # -- checks and data before any work ---------------------------------------------------------
    def _check_and_prepare(self) -> None:
        data = self.datamodule.hparams
        model = self.model.hparams
        for key in ("batch_size", "eval_batch_size"):
            if data.get(key) is not None and data[key] < 1:
                raise ConfigError(f"--data.{key} must be 1 or more (samples per step); got {data[key]}")
        expected_in = 2 * data.context_slices + 1
        if "in_channels" in model and model.in_channels != expected_in:
            raise ConfigError(f"--model.init_args.in_channels={model.in_channels} but --data.context_slices={data.context_slices} gives {expected_in} input channels; make them agree")
        model_dims, data_dims = model.get("spatial_dims", 2), data.get("spatial_dims", 2)
        if model_dims != data_dims:
            raise ConfigError(f"--model.init_args.spatial_dims={model_dims} but --data.spatial_dims={data_dims}; "
                              f"a {model_dims}D network needs {'volumes' if model_dims == 3 else 'slices'}: set both to the same value")
        if data_dims == 3 and not getattr(type(self.model), "supports_3d", True):  # the task class says whether it takes volumes
            from lightning_modules import volumetric_tasks

            raise ConfigError(f"--data.spatial_dims=3: {type(self.model).__name__} is 2D only for now (its slice-level design is the paper's); "
                            f"use --data.spatial_dims=2, or in 3D one of {', '.join(volumetric_tasks())}")
        out_channels = getattr(self.model, "output_channels", None)
        if out_channels is not None and out_channels < self.datamodule.num_target_channels:
            raise ConfigError(f"--model.init_args.out_channels={out_channels} is too few for --data.target={data.target}; set it to {self.datamodule.num_target_channels}")
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # DDP workers find the cache ready
            self.datamodule.prepare_data()

    before_fit = before_validate = before_test = _check_and_prepare

    # -- final figures ---------------------------------------------------------------------------
    def _write_metrics(self, results: dict, **extra) -> None:
        folder = Path(self.trainer.log_dir)  # a collective call in DDP: every rank makes it
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        figures = {k: float(v) for k, v in sorted(results.items())}
        extra |= {"world_size": self.trainer.world_size}
        write_json_atomically(folder / "metrics.json", {**figures, **extra})  # a kill leaves none: the stage counts as not done
        print(f"\nFinal figures -> {folder / 'metrics.json'}")
        for key, value in figures.items():
            print(f"  {key:24s} {value:.4f}")
        hint = wandb_offline_hint(folder)
        if hint:
            print(hint)

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path or None
        best = str(Path(best).resolve()) if best else None
        results = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        if self.datamodule.splits.get("test"):
            results |= self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        self._write_metrics(results, best_checkpoint=best, epochs=self.trainer.current_epoch)

    def after_validate(self) -> None:
        self._write_metrics(dict(self.trainer.callback_metrics), checkpoint=self._get(self.config, "ckpt_path"))

    def after_test(self) -> None:
        self._write_metrics(dict(self.trainer.callback_metrics), checkpoint=self._get(self.config, "ckpt_path"))


def lits_cli_main(argv: list[str]) -> None:
    """``lits fit|validate|test|preprocess ...``: ``argv`` is the whole command line after ``lits``, subcommand included."""
    configure_wandb_mode()
    quiet_library_noise()
    LitsCLI(args=None if argv == sys.argv[1:] else argv)  # None: LightningCLI reads the process's own command line
