"""The models ``lits predict`` predicts with: each MODEL (a checkpoint or a run folder) rebuilt with the liver network it
needs, and, for an ensemble (``lits predict RUN1 RUN2 ...``), the check that the models can be averaged: one
kind of prediction (a liver network, a cascade, a combined model), fed the same inputs (spatial dims, context slices,
HU window, image size, slice spacing, 3D window) and decoded with the same settings (threshold, cascade regions),
since their probabilities are averaged on one input and thresholded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from datamodules.errors import CheckpointError
from datamodules.io.atomic import read_state
from datamodules.settings import data_setting
from lightning_modules.base import checkpoint_task_class
from lightning_modules.inference.cascade_2d import CASCADE_DEFAULTS, Predictor
from lightning_modules.networks.checkpoints import BaseArchitecture, read_base_checkpoint, read_checkpoint


@dataclass
class Network:
    """One trained network rebuilt from its checkpoint, with the data settings it was trained with."""

    path: str
    task: type  # the task class that saved it (``checkpoint_task_class``): what it predicts and how
    predictor: Predictor  # its foreground probability on the device (``task.predictor``)
    arch: BaseArchitecture
    hparams: dict
    image_size: int
    hu_window: tuple[float, float]
    data: dict  # the data module's hyperparameters it was trained with


def load_network(path: str, device: torch.device) -> Network:
    arch, _ = read_base_checkpoint(path)
    checkpoint = read_checkpoint(path)
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    hparams = dict(checkpoint["hyper_parameters"])
    task = checkpoint_task_class(checkpoint, path)
    if arch.out_channels != 1:
        raise CheckpointError(f"{path} predicts {arch.out_channels} channels (data.target=both); lits predict takes a liver network or a cascade's lesion network")
    return Network(path, task, task.predictor(path, device), arch, hparams,
                   int(data.get("image_size", 256)), tuple(float(v) for v in data.get("hu_window", (-100.0, 600.0))), data)


def resolve_model(model: str) -> str:
    """A checkpoint path, or a ``lits run`` / ``lits fit`` folder's best checkpoint."""
    path = Path(model)
    if path.is_file():
        return str(path)
    if path.is_dir() and (path / "metrics.json").is_file():
        figures = read_state(path / "metrics.json", "metrics.json") or {}  # an empty or cut file: not finished
        if isinstance(figures.get("stages"), dict) and figures["stages"]:  # a `lits run` folder: its last stage holds the final network
            path = path / Path(list(figures["stages"].values())[-1]).name  # recorded paths may be relative to another folder
            figures = read_state(path / "metrics.json", "metrics.json") or {}
        for best in (figures.get("best_checkpoint"), path / "checkpoints" / "best.ckpt"):
            if best and Path(best).is_file():
                return str(best)
    raise CheckpointError(f"{model} is neither a checkpoint nor a finished run folder (with metrics.json naming its best checkpoint); pass <run>/checkpoints/best.ckpt or the run folder")


@dataclass
class Member:
    """One MODEL of ``lits predict``: its own network (``main``), the liver network it predicts with, its lesion network
    (None: a liver network alone) and, when one checkpoint holds both networks (a combined model), its whole cascade."""

    main: Network
    liver: Network
    lesion: Network | None
    cascade: Callable | None  # ``task.cascade_predictor``: a volume sample -> (liver, channels, lesion, channels)


def load_member(path: str, liver_checkpoint: str | None, device: torch.device) -> Member:
    """The checkpoint at ``path`` with its liver network (``liver_checkpoint`` overrides the one a lesion network names)."""
    main = load_network(path, device)
    cascade = main.task.cascade_predictor(path, device)  # a combined model predicts with its own cascade alone
    liver_path = (None if cascade is not None else liver_checkpoint) or main.hparams.get("liver_checkpoint")
    if liver_path:
        if not Path(liver_path).is_file():
            raise CheckpointError(f"{main.path} names its liver network {liver_path}, which does not exist; pass --liver_checkpoint=PATH")
        member = Member(main, load_network(liver_path, device), main, cascade)
    elif cascade is not None:
        member = Member(main, main, main, cascade)
    else:
        if main.arch.target == "lesion":
            raise CheckpointError(f"{main.path} is a lesion network without a liver network; pass --liver_checkpoint=PATH (the cascade's liver stage)")
        member = Member(main, main, None, None)
    if member.lesion is not None and member.lesion.arch.spatial_dims != member.liver.arch.spatial_dims:
        raise CheckpointError(f"{member.liver.path} is a {member.liver.arch.spatial_dims}D network but the lesion network {main.path} is "
                              f"{member.lesion.arch.spatial_dims}D; pass --liver_checkpoint with the liver network of the same cascade")
    return member


def ensemble_settings(member: Member) -> dict:
    """What must agree between the models of an ensemble: the kind of prediction, the inputs each network is fed and
    how the averaged probabilities are decoded."""
    liver, lesion, hparams = member.liver, member.lesion, member.main.hparams
    kind = "combined model" if member.cascade is not None else "cascade" if lesion is not None else "liver network"
    settings = {"kind": kind, "spatial_dims": liver.arch.spatial_dims, "liver input channels": liver.arch.in_channels,
                "liver image_size": liver.image_size, "liver hu_window": liver.hu_window,
                "threshold": float(hparams.get("threshold", 0.5))}
    if lesion is not None:
        settings |= {"lesion input channels": lesion.arch.in_channels, "lesion hu_window": lesion.hu_window,
                     **{key: hparams.get(key, value) for key, value in CASCADE_DEFAULTS.items()}}
    if liver.arch.spatial_dims == 3:
        settings |= {"slice_spacing_mm": float(liver.data.get("slice_spacing_mm", 2.5)),
                     "crop_size": tuple(data_setting(liver.data, "volume_3d.crop_size", (64, 128, 128))),
                     "sw_overlap": float(hparams.get("sw_overlap", 0.25)), "sw_mode": str(hparams.get("sw_mode", "gaussian"))}
    return settings


def check_compatible(members: list[Member]) -> None:
    """One-line CheckpointError naming the first model and one that cannot be averaged with it, and what differs."""
    first = ensemble_settings(members[0])
    for member in members[1:]:
        other = ensemble_settings(member)
        differing = [key for key in first if first[key] != other.get(key)] or [key for key in other if key not in first]
        if differing:
            key = differing[0]
            raise CheckpointError(f"{members[0].main.path} and {member.main.path} cannot be ensembled: {key} {first.get(key)!r} vs "
                                  f"{other.get(key)!r}; ensemble models of one kind trained on the same preprocessing")
