"""PU-Net, the CMU-Net paper's pre-trained U-Net: the baseline whose encoder starts from slice classification.

Phase one is ``EncoderPretraining``; this task is phase two: the full U-Net with the pretrained
encoder, trained on segmentation exactly as ``BaselineUNet`` (Dice loss unless ``seg_loss`` says
otherwise). The paper's future work (freezing the encoder after pretraining) is ``freeze_encoder_epochs``.
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy

from lightning_modules.baseline import BaselineUNet
from lightning_modules.networks.checkpoints import load_encoder_weights


class PretrainedUNet(BaselineUNet):
    """``BaselineUNet`` with its encoder initialised from a pretraining checkpoint.

    Other arguments: ``BaselineUNet``'s, ``SegmentationTask``'s and ``BaseTask``'s. With both
    ``init_checkpoint`` and ``encoder_checkpoint`` the model starts from the first, then takes the
    second's encoder.

    Args:
        encoder_checkpoint: Lightning checkpoint whose ``model.encoder.*`` weights initialise the
            encoder (weights only: optimiser and schedule start afresh). ``None`` gives the baseline.
            in_channels, base_channels, norm, spatial_dims, block and se must match the checkpoint's.
        freeze_encoder_epochs: 0 never freezes; ``k > 0`` freezes the encoder for the first ``k``
            epochs; -1 for the whole run. A frozen encoder gets no gradient and runs in eval mode
            (batch-norm statistics stay those of pretraining).
    """

    def __init__(self, encoder_checkpoint: str | None = None, freeze_encoder_epochs: int = 0, **kwargs) -> None:
        if freeze_encoder_epochs < -1:
            raise ValueError(f"freeze_encoder_epochs must be -1 (whole run), 0 (never) or a number of epochs, got {freeze_encoder_epochs}")
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        if self.hparams.encoder_checkpoint:
            load_encoder_weights(self.model, self.hparams.encoder_checkpoint)
        if self.hparams.freeze_encoder_epochs == -1:
            # Frozen before any DDP wrapping, so DDP never expects gradients for the encoder.
            self.model.encoder.requires_grad_(False)

    def encoder_frozen(self, epoch: int) -> bool:
        k = self.hparams.freeze_encoder_epochs
        return k == -1 or epoch < k

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        if self.hparams.freeze_encoder_epochs > 0 and isinstance(strategy, DDPStrategy):
            if not strategy._ddp_kwargs.get("find_unused_parameters"):
                raise ValueError(
                    "freeze_encoder_epochs > 0 under DDP needs --trainer.strategy=ddp_find_unused_parameters_true "
                    "(the encoder gets gradients only after it is unfrozen)"
                )

    def on_train_epoch_start(self) -> None:
        # Validation restores each submodule's mode, so the encoder's eval mode holds for the whole epoch.
        frozen = self.encoder_frozen(self.current_epoch)
        self.model.encoder.requires_grad_(not frozen)
        self.model.encoder.train(not frozen)
