"""BaselineUNet starting from a trained checkpoint (init_checkpoint): the same function, other heads ignored, a wrong architecture in one line."""

import pytest
import torch

from lightning_modules import BaselineUNet, CheckpointError, CMUNet, EncoderPretraining

TINY = dict(base_channels=4)


def save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


@pytest.mark.parametrize("base_class", [BaselineUNet, CMUNet])
def test_init_checkpoint_starts_from_the_trained_segmentation(tmp_path, base_class):
    torch.manual_seed(0)
    base = base_class(**TINY).eval()
    torch.manual_seed(1)  # another initialisation, so equality can only come from the checkpoint
    model = BaselineUNet(init_checkpoint=save(base, tmp_path / "base.ckpt"), **TINY).eval()
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(image)["seg"], base(image)["seg"])
    assert model.model.classification_head is None  # a CMU-Net's classification head is not carried over


def test_init_checkpoint_of_another_architecture_fails_in_one_line(tmp_path):
    wide = save(BaselineUNet(base_channels=8), tmp_path / "wide.ckpt")
    with pytest.raises(CheckpointError, match=r"wide.ckpt is a U-Net with .*\(1, 1, 8, 'instance'\).*\(1, 1, 4, 'instance'\)"):
        BaselineUNet(init_checkpoint=wide, **TINY)
    encoder = save(EncoderPretraining(**TINY), tmp_path / "encoder.ckpt")
    with pytest.raises(CheckpointError, match="not a segmentation model"):
        BaselineUNet(init_checkpoint=encoder, **TINY)
    with pytest.raises(CheckpointError, match="does not exist"):
        BaselineUNet(init_checkpoint=str(tmp_path / "missing.ckpt"), **TINY)
