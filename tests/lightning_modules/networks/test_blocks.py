"""The backbone's variants (2D / 3D, plain / residual / dense blocks, squeeze-and-excitation): shapes, parameter
counts, the unchanged default, the encoder hand-over, and the one-line errors for what does not fit.

The training steps are 2D (slices), so 3D is checked at the model level: outputs and state_dict hand-overs.
Tiny networks (base_channels 4) on 16 x 32 slices and 16 x 16 x 32 volumes, except where counts are the point.
"""

import pytest
import torch
from torch import nn

from lightning_modules import BaselineUNet, CheckpointError, CMUNet, CombinedLiverLesion, CombinedMaskMining
from lightning_modules import EncoderPretraining, MaskMining, PretrainedUNet
from lightning_modules.networks.unet import UNet
from lightning_modules.networks.checkpoints import read_base_checkpoint
from datamodules.errors import ConfigError

TINY = dict(base_channels=4)
SPATIAL = {2: (16, 32), 3: (16, 16, 32)}
BLOCKS = ("plain", "residual", "dense")
VARIANTS = [dict(spatial_dims=d, block=b, se=s) for d in (2, 3) for b in BLOCKS for s in (False, True)]


def variant_id(variant: dict) -> str:
    return f"{variant['spatial_dims']}d-{variant['block']}{'-se' if variant['se'] else ''}"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save(module, path) -> str:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


