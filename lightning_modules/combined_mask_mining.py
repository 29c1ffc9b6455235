"""CombinedMaskMining: mask mining on both networks of the combined model (the mask-mining paper, Table 1 rows
"Cmb" and "Cmb Inc.").

The base is a trained ``CombinedLiverLesion`` checkpoint. Both of its networks get the backbone's four 1x1-conv
error channels (TN, FP, FN, TP) beside their segmentation heads, initialised as ``MaskMining`` does
(``mask_mining.load_with_error_head``: TP = the segmentation head, TN its negation, FP and FN zero). The forward
pass is the combined model's (``CombinedLiverLesion.forward``) with every probability read from the error
channels (``error_masks.error_head_probability`` for ``loss``): the liver network sees the crop at the liver
resolution, its error logits are upsampled back to the crop and decoded, and that probability is the lesion
network's extra input channel. Upsampled logits decoded are exactly the base's sigmoid of its upsampled logits,
so before retraining both decoded masks are the base's.

Mining is on the fly, as ``MaskMining``'s: a frozen copy of the base combined model predicts liver and lesion
on each training crop batch after augmentation, giving two error masks (``2 * truth + prediction``; data
target ``both``: mask channel 0 liver, channel 1 lesion). Loss = ``liver_weight * error_loss(liver) +
lesion_weight * error_loss(lesion)``.

Validation and test are the cascade's (``CombinedLiverLesion``: the liver network on resized whole slices, then
both networks on the predicted liver's region): ``{stage}/liver/...`` and ``{stage}/lesion/...``, the frozen
base's figures on the same volumes under ``{stage}/before/...`` (summarised once per stage), and one error-type
report per part (``{stage}_liver_error_types.*``, ``{stage}_lesion_error_types.*``), all by ``MaskMining``.
"""

from __future__ import annotations

import contextvars

import torch

from lightning_modules.networks.unet import backbone_variant
from lightning_modules.inference.cascade_2d import CASCADE_DEFAULTS
from datamodules.errors import CheckpointError
from lightning_modules.combined import CombinedLiverLesion
from lightning_modules.losses.error_masks import error_head_probability, error_mask
from lightning_modules.mask_mining import MaskMining, load_with_error_head
from lightning_modules.networks.checkpoints import BaseArchitecture, check_backbone_variant, read_base_checkpoint


def read_combined_base(path: str, **settings) -> tuple[BaseArchitecture, CombinedLiverLesion]:
    """(its lesion network's architecture, the frozen model) of a ``CombinedLiverLesion`` checkpoint; one-line
    CheckpointError otherwise. ``settings``: the frozen model's evaluation arguments (threshold, region margins).

    The model is built by a module-level function (``save_hyperparameters`` must not reach the caller's
    ``__init__`` arguments through the stack) in an empty ``contextvars.Context`` (LightningCLI hands the
    hyperparameters of the module it builds to every LightningModule built meanwhile through a context variable).
    """
    arch, lesion_weights = read_base_checkpoint(path)  # the file, and `model.`: the lesion network
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    liver_weights = {k[len("liver_model."):]: v for k, v in state.items() if k.startswith("liver_model.")}
    if not liver_weights:
        raise CheckpointError(f"{path} is not a combined model (no liver_model weights); pass a CombinedLiverLesion checkpoint (experiments/combined_2d.yaml)")
    if arch.has_error_head:
        raise CheckpointError(f"{path} is already mask-mined (it has error heads); pass the CombinedLiverLesion checkpoint it was mined from")
    base = contextvars.Context().run(CombinedLiverLesion, in_channels=arch.in_channels - 1, base_channels=arch.base_channels,
                                     norm=arch.norm, **arch.variant, **settings)
    try:
        base.liver_model.load_state_dict(liver_weights)
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"{path}: its liver network does not fit its lesion network ({reason}); pass a CombinedLiverLesion checkpoint") from None
    base.model.load_state_dict(lesion_weights)
    return arch, base.eval().requires_grad_(False)


