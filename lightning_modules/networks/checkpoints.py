"""Reading the weights of a checkpoint of the suite, checked in one line (``CheckpointError``).

* ``read_base_checkpoint``: a segmentation checkpoint's architecture and weights. Mask mining rebuilds its base
  from one; a baseline U-Net can start from one (``init_checkpoint``); ``lits predict`` and a cascade rebuild their
  networks from them. The backbone variant (spatial_dims, block, se) comes from the hyperparameters; a checkpoint
  saved before the variants existed is the paper's 2D plain U-Net without squeeze-and-excitation.
* ``load_encoder_weights``: the two-stage recipe's weight transfer from a pretraining checkpoint into a U-Net.
* ``check_backbone_variant``: the one-line error for a checkpoint of another spatial_dims, block or se.
* ``read_checkpoint``, ``read_task_checkpoint``, ``load_task_checkpoint``: every read of a checkpoint goes through
  these. A checkpoint is data (tensors and plain values), never a program: it is unpickled with
  ``weights_only=True``, and a file that is not one of the suite's gets a one-line ``CheckpointError`` naming it,
  not torch's paragraph suggesting ``weights_only=False``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass

import torch

from lightning_modules.networks.unet import UNet, backbone_variant
from datamodules.errors import CheckpointError
from lightning_modules.base import checkpoint_task_class
from lightning_modules.losses.error_masks import error_head_probability

SUITE_CHECKPOINT = "a .ckpt the suite wrote (e.g. <run>/checkpoints/best.ckpt)"
# what LightningCLI records to rebuild a module; load_from_checkpoint calls whatever a checkpoint names here
TRUSTED_INSTANTIATORS = ("pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module")


# -- reading any checkpoint as data ----------------------------------------------------------------
def unreadable_reason(error: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words (torch's own text is a paragraph
    that suggests loading it unsafely)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a Python object ({found.group(1)}) and the suite loads checkpoints as data only (tensors and plain values)"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects or code and the suite loads checkpoints as data only (tensors and plain values)"
    if isinstance(error, EOFError) or "zip archive" in text:
        return "it is empty, cut short or corrupt"
    return "it is not a PyTorch checkpoint file"


def read_checkpoint(path, map_location="cpu", what: str = "checkpoint") -> dict:
    """The checkpoint at ``path`` read as data only (``weights_only=True``: no object it names is built, no code it
    holds runs); one-line ``CheckpointError`` naming the file (``what``: how messages call it) when it is missing,
    unreadable, or not a Lightning checkpoint (a dict with a ``state_dict``)."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what} {str(path)!r} does not exist; expected {SUITE_CHECKPOINT}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for foreign, truncated or hostile files
        raise CheckpointError(f"cannot read {what} {path}: {unreadable_reason(error)}; expected {SUITE_CHECKPOINT}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{what} {path} is not a Lightning checkpoint (no state_dict); expected {SUITE_CHECKPOINT}")
    return checkpoint


def read_task_checkpoint(path, map_location="cpu") -> tuple[dict, type]:
    """(the checkpoint read as data, the suite's task class that saved it); one-line ``CheckpointError`` otherwise."""
    checkpoint = read_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters")
    instantiator = hparams.get("_instantiator") if isinstance(hparams, dict) else None
    if instantiator is not None and instantiator not in TRUSTED_INSTANTIATORS:
        raise CheckpointError(f"{path} names {instantiator!r} to build its model, which the suite does not call; expected {SUITE_CHECKPOINT}")
    return checkpoint, checkpoint_task_class(checkpoint, str(path))


def load_task_checkpoint(path, map_location=None, task: type | None = None):
    """The task saved at ``path``, rebuilt by Lightning's ``load_from_checkpoint`` with ``weights_only=True``.
    ``task``: the class to rebuild (default: the one the checkpoint records, ``checkpoint_task_class``)."""
    _, recorded = read_task_checkpoint(path)
    return (task or recorded).load_from_checkpoint(path, map_location=map_location, weights_only=True)


@dataclass(frozen=True)
class BaseArchitecture:
    """What a base checkpoint holds, read from its hyperparameters and weights."""

    in_channels: int
    out_channels: int
    base_channels: int
    norm: str
    spatial_dims: int
    block: str
    se: bool
    has_classification_head: bool
    has_error_head: bool
    loss: str | None  # the decoding of an earlier mining round's error head
    target: str | None  # the data target it was trained on, when the checkpoint records it

    @property
    def variant(self) -> dict:
        """``spatial_dims``, ``block`` and ``se``, keyed as ``UNet.variant``."""
        return {"spatial_dims": self.spatial_dims, "block": self.block, "se": self.se}

    def build(self) -> UNet:
        return UNet(self.in_channels, self.out_channels, self.base_channels, self.norm,
                    num_classes=1 if self.has_classification_head else None,
                    num_error_classes=4 if self.has_error_head else None, **self.variant)


