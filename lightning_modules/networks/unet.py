"""The CMU-Net paper's U-Net: one backbone for every training strategy of the suite, in 2D or 3D.

Layout (segmentation_models_pytorch style: encoder + decoder + heads, each under its own
state_dict prefix, so an encoder trained alone on slice classification loads into a full U-Net).
2D (``spatial_dims=2``, the default), inputs (B, C, H, W):

==============================  ==========================  =================================
module (state_dict prefix)      input                       output
==============================  ==========================  =================================
``encoder``                     (B, in_channels, H, W)      5 feature maps, (B, c_k, H/2^k, W/2^k)
``decoder``                     the 5 feature maps          (B, c_0, H, W)
``segmentation_head``           (B, c_0, H, W)              (B, out_channels, H, W) logits
``classification_head``         (B, c_4, H/16, W/16)        (B, num_classes) logits
``error_head``                  (B, c_0, H, W)              (B, num_error_classes, H, W) logits
==============================  ==========================  =================================

3D (``spatial_dims=3``), inputs (B, C, D, H, W):

==============================  ==============================  ======================================
module (state_dict prefix)      input                           output
==============================  ==============================  ======================================
``encoder``                     (B, in_channels, D, H, W)       5 feature maps, (B, c_k, D/2^k, H/2^k, W/2^k)
``decoder``                     the 5 feature maps              (B, c_0, D, H, W)
``segmentation_head``           (B, c_0, D, H, W)               (B, out_channels, D, H, W) logits
``classification_head``         (B, c_4, D/16, H/16, W/16)      (B, num_classes) logits
``error_head``                  (B, c_0, D, H, W)               (B, num_error_classes, D, H, W) logits
==============================  ==============================  ======================================

with c = (16, 32, 64, 128, 256) for the default ``base_channels=16``. Every spatial axis must be
divisible by 16 (four max-pooling steps); with instance norm one axis must be 32 or more (the
deepest features need more than one element per channel to be normalised).

Blocks are separated by 2x2(x2) max pooling. Each decoder step upsamples with a 2x2(x2) transposed
convolution (the original U-Net's "up-conv"), concatenates the encoder's skip and applies one block.
A 1x1(x1) conv gives the segmentation logits. The classification head (global average pooling + one
Linear on the deepest encoder features, the CMU-Net paper's auxiliary head) exists only when
``num_classes`` is given; the error head (mask mining's four 1x1(x1)-conv error channels beside the
segmentation head, on the same decoder features) only when ``num_error_classes`` is given.

Blocks (``block``; ``backbone_blocks`` builds them), all with ``norm`` (affine instance or batch norm)
and LeakyReLU 0.2, each mapping a level's input to the level's width c_k:

* ``plain`` (default): the paper's 2 x (3x3(x3) conv, norm, LeakyReLU) double conv.
* ``residual``: MONAI's ``UnetResBlock`` (nnU-Net's residual block after He et al. 2016): conv, norm,
  LeakyReLU, conv, norm, plus a 1x1(x1) conv + norm projection of the input, then LeakyReLU.
* ``dense``: DenseNet connectivity (Huang et al. 2017) with MONAI's ``ConvDenseBlock``: two (3x3 conv,
  norm, LeakyReLU) layers of growth rate c_k, each fed the concatenation of the block input and the
  earlier layers' outputs, then a 1x1 conv, norm, LeakyReLU transition back to c_k.

``se=True`` follows every encoder and decoder block with MONAI's ``ChannelSELayer``: squeeze-and-
excitation (Hu et al. 2018) as Roy et al. (2018) place it in U-Nets, reduction ratio 2. Convs that a
norm follows have no bias (the affine norm adds one).

Parameters with the default widths, 1 input and 1 output channel, no classification or error head
(the 2D plain one is the paper's network; ``tests/lightning_modules/test_backbone_variants.py`` counts
the plain ones by hand and each block's extra weights from its definition):

========  =========  =========  =========  =========
block     2D         2D + SE    3D         3D + SE
========  =========  =========  =========  =========
plain     1,942,289  2,052,449  5,646,385  5,756,545
residual  2,030,817  2,140,977  5,734,913  5,845,073
dense     3,032,433  3,142,593  8,303,537  8,413,697
========  =========  =========  =========  =========
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.blocks import AVG_POOL, BLOCKS, CONV, CONV_TRANSPOSE, MAX_POOL, SPATIAL_DIMS, check_variant, conv_block

__all__ = ["BLOCKS", "DEPTH", "SPATIAL_DIMS", "VARIANT_DEFAULTS", "ClassificationHead", "Decoder", "Encoder", "UNet",
           "backbone_variant", "encoder_channels"]

DEPTH = 5
#: the backbone's variant arguments and their defaults (the paper's network)
VARIANT_DEFAULTS = {"spatial_dims": 2, "block": "plain", "se": False}
_AXES = {2: "height and width", 3: "depth, height and width"}


def encoder_channels(base_channels: int) -> list[int]:
    return [base_channels * 2**k for k in range(DEPTH)]


def backbone_variant(hparams: dict) -> dict:
    """spatial_dims, block and se of saved hyperparameters; a checkpoint older than the variants gets the defaults."""
    return {key: hparams.get(key, default) for key, default in VARIANT_DEFAULTS.items()}


class Encoder(nn.Module):
    """Five blocks with max pooling between them; returns every block's output (the skips)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 16, norm: str = "instance",
                 spatial_dims: int = 2, block: str = "plain", se: bool = False):
        super().__init__()
        check_variant(spatial_dims, block, norm)
        self.spatial_dims = spatial_dims
        channels = encoder_channels(base_channels)
        self.out_channels = channels
        self.blocks = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.blocks.append(conv_block(spatial_dims, previous, width, norm, block, se))
            previous = width
        self.pool = MAX_POOL[spatial_dims](2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        dims = self.spatial_dims
        if x.ndim != dims + 2:
            raise ValueError(f"a {dims}D U-Net takes (batch, channels, {_AXES[dims]}) inputs, got shape {tuple(x.shape)}")
        if any(n % 2 ** (DEPTH - 1) for n in x.shape[2:]):
            raise ValueError(f"U-Net input {_AXES[dims]} must be divisible by 16, got {tuple(x.shape[2:])}")
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x if index == 0 else self.pool(x))
            features.append(x)
        return features


