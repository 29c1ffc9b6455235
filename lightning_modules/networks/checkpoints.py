"""Reading a segmentation checkpoint of the suite: its architecture and weights, checked in one line.

Mask mining rebuilds its base from one; a baseline U-Net can start from one (``init_checkpoint``).
The backbone variant (spatial_dims, block, se) comes from the hyperparameters; a checkpoint saved before
the variants existed is the paper's 2D plain U-Net without squeeze-and-excitation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lightning_modules.networks.unet import UNet, backbone_variant
from datamodules.errors import CheckpointError
from lightning_modules.losses.error_masks import foreground_probability as error_foreground_probability


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
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass a trained segmentation model's .ckpt (e.g. <run>/checkpoints/best.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or foreign files raise several types
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this suite (no state_dict or hyper_parameters)")
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


def foreground_probability(model: UNet, arch: BaseArchitecture, image: torch.Tensor) -> torch.Tensor:
    """The per-pixel foreground probability of a rebuilt model: its segmentation head's sigmoid, or,
    for a mask-mining round, the decoding of its error head (``error_masks.foreground_probability``)."""
    outputs = model(image)
    if arch.has_error_head:
        return error_foreground_probability(outputs["errors"], arch.loss)
    return torch.sigmoid(outputs["seg"])
