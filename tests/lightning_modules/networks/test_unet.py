import pytest
import torch
from torch import nn

from lightning_modules.networks.unet import UNet
from lightning_modules.networks.blocks import InstanceNorm2d, InstanceNorm3d

# Shape table: (kwargs, input shape, expected outputs)
CASES = [
    ({}, (2, 1, 64, 64), {"seg": (2, 1, 64, 64)}),
    ({"in_channels": 3, "out_channels": 2}, (1, 3, 32, 48), {"seg": (1, 2, 32, 48)}),
    ({"num_classes": 1}, (2, 1, 32, 32), {"seg": (2, 1, 32, 32), "cls": (2, 1)}),
    ({"decoder": False, "num_classes": 2}, (3, 1, 32, 32), {"cls": (3, 2)}),
    ({"base_channels": 8, "norm": "batch"}, (2, 1, 32, 32), {"seg": (2, 1, 32, 32)}),
]


@pytest.mark.parametrize("kwargs, shape, expected", CASES)
def test_output_shapes(kwargs, shape, expected):
    outputs = UNet(**kwargs)(torch.randn(shape))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == expected


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_parameter_count_is_pinned():
    model = UNet()
    # encoder 1,179,472 + decoder 762,800 + 1x1 head 17 (bias-free 3x3 convs followed by affine InstanceNorm)
    assert count(model.encoder) == 1_179_472
    assert count(model.decoder) == 762_800
    assert count(model.segmentation_head) == 17
    assert count(model) == 1_942_289
    assert model.classification_head is None
    assert count(UNet(num_classes=1).classification_head) == 257


def test_default_layer_sequence():
    model = UNet()
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    block = model.encoder.blocks[0]
    assert [type(m) for m in block] == [nn.Conv2d, InstanceNorm2d, nn.LeakyReLU] * 2
    assert all(isinstance(m, nn.InstanceNorm2d) and m.affine and not m.track_running_stats for m in block[1::3])
    assert block[2].negative_slope == 0.2
    ups = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(256, 128), (128, 64), (64, 32), (32, 16)]
    dec_convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, nn.ConvTranspose2d)]
    assert [c.in_channels for c in dec_convs[::2]] == [256, 128, 64, 32]
    assert model.segmentation_head.kernel_size == (1, 1)


def test_prefixes_let_a_pretrained_encoder_load_into_a_full_unet():
    encoder_only = UNet(decoder=False, num_classes=1)
    full = UNet()
    prefixes = {k.split(".")[0] for k in full.state_dict()}
    assert prefixes == {"encoder", "decoder", "segmentation_head"}
    encoder_state = {k.removeprefix("encoder."): v for k, v in encoder_only.state_dict().items() if k.startswith("encoder.")}
    full.encoder.load_state_dict(encoder_state)
    for key, value in encoder_state.items():
        assert torch.equal(full.encoder.state_dict()[key], value)


def test_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet()(torch.randn(1, 1, 40, 40))


@pytest.mark.parametrize("ours, torchs, shape", [(InstanceNorm2d, nn.InstanceNorm2d, (3, 5, 12, 10)),
                                                 (InstanceNorm3d, nn.InstanceNorm3d, (2, 4, 6, 8, 7)),
                                                 (InstanceNorm2d, nn.InstanceNorm2d, (5, 12, 10))])  # unbatched: torch's own path
def test_instance_norm_on_the_group_norm_kernel_equals_torchs(ours, torchs, shape):
    torch.manual_seed(0)
    reference = torchs(shape[-3] if len(shape) == 3 else shape[1], affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5), reference.bias.uniform_(-0.5, 0.5)
    norm = ours(reference.num_features, affine=True)
    norm.load_state_dict(reference.state_dict())
    assert list(norm.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = norm(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(shape)
    out.backward(grad), out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)
