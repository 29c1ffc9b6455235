"""The CMU-Net paper's U-Net: one backbone for every training strategy of the suite.

Layout (segmentation_models_pytorch style: encoder + decoder + heads, each under its own
state_dict prefix, so an encoder trained alone on slice classification loads into a full U-Net):

==============================  ==========================  =================================
module (state_dict prefix)      input                       output
==============================  ==========================  =================================
``encoder``                     (B, in_channels, H, W)      5 feature maps, (B, c_k, H/2^k, W/2^k)
``decoder``                     the 5 feature maps          (B, c_0, H, W)
``segmentation_head``           (B, c_0, H, W)              (B, out_channels, H, W) logits
``classification_head``         (B, c_4, H/16, W/16)        (B, num_classes) logits
``error_head``                  (B, c_0, H, W)              (B, num_error_classes, H, W) logits
==============================  ==========================  =================================

with c = (16, 32, 64, 128, 256) for the default ``base_channels=16``. H and W must be divisible
by 16 (four max-pooling steps).

Each encoder block is 2 x (3x3 conv, norm, LeakyReLU 0.2) and blocks are separated by 2x2 max
pooling. Each decoder step upsamples with a 2x2 transposed convolution (the original U-Net's
"up-conv"), concatenates the encoder's skip and applies the same double-conv block. A 1x1 conv
gives the segmentation logits. The classification head (global average pooling + one Linear on
the deepest encoder features, the CMU-Net paper's auxiliary head) exists only when
``num_classes`` is given; the error head (mask mining's four 1x1-conv error channels beside the
segmentation head, on the same decoder features) only when ``num_error_classes`` is given.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d}
DEPTH = 5


def double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """2 x (3x3 conv, norm, LeakyReLU 0.2). The conv has no bias: the affine norm that follows adds one."""
    norm_layer = NORMS[norm]
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


def encoder_channels(base_channels: int) -> list[int]:
    return [base_channels * 2**k for k in range(DEPTH)]


class Encoder(nn.Module):
    """Five double-conv blocks with max pooling between them; returns every block's output (the skips)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 16, norm: str = "instance"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        channels = encoder_channels(base_channels)
        self.out_channels = channels
        self.blocks = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.blocks.append(double_conv(previous, width, norm))
            previous = width
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] % 2 ** (DEPTH - 1) or x.shape[-2] % 2 ** (DEPTH - 1):
            raise ValueError(f"U-Net input height and width must be divisible by 16, got {tuple(x.shape[-2:])}")
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x if index == 0 else self.pool(x))
            features.append(x)
        return features


class Decoder(nn.Module):
    """Mirror of the encoder: upsample, concatenate the skip, double conv; from 256 back to 16 channels."""

    def __init__(self, base_channels: int = 16, norm: str = "instance"):
        super().__init__()
        channels = encoder_channels(base_channels)
        self.upsample = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deeper, width in zip(channels[:0:-1], channels[-2::-1]):
            self.upsample.append(nn.ConvTranspose2d(deeper, width, kernel_size=2, stride=2))
            self.blocks.append(double_conv(2 * width, width, norm))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for upsample, block, skip in zip(self.upsample, self.blocks, features[-2::-1]):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return x


class ClassificationHead(nn.Sequential):
    """Global average pooling and one Linear layer on the deepest encoder features."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


class UNet(nn.Module):
    """Encoder, optional decoder + segmentation head, optional classification head.

    Args:
        in_channels: input channels (1 for single slices, 2k+1 for k context slices on each side).
        out_channels: segmentation output channels (logits); ignored when ``decoder=False``.
        base_channels: width of the first block; doubles at every block (16 -> 256 by default).
        norm: ``"instance"`` (the paper) or ``"batch"``.
        num_classes: size of the classification head's output; ``None`` means no head.
        decoder: ``False`` builds the encoder-only classifier used for encoder pretraining.
        num_error_classes: size of the error head (4 for mask mining); ``None`` means no head.

    ``forward`` returns a dict with ``"seg"`` (B, out_channels, H, W) when the decoder exists,
    ``"cls"`` (B, num_classes) when the classification head exists and ``"errors"``
    (B, num_error_classes, H, W) when the error head exists.
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
    ):
        super().__init__()
        if not decoder and num_classes is None:
            raise ValueError("an encoder-only UNet needs a classification head (num_classes)")
        if not decoder and num_error_classes is not None:
            raise ValueError("the error head sits on the decoder: it needs decoder=True")
        self.encoder = Encoder(in_channels, base_channels, norm)
        self.decoder = Decoder(base_channels, norm) if decoder else None
        self.segmentation_head = nn.Conv2d(base_channels, out_channels, kernel_size=1) if decoder else None
        self.classification_head = (
            ClassificationHead(self.encoder.out_channels[-1], num_classes) if num_classes is not None else None
        )
        self.error_head = nn.Conv2d(base_channels, num_error_classes, kernel_size=1) if num_error_classes else None

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
