"""The combined 2D setup (Vorontsov et al. 2018; the mask-mining paper's Fig. 3B, Table 1 row "Cmb").

Two networks of the suite's backbone, trained simultaneously on the same full-resolution crops in and
around the liver (``--data.sampling=liver_roi --data.target=both``):

* the **liver network** sees the crop at the liver resolution (downsampled by ``data.image_size`` over
  the volume's in-plane size, the scale of the resized whole slices it segments at evaluation), and its
  logits are upsampled back to the crop;
* the **lesion network** sees the crop at full resolution plus the liver network's probability map as
  one more input channel.

Loss = ``liver_weight * liver_loss(liver) + lesion_weight * seg_loss(lesion)``; the lesion term's gradient
reaches the liver network through its probability map, so both learn together. Evaluation is exactly the
cascade's (``cascade_2d.predict_volume``): this model's liver network on the resized slices of every volume,
then the two networks together on the predicted liver's region at full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules import DataError

from lightning_modules.networks.unet import UNet
from lightning_modules.inference.cascade_2d import Predictor
from datamodules.errors import CheckpointError
from lightning_modules.losses.segmentation import SEG_LOSSES, build_segmentation_loss
from lightning_modules.networks.checkpoints import load_task_checkpoint
from lightning_modules.segmentation import SegmentationTask

_DIVISOR = 16  # four U-Net poolings


class CombinedLiverLesion(SegmentationTask):
    """Liver and lesion networks trained together; the lesion network also sees the liver's probability.

    The output is always 2 channels, liver and lesion logits in that order, whatever ``out_channels``; the
    backbone, optimisation and evaluation arguments are ``SegmentationTask``'s and ``BaseTask``'s.

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
        self.liver_scale = 1.0  # liver resolution / input resolution, set per batch

    def configure_losses(self) -> None:
        super().configure_losses()
        h = self.hparams
        self.liver_loss = build_segmentation_loss(h.liver_loss, h.distance_weights, h.distance_w0, h.distance_sigma)

    def liver_outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The liver network on ``image`` seen at ``liver_scale``, its outputs (logits) back at the image's size."""
        if self.liver_scale == 1.0:
            return self.liver_model(image)
        size = [max(_DIVISOR, round(n * self.liver_scale / _DIVISOR) * _DIVISOR) for n in image.shape[-2:]]
        small = self.liver_model(F.interpolate(image, size=size, mode="area"))
        return {key: F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False) for key, logits in small.items()}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each output of both networks, liver channels first; the lesion network sees the liver's ``foreground_probability``."""
        liver = self.liver_outputs(image)
        lesion = self.model(torch.cat([image, self.foreground_probability(liver)], dim=1))
        return {key: torch.cat([liver[key], lesion[key]], dim=1) for key in lesion}

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        seg, mask = outputs["seg"], batch["mask"]
        liver, lesion = self.liver_loss(seg[:, :1], mask[:, :1]), self.segmentation_loss(seg[:, 1:], mask[:, 1:])
        h = self.hparams
        return {"loss": h.liver_weight * liver + h.lesion_weight * lesion, "liver_loss": liver, "lesion_loss": lesion}

    # -- data and evaluation -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and (datamodule.hparams.target != "both" or datamodule.hparams.get("sampling") != "liver_roi"):
            raise DataError("the combined model learns liver and lesion together on crops around the liver: "
                            f"set --data.target=both --data.sampling=liver_roi (got {datamodule.hparams.target}, {datamodule.hparams.get('sampling')})")
        super().setup(stage)

    @property
    def output_channels(self) -> int:
        return 2

    @property
    def evaluates_cascade(self) -> bool:
        return True  # its own liver network

    def _scale_of(self, volume_indices) -> float:
        """Liver resolution over full resolution of the batch's volumes (all LiTS and MSD volumes are 512 wide)."""
        datamodule = self.trainer.datamodule
        widths = {datamodule.volumes[int(v)].full_shape[2] for v in volume_indices}
        if len(widths) > 1:
            raise DataError(f"the combined model's training batches need volumes of one in-plane size; found widths {sorted(widths)}")
        return datamodule.hparams.image_size / widths.pop()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if isinstance(batch, dict) and "volume_index" in batch and "roi_image" not in batch:
            self.liver_scale = self._scale_of(torch.as_tensor(batch["volume_index"]).reshape(-1).tolist())
        return batch

    @classmethod
    def cascade_predictor(cls, checkpoint: str, device: torch.device):
        """Both networks are in the checkpoint: the model restored from it (at the liver resolution), its ``cascade_networks``."""
        return load_task_checkpoint(checkpoint, map_location=device, task=cls).eval().cascade_networks

    def cascade_networks(self, sample: dict) -> tuple[Predictor, int, Predictor, int]:
        full_width = int(sample["full_shape"][2])
        scale = sample["image"].shape[-1] / full_width

        def liver(image: torch.Tensor) -> torch.Tensor:  # resized whole slices: the liver network alone
            return self.foreground_probability(self.liver_model(image))

        def lesion(image: torch.Tensor) -> torch.Tensor:  # the region at full resolution: both networks
            self.liver_scale = scale
            return self.foreground_probability(self(image))[:, 1:2]

        channels = self.hparams.in_channels
        return liver, channels, lesion, channels