# -- shape table -------------------------------------------------------------------------------------------------
# head configuration -> (UNet arguments, expected outputs given the batch B and the spatial shape S)
HEADS = {
    "seg": (dict(), lambda b, s: {"seg": (b, 2, *s)}),
    "seg+cls": (dict(num_classes=1), lambda b, s: {"seg": (b, 2, *s), "cls": (b, 1)}),
    "seg+errors": (dict(num_error_classes=4), lambda b, s: {"seg": (b, 2, *s), "errors": (b, 4, *s)}),
    "encoder-cls": (dict(decoder=False, num_classes=3), lambda b, s: {"cls": (b, 3)}),
}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_output_shapes(variant, norm, head):
    torch.manual_seed(0)
    arguments, expected = HEADS[head]
    model = UNet(in_channels=3, out_channels=2, norm=norm, **TINY, **variant, **arguments)
    spatial = SPATIAL[variant["spatial_dims"]]
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, *spatial))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == expected(2, spatial)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_variant_keeps_the_widths_per_level(variant):
    model = UNet(**TINY, **variant)
    spatial = SPATIAL[variant["spatial_dims"]]
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 1, *spatial))
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[2:]) for f in features] == [tuple(n // 2**k for n in spatial) for k in range(5)]


# -- parameter counts --------------------------------------------------------------------------------------------
def test_plain_3d_parameter_count_by_hand():
    widths = [16, 32, 64, 128, 256]
    k3 = 3 * 3 * 3  # a 3x3x3 kernel

    def double_conv(c_in, c):  # 2 x (bias-free 3x3x3 conv, affine norm: weight + bias)
        return k3 * c_in * c + 2 * c + k3 * c * c + 2 * c

    encoder = sum(double_conv(c_in, c) for c_in, c in zip([1] + widths[:-1], widths))
    upsample = sum(2 * 2 * 2 * deeper * c + c for deeper, c in zip(widths[:0:-1], widths[-2::-1]))  # 2x2x2 transposed conv + bias
    decoder_blocks = sum(double_conv(2 * c, c) for c in widths[-2::-1])  # the upsampled features and the skip, concatenated
    head = 16 * 1 + 1  # 1x1x1 conv to one channel + bias
    assert (encoder, upsample + decoder_blocks, head) == (3_534_448, 2_111_920, 17)

    model = UNet(spatial_dims=3)
    assert count(model.encoder) == encoder
    assert count(model.decoder) == upsample + decoder_blocks
    assert count(model.segmentation_head) == head
    assert count(model) == 5_646_385
    assert count(UNet(spatial_dims=3, num_classes=1).classification_head) == 256 + 1  # Linear after global pooling
    assert count(UNet(spatial_dims=3, num_error_classes=4).error_head) == 4 * 16 + 4
    # the same arithmetic with 3x3 kernels gives the 2D network's pinned count (tests/lightning_modules/test_backbone.py)
    assert encoder - (k3 - 9) * sum(c_in * c + c * c for c_in, c in zip([1] + widths[:-1], widths)) == 1_179_472


def test_block_counts_follow_their_definitions():
    widths, c_in = [16, 32, 64, 128, 256], [1, 16, 32, 64, 128]
    residual = UNet(block="residual")
    # the plain double conv plus a bias-free 1x1 projection and its affine norm (every block changes the width)
    assert count(residual.encoder) == 1_179_472 + sum(i * c + 2 * c for i, c in zip(c_in, widths))
    assert count(residual) == 2_030_817  # the decoder's blocks get their projections too (the backbone's table)
    dense = UNet(block="dense")
    # two 3x3 layers of growth c (the second sees input + first output), a 1x1 transition, three affine norms
    assert count(dense.encoder) == sum(9 * i * c + 9 * (i + c) * c + (i + 2 * c) * c + 3 * 2 * c for i, c in zip(c_in, widths))
    assert count(dense) == 3_032_433
    se = UNet(se=True)
    # a squeeze-and-excitation MLP per block: c -> c/2 -> c, with biases
    se_layers = sum(c * (c // 2) + c // 2 + (c // 2) * c + c for c in widths + widths[-2::-1])
    assert count(se) == 1_942_289 + se_layers == 2_052_449


# -- the default network is today's ------------------------------------------------------------------------------
def default_state_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the paper's U-Net state_dict (1 in, 1 out, base 16, instance norm) in order, with its shape."""
    widths = [16, 32, 64, 128, 256]
    shapes = {}

    def double_conv(prefix, c_in, c):
        shapes.update({f"{prefix}.0.weight": (c, c_in, 3, 3), f"{prefix}.1.weight": (c,), f"{prefix}.1.bias": (c,),
                       f"{prefix}.3.weight": (c, c, 3, 3), f"{prefix}.4.weight": (c,), f"{prefix}.4.bias": (c,)})

    for k, (c_in, c) in enumerate(zip([1] + widths[:-1], widths)):
        double_conv(f"encoder.blocks.{k}", c_in, c)
    for k, (deeper, c) in enumerate(zip(widths[:0:-1], widths[-2::-1])):
        shapes.update({f"decoder.upsample.{k}.weight": (deeper, c, 2, 2), f"decoder.upsample.{k}.bias": (c,)})
    for k, c in enumerate(widths[-2::-1]):
        double_conv(f"decoder.blocks.{k}", 2 * c, c)
    shapes.update({"segmentation_head.weight": (1, 16, 1, 1), "segmentation_head.bias": (1,)})
    return shapes


def test_default_network_is_unchanged():
    expected = default_state_shapes()
    for model in (UNet(), UNet(spatial_dims=2, block="plain", se=False, norm="instance")):
        state = model.state_dict()
        assert list(state) == list(expected)
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        assert count(model) == 1_942_289
    assert repr(UNet()) == repr(UNet(spatial_dims=2, block="plain", se=False))


def test_checkpoints_from_before_the_variants_load_as_the_default(tmp_path):
    torch.manual_seed(0)
    module = BaselineUNet(**TINY)
    hparams = {k: v for k, v in module.hparams.items() if k not in ("spatial_dims", "block", "se")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    arch, _ = read_base_checkpoint(str(path))
    assert arch.variant == dict(spatial_dims=2, block="plain", se=False)
    assert torch.equal(MaskMining(base_checkpoint=str(path)).model.segmentation_head.weight, module.model.segmentation_head.weight)
    encoder = EncoderPretraining(**TINY)
    old_encoder = tmp_path / "old_encoder.ckpt"
    torch.save({"state_dict": encoder.state_dict(), "hyper_parameters": {"base_channels": 4}}, old_encoder)
    assert all(torch.equal(v, encoder.model.encoder.state_dict()[k])
               for k, v in PretrainedUNet(encoder_checkpoint=str(old_encoder), **TINY).model.encoder.state_dict().items())


# -- hand-overs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pretrained_encoder_hands_over_for_every_variant(variant, tmp_path):
    torch.manual_seed(0)
    pretraining = EncoderPretraining(**TINY, **variant)
    path = save(pretraining, tmp_path / "encoder.ckpt")
    torch.manual_seed(1)
    unet = PretrainedUNet(encoder_checkpoint=path, **TINY, **variant)
    expected = pretraining.model.encoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in unet.model.encoder.state_dict().items())
    spatial = SPATIAL[variant["spatial_dims"]]
    with torch.no_grad():
        image = torch.randn(2, 1, *spatial)
        assert tuple(unet(image)["seg"].shape) == (2, 1, *spatial)
        # the same encoder, so the same deepest features in both models
        assert torch.equal(unet.model.encoder(image)[-1], pretraining.model.encoder(image)[-1])


@pytest.mark.parametrize("variant", [dict(spatial_dims=2, block="dense", se=True), dict(spatial_dims=3, block="residual", se=False)],
                         ids=variant_id)
def test_mining_rebuilds_the_bases_variant(variant, tmp_path):
    torch.manual_seed(0)
    base = CMUNet(**TINY, **variant)
    mined = MaskMining(base_checkpoint=save(base, tmp_path / "cmunet.ckpt"), **variant)
    assert mined.base_architecture.variant == variant and mined.model.variant == variant
    assert mined.model.classification_head is not None
    image = torch.randn(2, 1, *SPATIAL[variant["spatial_dims"]])
    with torch.no_grad():  # the frozen miner is the base, rebuilt from the checkpoint
        assert torch.equal(mined._base[0](image)["seg"], base.eval()(image)["seg"])


# -- one-line errors ---------------------------------------------------------------------------------------------
def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("arguments, message", [
    (dict(block="unet++"), r"block must be one of \('plain', 'residual', 'dense'\), got 'unet\+\+'"),
    (dict(spatial_dims=1), r"spatial_dims must be one of \(2, 3\), got 1"),
])
def test_unknown_variants_fail_in_one_line(arguments, message):
    for build in (lambda: BaselineUNet(**TINY, **arguments), lambda: EncoderPretraining(**TINY, **arguments),
                  lambda: UNet(**TINY, **arguments)):
        with pytest.raises(ConfigError, match=message) as error:
            build()
        one_line(error)


def test_inputs_of_the_wrong_shape_fail_in_one_line():
    volume = UNet(spatial_dims=3, **TINY)
    with pytest.raises(ValueError, match=r"a 3D U-Net takes \(batch, channels, depth, height and width\)") as error:
        volume(torch.randn(1, 1, 32, 32))
    one_line(error)
    with pytest.raises(ValueError, match="depth, height and width must be divisible by 16, got \\(16, 32, 40\\)") as error:
        volume(torch.randn(1, 1, 16, 32, 40))
    one_line(error)


@pytest.mark.parametrize("pretrained, model, message", [
    (dict(block="residual"), dict(), "block='residual' but this model has block='plain'; set --model.init_args.block=residual"),
    (dict(spatial_dims=3), dict(), "spatial_dims=3 but this model has spatial_dims=2; set --model.init_args.spatial_dims=3"),
    (dict(se=True), dict(block="plain"), "se=True but this model has se=False; set --model.init_args.se=true"),
    (dict(), dict(block="dense", se=True), "block='plain', se=False but this model has block='dense', se=True; "
                                           "set --model.init_args.block=plain --model.init_args.se=false"),
])
def test_encoder_of_another_variant_fails_in_one_line(pretrained, model, message, tmp_path):
    path = save(EncoderPretraining(**TINY, **pretrained), tmp_path / "encoder.ckpt")
    for cls in (PretrainedUNet, CMUNet):
        with pytest.raises(CheckpointError, match=message) as error:
            cls(encoder_checkpoint=path, **TINY, **model)
        assert path in one_line(error) and "or pretrain the encoder with this model's" in str(error.value)


def test_bases_of_another_variant_fail_in_one_line(tmp_path):
    volume = save(BaselineUNet(**TINY, spatial_dims=3), tmp_path / "volume.ckpt")
    residual = save(BaselineUNet(**TINY, block="residual"), tmp_path / "residual.ckpt")
    to_3d = "spatial_dims=3 but this model has spatial_dims=2; set --model.init_args.spatial_dims=3"
    cases = [
        (lambda: MaskMining(base_checkpoint=volume), volume, to_3d),
        (lambda: MaskMining(base_checkpoint=residual), residual,
         "block='residual' but this model has block='plain'; set --model.init_args.block=residual"),
        (lambda: MaskMining(base_checkpoint=residual, block="residual", miner_checkpoints=[volume]), volume,
         "has another architecture than the base"),
        (lambda: BaselineUNet(**TINY, liver_checkpoint=volume), volume, f"{to_3d} or pass a liver network of this model's spatial_dims"),
    ]
    for build, path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            build()
        assert path in one_line(error)


def test_combined_mining_rebuilds_or_refuses_the_bases_variant(tmp_path):
    torch.manual_seed(0)
    base = CombinedLiverLesion(**TINY, block="residual", se=True)
    path = save(base, tmp_path / "combined.ckpt")
    mined = CombinedMaskMining(base_checkpoint=path, block="residual", se=True)
    assert mined.model.variant == mined.liver_model.variant == dict(spatial_dims=2, block="residual", se=True)
    assert torch.equal(mined.liver_model.encoder.blocks[0][1].fc[0].weight, base.liver_model.encoder.blocks[0][1].fc[0].weight)
    with pytest.raises(CheckpointError, match="block='residual', se=True but this model has block='plain', se=False") as error:
        CombinedMaskMining(base_checkpoint=path)
    assert path in one_line(error)
