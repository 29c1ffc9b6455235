"""The convolution blocks of the suite's U-Net (``backbone``), in 2D and 3D; ``backbone``'s docstring compares them.

Every block maps ``in_channels`` to ``out_channels`` at unchanged spatial size, so the U-Net's widths per
level, its skips and its heads are the same whichever block it is built from. ``plain`` is the paper's
double conv, written out so that the default network keeps its modules and state_dict keys; ``residual``,
``dense`` and squeeze-and-excitation are MONAI's blocks, configured with the U-Net's norm and LeakyReLU 0.2.
"""

from __future__ import annotations

from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.blocks.denseblock import ConvDenseBlock
from monai.networks.blocks.dynunet_block import UnetResBlock
import torch
import torch.nn.functional as F
from torch import nn
from datamodules.errors import ConfigError

SPATIAL_DIMS = (2, 3)
BLOCKS = ("plain", "residual", "dense")


class _InstanceNormOnGroupNormKernel:
    """Instance norm whose forward on the CPU is ``F.group_norm`` with one group per channel: the same normalisation
    (each sample's channel over its spatial axes, biased variance, then the per-channel affine), by a kernel faster
    on the CPU than ``instance_norm``'s batch norm over a reshaped input (docs/benchmarks.md), its outputs equal
    within 1e-6. Elsewhere (CUDA: cuDNN's
    kernel), unbatched or with running statistics, ``nn.InstanceNorm``'s own forward. Same parameters and state_dict."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        batched = input.dim() == self._get_no_batch_dim() + 1 and input.size(1) == self.num_features
        if input.device.type == "cpu" and batched and not self.track_running_stats:
            return F.group_norm(input, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(input)


class InstanceNorm2d(_InstanceNormOnGroupNormKernel, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormOnGroupNormKernel, nn.InstanceNorm3d):
    pass


NORMS = {"instance": {2: InstanceNorm2d, 3: InstanceNorm3d}, "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
NEGATIVE_SLOPE = 0.2
#: squeeze-and-excitation reduction ratio: Roy et al.'s for U-Nets (and MONAI's default); Hu et al.'s 16
#: would leave a 16-channel block a single hidden unit
SE_REDUCTION = 2

# The same layers in MONAI's factory notation. MONAI's instance norm defaults to affine=False; the
# paper's (and the plain block's) norms are affine.
_MONAI_ACT = ("leakyrelu", {"negative_slope": NEGATIVE_SLOPE, "inplace": True})


def _monai_norm(norm: str) -> tuple[str, dict]:
    return (norm, {"affine": True})


def plain_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """2 x (3x3(x3) conv, norm, LeakyReLU 0.2): the CMU-Net paper's U-Net block.

    The conv has no bias: the affine norm that follows adds one.
    """
    conv, norm_layer = CONV[spatial_dims], NORMS[norm][spatial_dims]
    return nn.Sequential(
        conv(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels, affine=True),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        conv(out_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels, affine=True),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    )


def residual_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> UnetResBlock:
    """MONAI's ``UnetResBlock`` (nnU-Net / DynUNet; He et al. 2016's basic residual block).

    (3x3 conv, norm, LeakyReLU, 3x3 conv, norm) + shortcut, then LeakyReLU. Every U-Net block changes the
    width, so the shortcut is always a 1x1 conv + norm projection. Convs have no bias (norms follow).
    """
    return UnetResBlock(spatial_dims, in_channels, out_channels, kernel_size=3, stride=1,
                        norm_name=_monai_norm(norm), act_name=_MONAI_ACT)


def dense_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """DenseNet's connectivity (Huang et al. 2017) at the double conv's depth: MONAI's ``ConvDenseBlock``
    of two (3x3 conv, norm, LeakyReLU) layers, then a transition MONAI ``Convolution`` back to the width.

    Each layer adds ``out_channels`` feature maps (growth rate = the level's width) and sees the block input
    concatenated with every earlier layer's output; the transition is a 1x1 conv, norm, LeakyReLU from
    ``in_channels + 2 * out_channels`` to ``out_channels``. Convs have no bias (norms follow).
    """
    layers = ConvDenseBlock(spatial_dims, in_channels, [out_channels, out_channels], kernel_size=3,
                            act=_MONAI_ACT, norm=_monai_norm(norm), bias=False)
    transition = Convolution(spatial_dims, in_channels + 2 * out_channels, out_channels, kernel_size=1,
                             act=_MONAI_ACT, norm=_monai_norm(norm), bias=False)
    return nn.Sequential(layers, transition)


_BUILDERS = {"plain": plain_block, "residual": residual_block, "dense": dense_block}


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str, block: str, se: bool) -> nn.Module:
    """One U-Net block of kind ``block``; with ``se`` it is followed by MONAI's ``ChannelSELayer``.

    The squeeze-and-excitation layer (Hu et al. 2018) rescales the block's output channels by weights from
    their global average (a 2-layer MLP, reduction ``SE_REDUCTION``, ReLU then sigmoid); Roy et al. (2018)
    place it after every encoder and decoder block of a U-Net, as here. With ``se`` the block is
    ``Sequential(block, se_layer)``; without it the block itself (the default's state_dict keys).
    """
    module = _BUILDERS[block](spatial_dims, in_channels, out_channels, norm)
    if not se:
        return module
    return nn.Sequential(module, ChannelSELayer(spatial_dims, out_channels, r=SE_REDUCTION))


def check_variant(spatial_dims: int, block: str, norm: str) -> None:
    """One-line ConfigError for a spatial_dims, block or norm the backbone does not build."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ConfigError(f"spatial_dims must be one of {SPATIAL_DIMS}, got {spatial_dims!r}")
    if block not in BLOCKS:
        raise ConfigError(f"block must be one of {BLOCKS}, got {block!r}")
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