def read_base_checkpoint(path: str) -> tuple[BaseArchitecture, dict[str, torch.Tensor]]:
    """(architecture, ``model.*`` weights without the prefix) of a segmentation checkpoint; one-line CheckpointError otherwise."""
    checkpoint = read_checkpoint(path)
    state, hparams = checkpoint["state_dict"], checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this suite (no hyper_parameters); expected {SUITE_CHECKPOINT}")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not any(k.startswith("decoder.") for k in weights) or "segmentation_head.weight" not in weights:
        raise CheckpointError(f"{path} is not a segmentation model (no decoder or segmentation head: an encoder pretraining checkpoint?); pass a BaselineUNet, PretrainedUNet, CMUNet or MaskMining checkpoint")
    head = weights["segmentation_head.weight"]
    # the encoder's first conv (its first weight of 2 or 3 spatial dimensions, whatever the block) takes in_channels
    first = next((v for k, v in weights.items() if k.startswith("encoder.") and v.ndim >= 4), None)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    arch = BaseArchitecture(
        in_channels=int(first.shape[1]) if first is not None else int(hparams.get("in_channels", 1)),
        out_channels=int(head.shape[0]),
        base_channels=int(head.shape[1]),
        norm=str(hparams.get("norm", "instance")),
        **backbone_variant(hparams),
        has_classification_head=any(k.startswith("classification_head.") for k in weights),
        has_error_head="error_head.weight" in weights,
        loss=hparams.get("loss") if "error_head.weight" in weights else None,
        target=data.get("target"),
    )
    try:
        arch.build().load_state_dict(weights)
    except (RuntimeError, ValueError) as error:  # ValueError: hyperparameters naming no variant of this backbone
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"{path} does not hold this suite's U-Net ({reason}); pass a checkpoint of the suite's segmentation modules") from None
    return arch, weights


def frozen_model(arch: BaseArchitecture, weights: dict[str, torch.Tensor]) -> UNet:
    model = arch.build()
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)


def rebuilt_model_probability(model: UNet, arch: BaseArchitecture, image: torch.Tensor) -> torch.Tensor:
    """The per-pixel foreground probability of a rebuilt model: its segmentation head's sigmoid, or,
    for a mask-mining round, the decoding of its error head (``error_masks.error_head_probability``)."""
    outputs = model(image)
    if arch.has_error_head:
        return error_head_probability(outputs["errors"], arch.loss)
    return torch.sigmoid(outputs["seg"])


def check_backbone_variant(path: str, found: dict, wanted: dict, alternative: str = "") -> None:
    """CheckpointError naming ``path`` and the settings that fix it when the checkpoint's backbone variant
    ``found`` (``unet.backbone_variant``: spatial_dims, block, se, or some of them) is not ``wanted``."""
    differing = [key for key in wanted if found[key] != wanted[key]]
    if not differing:
        return

    def shown(variant: dict) -> str:
        return ", ".join(f"{key}={variant[key]!r}" for key in differing)

    def cli(value) -> str:  # the spelling of a command-line value (true / false for booleans)
        return str(value).lower() if isinstance(value, bool) else str(value)

    settings = " ".join(f"--model.init_args.{key}={cli(found[key])}" for key in differing)
    or_else = f" or {alternative}" if alternative else ""
    raise CheckpointError(f"{path} holds a U-Net with {shown(found)} but this model has {shown(wanted)}; set {settings}{or_else}")


# -- pretrained encoders ---------------------------------------------------------------------------
def read_pretrained_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, hyperparameters; empty when the file has none) of a Lightning checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist (a trained model restores without it: set encoder_checkpoint to null)"
        )
    checkpoint = read_checkpoint(path, what="pretrained checkpoint")
    hparams = checkpoint.get("hyper_parameters")
    return checkpoint["state_dict"], hparams if isinstance(hparams, dict) else {}


def copy_module_weights(module: torch.nn.Module, name: str, state: dict, path: str) -> None:
    """Copy ``model.{name}.*`` of ``state`` into ``module``; every key and shape must match."""
    prefix = f"model.{name}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    if not weights:
        raise CheckpointError(f"{path} holds no {name} weights (no '{prefix}*' keys): pretrain with EncoderPretraining")
    hint = "pretrain with the same in_channels, base_channels and norm"
    # the first conv (the first weight of 2 or 3 spatial dimensions) takes in_channels and gives base_channels
    first = next((key for key, tensor in own.items() if tensor.ndim >= 4), None)
    if name == "encoder" and first in weights and weights[first].shape != own[first].shape:
        (c_out, c_in), (m_out, m_in) = weights[first].shape[:2], own[first].shape[:2]
        raise CheckpointError(
            f"{path} holds an encoder with in_channels={c_in}, base_channels={c_out} but this model has "
            f"in_channels={m_in}, base_channels={m_out}: {hint}"
        )
    for key, tensor in own.items():
        if key not in weights:
            raise CheckpointError(f"{name}.{key} is missing in {path} (another norm?): {hint}")
        if weights[key].shape != tensor.shape:
            raise CheckpointError(
                f"{name}.{key} has shape {tuple(weights[key].shape)} in {path} but {tuple(tensor.shape)} here: {hint}"
            )
    extra = sorted(set(weights) - set(own))
    if extra:
        raise CheckpointError(f"{name}.{extra[0]} in {path} has no counterpart here (another norm?): {hint}")
    module.load_state_dict(weights)


def load_encoder_weights(model: UNet, checkpoint_path: str, classification_head: bool = False) -> None:
    """Initialise ``model.encoder`` (and, if asked and present, its classification head) from a checkpoint.

    The checkpoint is any Lightning checkpoint of this suite's tasks (keys ``model.encoder.*``),
    typically ``EncoderPretraining``'s best. Only weights are copied; a checkpoint of another
    backbone configuration (spatial_dims, block and se from its hyperparameters, then every weight's
    key and shape) raises ``CheckpointError`` naming the file and the mismatch.
    """
    path = str(checkpoint_path)
    state, hparams = read_pretrained_checkpoint(path)
    check_backbone_variant(path, backbone_variant(hparams), model.variant, "pretrain the encoder with this model's")
    copy_module_weights(model.encoder, "encoder", state, path)
    if classification_head and model.classification_head is not None:
        if any(k.startswith("model.classification_head.") for k in state):
            copy_module_weights(model.classification_head, "classification_head", state, path)
