"""Pieces shared by the tasks that classify slices (liver present or not, CMU-Net's C = max(Y)).

* ``focal_loss``: MONAI's sigmoid focal loss, with ``alpha`` named as the paper names it;
* ``classification_metrics`` / ``update_classification`` / ``compute_classification``: binary
  accuracy, AUROC and F1 as torchmetrics states, so the figures are exact under DDP;
* ``load_encoder_weights``: the two-stage recipe's weight transfer from a pretraining checkpoint into
  a U-Net, failing with one line (``CheckpointError``) when the checkpoint does not fit;
* ``check_backbone_variant``: that one-line error for a checkpoint of another spatial_dims, block or se.
"""

from __future__ import annotations

import os

import torch
from monai.losses import FocalLoss
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from datamodules.errors import CheckpointError
from lightning_modules.networks.unet import UNet, backbone_variant


def check_backbone_variant(path: str, found: dict, wanted: dict, alternative: str = "") -> None:
    """CheckpointError naming ``path`` and the settings that fix it when the checkpoint's backbone variant
    ``found`` (``backbone.backbone_variant``: spatial_dims, block, se, or some of them) is not ``wanted``."""
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


# -- loss ------------------------------------------------------------------------------------------
def focal_loss(alpha: float, gamma: float) -> FocalLoss:
    """Sigmoid focal loss on (B, 1) logits, mean over the batch.

    ``alpha`` weights the positive slices and ``1 - alpha`` the negative ones: MONAI's
    ``sigmoid_focal_loss`` multiplies each term by ``target * alpha + (1 - target) * (1 - alpha)``.
    The paper's "weights 0.8 and 0.2 for positive and negative examples" is therefore ``alpha=0.8``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal alpha (weight of positive slices) must be in [0, 1], got {alpha}")
    return FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="mean")


def slice_labels(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's slice labels (B,) shaped and typed like the (B, 1) classification logits."""
    return batch["label"].reshape(like.shape).to(like.dtype)


# -- metrics ---------------------------------------------------------------------------------------
def classification_metrics(stage: str) -> MetricCollection:
    """Binary accuracy, AUROC and F1 of one stage, computed as ``{stage}/accuracy`` etc."""
    return MetricCollection(
        {"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC(), "f1": BinaryF1Score()}, prefix=f"{stage}/"
    )


def update_classification(metrics: MetricCollection, logits: torch.Tensor, batch: dict) -> None:
    """Feed (B, 1) logits and ``batch["label"]``; probabilities are thresholded at 0.5."""
    metrics.update(torch.sigmoid(logits.detach().float()).reshape(-1), batch["label"].reshape(-1).long())


def compute_classification(metrics: MetricCollection) -> dict[str, float]:
    """The epoch's figures (gathered over ranks), then reset; empty when nothing was seen."""
    if not any(metric.update_count for metric in metrics.values()):
        return {}
    figures = {name: float(value) for name, value in metrics.compute().items()}
    metrics.reset()
    return figures


# -- pretrained weights ----------------------------------------------------------------------------
def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, hyperparameters; empty when the file has none) of a Lightning checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist (a trained model restores without it: set encoder_checkpoint to null)"
        )
    try:
        # Lightning checkpoints hold only tensors and primitives: no need to unpickle arbitrary code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt, truncated or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read pretrained checkpoint {path}: {reason}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this suite (no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    return state, hparams if isinstance(hparams, dict) else {}


def _copy_module(module: torch.nn.Module, name: str, state: dict, path: str) -> None:
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
    state, hparams = _read_checkpoint(path)
    check_backbone_variant(path, backbone_variant(hparams), model.variant, "pretrain the encoder with this model's")
    _copy_module(model.encoder, "encoder", state, path)
    if classification_head and model.classification_head is not None:
        if any(k.startswith("model.classification_head.") for k in state):
            _copy_module(model.classification_head, "classification_head", state, path)