class CombinedMaskMining(MaskMining, CombinedLiverLesion):
    """Retrain both networks of a combined model (``CombinedLiverLesion``) on their TN / FP / FN / TP error masks.

    ``base_checkpoint`` is the combined model's checkpoint; its architecture comes from there (base_channels and
    norm are not used, and the saved hyperparameters record the base's; in_channels, spatial_dims, block and se
    must match it). ``loss``, ``class_weights``, ``distance_weights`` (and its w0, sigma) are ``MaskMining``'s
    and apply to both networks; ``liver_weight`` and ``lesion_weight`` weigh the two error losses. The
    optimisation defaults are ``MaskMining``'s (the mask-mining paper's). Not used: ``liver_loss`` and ``seg_loss`` (the error losses
    replace them), ``out_channels`` (always liver and lesion); not supported: ``miner_checkpoints`` (the base
    mines) and ``cls_weight`` (no classification head). Data: ``--data.target=both --data.sampling=liver_roi``,
    as the base's.
    """

    num_error_classes = 4

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        if h.miner_checkpoints or h.cls_weight > 0:
            raise CheckpointError("the combined model is mined by its own base and has no classification head; "
                                  "leave --model.init_args.miner_checkpoints unset and cls_weight at 0")
        settings = {key: h[key] for key in ("threshold", *CASCADE_DEFAULTS)}  # the base in this run's cascade
        self.base_architecture, base = read_combined_base(h.base_checkpoint, **settings)
        arch = self.base_architecture
        if arch.in_channels - 1 != h.in_channels:
            raise CheckpointError(f"{h.base_checkpoint} was trained with in_channels={arch.in_channels - 1} but this run has in_channels={h.in_channels}; use the base's --data.context_slices")
        check_backbone_variant(h.base_checkpoint, arch.variant, backbone_variant(h))
        # saved with the weights, so that load_from_checkpoint rebuilds this model
        self.hparams.update(base_channels=arch.base_channels, norm=arch.norm)
        CombinedLiverLesion.configure_models(self)  # both networks, with error heads (num_error_classes)
        load_with_error_head(self.liver_model, base.liver_model.state_dict())
        load_with_error_head(self.model, base.model.state_dict())
        # The frozen base lives outside the module tree: not trained, not in checkpoints, not in DDP.
        self._base, self._miners = [base], []

    # -- mining ----------------------------------------------------------------------------------
    @torch.no_grad()
    def mine(self, batch: dict, training: bool) -> dict:
        """Adds ``errors`` (B, 2, H, W): the frozen base's liver (channel 0) and lesion (channel 1) error classes."""
        base = self._base[0].to(batch["image"].device)
        base.liver_scale = self.liver_scale  # this batch's liver resolution (CombinedLiverLesion.on_after_batch_transfer)
        predicted = base.foreground_probability(base(batch["image"])).float() >= self.hparams.threshold
        truth = batch["mask"] > 0.5
        batch["errors"] = torch.stack([error_mask(predicted[:, c : c + 1], truth[:, c : c + 1]) for c in range(2)], dim=1)
        return batch

    def predict_base_cascade(self, sample: dict) -> dict:
        return self._base[0].to(sample["image"].device).predict_cascade(sample)

    # -- losses ----------------------------------------------------------------------------------
    def foreground_probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One channel per network present (liver, then lesion): the decoding of its four error channels."""
        loss = self.hparams.loss
        return torch.cat([error_head_probability(errors, loss) for errors in outputs["errors"].split(4, dim=1)], dim=1)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        logits, errors, mask, h = outputs["errors"], batch["errors"], batch["mask"], self.hparams
        liver = self.error_loss(logits[:, :4], errors[:, 0], mask[:, :1])
        lesion = self.error_loss(logits[:, 4:], errors[:, 1], mask[:, 1:])
        return {"loss": h.liver_weight * liver + h.lesion_weight * lesion, "liver_loss": liver, "lesion_loss": lesion}
