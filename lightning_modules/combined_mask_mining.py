"""CombinedMaskMining: mask mining on both networks of the combined model (the mask-mining paper, Table 1 rows
"Cmb" and "Cmb Inc.").

The base is a trained ``CombinedLiverLesion`` checkpoint. Both of its networks get the backbone's four 1x1-conv
error channels (TN, FP, FN, TP) beside their segmentation heads, initialised as ``MaskMining`` does
(``mask_mining.load_with_error_head``: TP = the segmentation head, TN its negation, FP and FN zero), so before
retraining both decoded masks are the base's. The forward pass is the combined model's: the liver network on whole
resized slices (``--data.sampling=combined``), its decoded error head's probability cut at each crop's pixels as the
lesion network's extra input channel.

Both parts are mined, liver first: a frozen copy of the base predicts each training batch after augmentation, its
liver network on the whole slices (the liver error mask, ``2 * truth + prediction``, at the liver network's own
scale and field of view) and its lesion network on the crops fed its own liver probability (the lesion error mask).
The retrained lesion network is fed the retrained (mined) liver network's probability, in training and at
evaluation, where the mined liver network also bounds the region. Loss = ``liver_weight * error_loss(liver) +
lesion_weight * error_loss(lesion)``.

Validation and test are the cascade's (``CombinedLiverLesion``: the liver network on resized whole slices, then
the lesion network on the predicted liver's region): ``{stage}/liver/...`` and ``{stage}/lesion/...``, the frozen
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
from lightning_modules.losses.error_masks import error_mask
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
    mines), ``base_liver_checkpoint`` (the base holds its liver network) and ``cls_weight`` (no classification head). Data: ``--data.target=both --data.sampling=combined``,
    as the base's.
    """

    num_error_classes = 4

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        if h.miner_checkpoints or h.cls_weight > 0 or h.get("base_liver_checkpoint"):
            raise CheckpointError("the combined model is mined by its own base, which holds its liver network, and has no classification "
                                  "head; leave --model.init_args.miner_checkpoints and base_liver_checkpoint unset and cls_weight at 0")
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
        self._base, self._miners, self._base_liver = [base], [], []

    # -- mining ----------------------------------------------------------------------------------
    @torch.no_grad()
    def mine(self, batch: dict, training: bool) -> dict:
        """Adds the frozen base's error classes: ``liver_errors`` (B, S, S) of its liver network on the whole slices and
        ``lesion_errors`` (Bv, c, c) of its lesion network on the valid crops, fed its own liver probability."""
        base, threshold = self._base[0].to(batch["image"].device), self.hparams.threshold
        liver = base(batch["image"])
        batch["liver_errors"] = error_mask(base.foreground_probability(liver).float() >= threshold, batch["mask"][:, :1] > 0.5)
        lesion = base.foreground_probability(base.lesion_outputs(batch, liver)).float() >= threshold
        batch["lesion_errors"] = error_mask(lesion, batch["crop_mask"][batch["crop_valid"] > 0.5][:, 1:] > 0.5)
        return batch

    def predict_base_cascade(self, sample: dict) -> dict:
        return self._base[0].to(sample["image"].device).predict_cascade(sample)

    # -- losses ----------------------------------------------------------------------------------
    def compute_losses(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict) -> dict[str, torch.Tensor]:
        """Each network's error loss on its own error masks: the liver's on the whole slices, the lesions' on the valid crops."""
        h, lesion_logits = self.hparams, outputs["lesion"]["errors"]
        liver = self.error_loss(outputs["liver"]["errors"], batch["liver_errors"], batch["mask"][:, :1])
        masks = batch["crop_mask"][batch["crop_valid"] > 0.5][:, 1:]
        lesion = self.error_loss(lesion_logits, batch["lesion_errors"], masks) if len(masks) else lesion_logits.sum() * 0.0
        return {"loss": h.liver_weight * liver + h.lesion_weight * lesion, "liver_loss": liver, "lesion_loss": lesion}
