"""PU-Net, the CMU-Net paper's pre-trained U-Net: the baseline whose encoder starts from slice classification.

Phase one is ``EncoderPretraining``; this task is phase two: the full U-Net with the pretrained
encoder, trained on segmentation with Dice loss exactly as ``BaselineUNet``. The paper's future
work (freezing the encoder after pretraining) is ``freeze_encoder_epochs``.
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy

from .baseline import BaselineUNet
from .classification import load_encoder_weights


class PretrainedUNet(BaselineUNet):
    """``BaselineUNet`` with its encoder initialised from a pretraining checkpoint.

    Args:
        (``SegmentationTask``'s arguments; in_channels, base_channels and norm must match the checkpoint's)
        encoder_checkpoint: Lightning checkpoint whose ``model.encoder.*`` weights initialise the
            encoder (weights only: optimiser and schedule start afresh). ``None`` gives the baseline.
        freeze_encoder_epochs: 0 never freezes; ``k > 0`` freezes the encoder for the first ``k``
            epochs; -1 for the whole run. A frozen encoder gets no gradient and runs in eval mode
            (batch-norm statistics stay those of pretraining).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        norm: str = "instance",
        lr: float = 0.01,
        weight_decay: float = 0.0,
        scheduler: str = "cosine_warm_restarts",
        restart_period: int = 10,
        min_lr: float = 0.0,
        step_size: int = 30,
        step_gamma: float = 0.1,
        threshold: float = 0.5,
        largest_component: bool = True,
        num_overlays: int = 4,
        encoder_checkpoint: str | None = None,
        freeze_encoder_epochs: int = 0,
    ) -> None:
        if freeze_encoder_epochs < -1:
            raise ValueError(f"freeze_encoder_epochs must be -1 (whole run), 0 (never) or a number of epochs, got {freeze_encoder_epochs}")
        super().__init__()

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
