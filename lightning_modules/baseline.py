"""The baseline U-Net of the CMU-Net paper: segmentation only, trained with ``seg_loss`` (Dice by default)."""

from __future__ import annotations

from datamodules.errors import CheckpointError
from lightning_modules.networks.checkpoints import check_backbone_variant, read_base_checkpoint
from lightning_modules.segmentation import SegmentationTask


class BaselineUNet(SegmentationTask):
    """U-Net trained on segmentation alone, by default with MONAI's Dice loss on sigmoid outputs.

    The Dice is computed over the whole batch (``batch=True``) rather than per slice, so slices
    without liver (a third or more of a CT volume) neither dominate nor destabilise the loss.
    Other arguments: ``SegmentationTask``'s and ``BaseTask``'s.

    Args:
        init_checkpoint: a segmentation checkpoint of the suite whose encoder, decoder and
            segmentation head this model starts from (weights only: fine-tuning, or mask mining's
            control run that trains the base further without error channels). Its other heads are
            ignored; its architecture must match this model's.
    """

    def __init__(self, init_checkpoint: str | None = None, **kwargs) -> None:
        # **kwargs: SegmentationTask's arguments; LightningCLI and save_hyperparameters resolve them
        # from its signature, so they are not repeated here.
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        path = self.hparams.get("init_checkpoint")
        if path:
            arch, weights = read_base_checkpoint(path)
            h = self.hparams
            found, wanted = (arch.in_channels, arch.out_channels, arch.base_channels, arch.norm), (h.in_channels, h.out_channels, h.base_channels, h.norm)
            if found != wanted:
                raise CheckpointError(f"{path} is a U-Net with (in_channels, out_channels, base_channels, norm) = {found}, this model has {wanted}; "
                                      "set the model's arguments to the checkpoint's")
            check_backbone_variant(path, arch.variant, self.model.variant)
            own = self.model.state_dict()
            self.model.load_state_dict({k: v for k, v in weights.items() if k in own})
