"""``ChannelsLast``: only the memory layout changes, never a value."""

import torch

from lightning_modules import BaselineUNet
from lightning_modules.callbacks.channels_last import ChannelsLast


def test_weights_and_batch_change_layout_not_values():
    torch.manual_seed(0)
    task = BaselineUNet().eval()
    image = torch.rand(2, 1, 32, 32)
    expected = task(image)["seg"]
    callback = ChannelsLast()
    callback.on_fit_start(None, task)
    convs = [m.weight for m in task.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    batch = {"image": image.clone(), "mask": torch.zeros(2, 1, 32, 32), "volume": torch.zeros(3, 8, 8, 8, 1), "index": 4}
    callback.on_train_batch_start(None, task, batch, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["mask"].is_contiguous(memory_format=torch.channels_last)
    assert batch["volume"].is_contiguous() and batch["index"] == 4  # 5D and non-tensors untouched
    torch.testing.assert_close(task(batch["image"])["seg"], expected, rtol=1e-4, atol=1e-5)
