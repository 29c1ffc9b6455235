"""The combined 2D setup (Vorontsov et al. 2018; the mask-mining paper's Fig. 3B, Table 1 row "Cmb").

One model, two networks of the suite's backbone, learned simultaneously (``--data.sampling=combined
--data.target=both``, ``datamodules.datasets.combined_slices``):

* the **liver network** sees whole axial slices resized to ``data.image_size``, liver-free ones included: exactly
  the input it segments at evaluation (same scale, same field of view, same normalisation statistics);
* the **lesion network** sees a full-resolution crop of the same slice in the liver region plus, as one more input
  channel, the liver network's probability at the crop's pixels: its whole-slice probability resized back to the
  original size as the cascade resizes it and cut at the crop's origin (``inference.liver_guided``).

Loss = ``liver_weight * liver_loss(liver, whole slice) + lesion_weight * seg_loss(lesion, crops of slices with
liver)``; the lesion term's gradient reaches the liver network through its probability map. Evaluation is the
cascade's (``cascade_2d.predict_volume``): the liver network on every resized slice, then the lesion network in the
predicted liver's region at full resolution, fed the liver network's probability there, as in training.
"""

from __future__ import annotations

import torch

from datamodules import DataError
from datamodules.errors import CheckpointError
from lightning_modules.inference.cascade_2d import Predictor
from lightning_modules.inference.liver_guided import LiverGuided, crop_probability
from lightning_modules.losses.segmentation import SEG_LOSSES, build_segmentation_loss
from lightning_modules.networks.checkpoints import load_task_checkpoint
from lightning_modules.networks.unet import UNet
from lightning_modules.segmentation import SegmentationTask


class CombinedLiverLesion(SegmentationTask):
    """Liver and lesion networks trained together; the lesion network also sees the liver's probability.

    The output is always 2 channels, liver and lesion in that order, whatever ``out_channels``; the backbone,
    optimisation and evaluation arguments are ``SegmentationTask``'s and ``BaseTask``'s.

    Args:
        liver_loss: the liver network's loss (``dice``, ``pwce`` or ``pwce_over_dice``); ``seg_loss`` is the
            lesion network's (the mask-mining paper: pwce for the liver, pwce over Dice for lesions).
        liver_weight: weight of the liver term of the loss.
        lesion_weight: weight of the lesion term of the loss.
    """

    supports_3d = False  # 2D only: refused in one line before any work (experiments/commands/lightning_cli.py)

    def __init__(self, liver_loss: str = "dice", liver_weight: float = 1.0, lesion_weight: float = 1.0, **kwargs) -> None:
        if liver_loss not in SEG_LOSSES:
            raise CheckpointError(f"unknown liver loss {liver_loss!r}; choose one of: {', '.join(SEG_LOSSES)} (--model.init_args.liver_loss)")
        super().__init__(**kwargs)

    #: error channels beside each network's segmentation head (``None``: none; mask mining's subclass has 4)
    num_error_classes: int | None = None

    # -- networks ----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h, errors = self.hparams, self.num_error_classes
        variant = dict(spatial_dims=h.spatial_dims, block=h.block, se=h.se)
        self.liver_model = UNet(h.in_channels, 1, h.base_channels, h.norm, num_error_classes=errors, **variant)
        # the lesion network: CT + liver probability
        self.model = UNet(h.in_channels + 1, 1, h.base_channels, h.norm, num_error_classes=errors, **variant)

    def configure_losses(self) -> None:
        super().configure_losses()
        h = self.hparams
        self.liver_loss = build_segmentation_loss(h.liver_loss, h.distance_weights, h.distance_w0, h.distance_sigma)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The liver network's outputs on whole resized slices."""
        return self.liver_model(image)

    def lesion_outputs(self, batch: dict, liver: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The lesion network on the batch's valid crops (``crop_valid``), fed the liver network's outputs ``liver`` on
        their whole slices, cut at the crops' pixels."""
        valid = batch["crop_valid"] > 0.5
        crops = batch["crop_image"][valid]
        guide = crop_probability(self.foreground_probability(liver)[valid], batch["crop_origin"][valid], batch["full_size"][valid], crops.shape[-1])
        return self.model(torch.cat([crops, guide.to(crops.dtype)], dim=1))

    def training_outputs(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """The liver network on the whole slices, the lesion network on the crops fed its probability."""
        liver = self(batch["image"])
        return {"liver": liver, "lesion": self.lesion_outputs(batch, liver)}

    def compute_losses(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict) -> dict[str, torch.Tensor]:
        """Liver loss on the whole slices; lesion loss on the valid crops (0 for a batch without one)."""
        h, liver_seg, lesion_seg = self.hparams, outputs["liver"]["seg"], outputs["lesion"]["seg"]
        liver = self.liver_loss(liver_seg, batch["mask"][:, :1])
        masks = batch["crop_mask"][batch["crop_valid"] > 0.5][:, 1:]
        lesion = self.segmentation_loss(lesion_seg, masks) if len(masks) else lesion_seg.sum() * 0.0
        return {"loss": h.liver_weight * liver + h.lesion_weight * lesion, "liver_loss": liver, "lesion_loss": lesion}

    # -- data and evaluation -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and (datamodule.hparams.target != "both" or datamodule.hparams.get("sampling") != "combined"):
            raise DataError("the combined model learns the liver on whole slices and lesions on full-resolution crops of them: "
                            f"set --data.target=both --data.sampling=combined (got {datamodule.hparams.target}, {datamodule.hparams.get('sampling')})")
        super().setup(stage)

    @property
    def output_channels(self) -> int:
        return 2

    @property
    def evaluates_cascade(self) -> bool:
        return True  # its own liver network

    @classmethod
    def cascade_predictor(cls, checkpoint: str, device: torch.device):
        """Both networks are in the checkpoint: the model restored from it, its ``cascade_networks``."""
        return load_task_checkpoint(checkpoint, map_location=device, task=cls).eval().cascade_networks

    def cascade_networks(self, sample: dict) -> tuple[Predictor, int, Predictor, int]:
        """The liver network alone on resized slices; the lesion network on the region, guided by the liver's probability."""
        def liver(image: torch.Tensor) -> torch.Tensor:
            return self.foreground_probability(self.liver_model(image))

        def lesion(image: torch.Tensor) -> torch.Tensor:  # CT channels + the liver probability (predict_volume adds it)
            return self.foreground_probability(self.model(image))

        channels = self.hparams.in_channels
        return liver, channels, LiverGuided(lesion), channels