class Decoder(nn.Module):
    """Mirror of the encoder: upsample, concatenate the skip, one block; from 256 back to 16 channels."""

    def __init__(self, base_channels: int = 16, norm: str = "instance", spatial_dims: int = 2,
                 block: str = "plain", se: bool = False):
        super().__init__()
        check_variant(spatial_dims, block, norm)
        channels = encoder_channels(base_channels)
        self.upsample = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deeper, width in zip(channels[:0:-1], channels[-2::-1]):
            self.upsample.append(CONV_TRANSPOSE[spatial_dims](deeper, width, kernel_size=2, stride=2))
            self.blocks.append(conv_block(spatial_dims, 2 * width, width, norm, block, se))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for upsample, block, skip in zip(self.upsample, self.blocks, features[-2::-1]):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return x


class ClassificationHead(nn.Sequential):
    """Global average pooling and one Linear layer on the deepest encoder features."""

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2):
        super().__init__(AVG_POOL[spatial_dims](1), nn.Flatten(), nn.Linear(in_channels, num_classes))


class UNet(nn.Module):
    """Encoder, optional decoder + segmentation head, optional classification and error heads.

    Args:
        in_channels: input channels (1 for single slices, 2k+1 for k context slices on each side).
        out_channels: segmentation output channels (logits); ignored when ``decoder=False``.
        base_channels: width of the first block; doubles at every block (16 -> 256 by default).
        norm: ``"instance"`` (the paper) or ``"batch"``.
        num_classes: size of the classification head's output; ``None`` means no head.
        decoder: ``False`` builds the encoder-only classifier used for encoder pretraining.
        num_error_classes: size of the error head (4 for mask mining); ``None`` means no head.
        spatial_dims: 2 (slices, (B, C, H, W)) or 3 (volumes, (B, C, D, H, W)).
        block: ``"plain"`` (the paper), ``"residual"`` or ``"dense"`` (see the module docstring).
        se: follow every block with a squeeze-and-excitation layer.

    ``forward`` returns a dict with ``"seg"`` (B, out_channels, *spatial) when the decoder exists,
    ``"cls"`` (B, num_classes) when the classification head exists and ``"errors"``
    (B, num_error_classes, *spatial) when the error head exists. ``spatial_dims``, ``block``, ``se``
    and ``norm`` are kept as attributes, so a weight hand-over can name a mismatch.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        norm: str = "instance",
        num_classes: int | None = None,
        decoder: bool = True,
        num_error_classes: int | None = None,
        spatial_dims: int = 2,
        block: str = "plain",
        se: bool = False,
    ):
        super().__init__()
        if not decoder and num_classes is None:
            raise ValueError("an encoder-only UNet needs a classification head (num_classes)")
        if not decoder and num_error_classes is not None:
            raise ValueError("the error head sits on the decoder: it needs decoder=True")
        check_variant(spatial_dims, block, norm)
        self.spatial_dims, self.block, self.se, self.norm = spatial_dims, block, se, norm
        variant = dict(norm=norm, spatial_dims=spatial_dims, block=block, se=se)
        conv = CONV[spatial_dims]
        self.encoder = Encoder(in_channels, base_channels, **variant)
        self.decoder = Decoder(base_channels, **variant) if decoder else None
        self.segmentation_head = conv(base_channels, out_channels, kernel_size=1) if decoder else None
        self.classification_head = (
            ClassificationHead(self.encoder.out_channels[-1], num_classes, spatial_dims) if num_classes is not None else None
        )
        self.error_head = conv(base_channels, num_error_classes, kernel_size=1) if num_error_classes else None

    @property
    def variant(self) -> dict:
        """This network's ``spatial_dims``, ``block`` and ``se``, keyed as ``backbone_variant`` reads them."""
        return {"spatial_dims": self.spatial_dims, "block": self.block, "se": self.se}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        outputs = {}
        if self.decoder is not None:
            decoded = self.decoder(features)
            outputs["seg"] = self.segmentation_head(decoded)
            if self.error_head is not None:
                outputs["errors"] = self.error_head(decoded)
        if self.classification_head is not None:
            outputs["cls"] = self.classification_head(features[-1])
        return outputs
