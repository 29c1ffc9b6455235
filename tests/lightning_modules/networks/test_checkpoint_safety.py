"""Checkpoints are data, not programs: every load reads them with ``weights_only=True``, and a file that is not a
checkpoint of the suite's tasks gets one line naming it and what was expected, through the loaders and the commands."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.demos.boring_classes import BoringModel

from datamodules.errors import CheckpointError
from experiments.commands.lightning_cli import LitsCLI
from lightning_modules import BaselineUNet, EncoderPretraining, PretrainedUNet
from lightning_modules.base import SUITE_KEY, checkpoint_class_path
from lightning_modules.networks.checkpoints import (
    load_encoder_weights,
    load_task_checkpoint,
    read_base_checkpoint,
    read_checkpoint,
    read_task_checkpoint,
)
from tests.lits_commands import lits
from tests.synthetic import tiny_experiment, tiny_volume, write_pair


class Payload:
    """Unpickled, it runs code: it writes ``marker``. A safe load must refuse it before anything runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class Foreign:
    """A class of no suite: an object a checkpoint must not hold."""


def suite_checkpoint(path: Path, **extra) -> Path:
    """A checkpoint as the suite's Trainer writes it (``on_save_checkpoint`` included), plus ``extra`` top-level keys."""
    torch.manual_seed(0)
    task = BaselineUNet(base_channels=4)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                  "datamodule_hyper_parameters": {"image_size": 32, "hu_window": [-100.0, 600.0], "target": "liver"},
                  "pytorch-lightning_version": pl.__version__, **extra}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def unreadable(tmp_path, marker) -> dict[str, tuple[Path, str]]:
    """Files that are no checkpoint at all: name -> (path, what the one line says about it)."""
    whole = suite_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    files = {
        "malicious": (suite_checkpoint(tmp_path / "malicious.ckpt", extra=Payload(marker)), r"holds a Python object \((builtins\.)?exec\)"),
        "object": (suite_checkpoint(tmp_path / "object.ckpt", extra=Foreign()), rf"holds a Python object \({__name__}.Foreign\)"),
        "raw pickle": (tmp_path / "raw.pkl", "holds Python objects or code"),
        "text": (tmp_path / "notes.txt", "not a PyTorch checkpoint file"),
        "truncated": (tmp_path / "truncated.ckpt", "empty, cut short or corrupt"),
        "empty": (tmp_path / "empty.ckpt", "empty, cut short or corrupt"),
        "missing": (tmp_path / "absent.ckpt", "does not exist"),
    }
    files["raw pickle"][0].write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=4))
    files["text"][0].write_text("epoch: 3\nthis is not a checkpoint\n")
    files["truncated"][0].write_bytes(whole[: len(whole) // 2])
    files["empty"][0].write_bytes(b"")
    return files


@pytest.fixture
def foreign_tasks(tmp_path) -> dict[str, tuple[Path, str]]:
    """Lightning checkpoints that are data, but of a module that is not one of the suite's tasks."""
    boring = {"state_dict": BoringModel().state_dict(), "hyper_parameters": {}, "pytorch-lightning_version": pl.__version__}
    named = {**boring, "hyper_parameters": {"_class_path": "pytorch_lightning.demos.boring_classes.BoringModel"}}
    torch.save(boring, tmp_path / "boring.ckpt")
    torch.save(named, tmp_path / "named.ckpt")
    return {"unnamed": (tmp_path / "boring.ckpt", "is not a checkpoint of this suite's tasks"),
            "named": (tmp_path / "named.ckpt", "'pytorch_lightning.demos.boring_classes.BoringModel', which is not a task of this suite")}


def assert_one_line(error: Exception | str, path: Path, message: str) -> None:
    text = str(error)
    assert str(path) in text and "\n" not in text and "\x1b" not in text, text
    assert "weights_only" not in text, text  # never torch's advice to load the file unsafely
    assert re.search(message, text), text


def test_the_payload_runs_when_unpickled_unsafely(tmp_path, marker):
    """The control: the malicious file does run code when loaded as a program (so the tests below mean something)."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "ran"


LOADERS = {
    "read_checkpoint": read_checkpoint,
    "read_task_checkpoint": read_task_checkpoint,
    "load_task_checkpoint": load_task_checkpoint,
    "load_task_checkpoint(task=...)": lambda path: load_task_checkpoint(path, task=BaselineUNet),
    "read_base_checkpoint": read_base_checkpoint,
    "load_encoder_weights": lambda path: load_encoder_weights(BaselineUNet(base_channels=4).model, path),
    "PretrainedUNet(encoder_checkpoint=...)": lambda path: PretrainedUNet(encoder_checkpoint=str(path), base_channels=4),
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_every_loader_refuses_a_file_that_is_no_checkpoint_in_one_line(loader, unreadable, marker):
    for path, message in unreadable.values():
        with pytest.raises(CheckpointError) as error:
            loader(str(path))
        assert_one_line(error.value, path, message)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["read_task_checkpoint", "load_task_checkpoint"])
def test_the_task_loaders_refuse_a_checkpoint_of_another_module_in_one_line(loader, foreign_tasks):
    for path, message in foreign_tasks.values():
        with pytest.raises(CheckpointError) as error:
            LOADERS[loader](str(path))
        assert_one_line(error.value, path, message)


def test_a_checkpoint_naming_an_untrusted_instantiator_is_refused(tmp_path, marker):
    """``load_from_checkpoint`` calls the ``_instantiator`` a checkpoint names: only LightningCLI's own is let through."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    path = tmp_path / "instantiator.ckpt"
    suite_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] |= {"_instantiator": "builtins.exec", "_class_path": code}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        load_task_checkpoint(path)
    assert_one_line(error.value, path, "names 'builtins.exec' to build its model")
    assert not marker.exists()


def test_a_suite_checkpoint_loads_as_data_with_its_own_class(tmp_path):
    path = suite_checkpoint(tmp_path / "liver.ckpt")
    checkpoint, task = read_task_checkpoint(path)
    assert task is BaselineUNet and checkpoint[SUITE_KEY]["class_path"] == "lightning_modules.BaselineUNet"
    restored = load_task_checkpoint(path)
    assert type(restored) is BaselineUNet
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name]), name
    # LightningCLI's record of how it built the model is the one instantiator a checkpoint may name
    checkpoint["hyper_parameters"]["_instantiator"] = "pytorch_lightning.cli.instantiate_module"
    torch.save(checkpoint, path)
    assert read_task_checkpoint(path)[1] is BaselineUNet


def test_a_checkpoint_without_record_class_or_suite_weights_is_not_guessed_to_be_a_task():
    assert checkpoint_class_path({"state_dict": BoringModel().state_dict(), "hyper_parameters": {}}) == ""
    assert checkpoint_class_path({"state_dict": {"model.segmentation_head.weight": torch.zeros(1)}}) == "lightning_modules.SegmentationTask"


def test_an_encoder_pretraining_checkpoint_still_loads_as_data(tmp_path):
    torch.manual_seed(0)
    encoder = EncoderPretraining(base_channels=4)
    path = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": encoder.state_dict(), "hyper_parameters": dict(encoder.hparams)}, path)
    model = PretrainedUNet(encoder_checkpoint=str(path), base_channels=4).model
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, encoder.model.encoder.state_dict()[name]), name


class RecordingTrainer:
    """What ``LitsCLI`` hands the Trainer when it runs a subcommand."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda **kwargs: self.calls.append((method, kwargs))


def test_the_cli_has_the_trainer_read_ckpt_path_as_data():
    cli = LitsCLI.__new__(LitsCLI)
    cli.trainer = RecordingTrainer()
    for method in ("fit", "validate", "test"):
        getattr(cli, method)(model=None, ckpt_path="last.ckpt")
    assert cli.trainer.calls == [(m, {"model": None, "ckpt_path": "last.ckpt", "weights_only": True}) for m in ("fit", "validate", "test")]
    assert all("weights_only" in skipped for name, skipped in LitsCLI.subcommands().items() if name != "preprocess")


# -- through the commands --------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_experiment(tmp_path, volumes=3)))
    hu, label = tiny_volume(7, shape=(32, 32, 4))
    write_pair(tmp_path / "scans", "7", hu, label)[1].unlink()  # predict's input: the CT alone
    return tmp_path


def assert_refused(result, path: Path, message: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("lits: error: "), result.stderr[-3000:]
    assert_one_line(line, path, message)


PREDICT_MESSAGES = {  # where lits predict says more than the loader: MODEL may be a run folder, and must be a segmentation network
    "missing": "neither a checkpoint nor a finished run folder",
    "unnamed": "is not a segmentation model",
    "named": "is not a segmentation model",
}


def test_lits_test_fit_and_predict_refuse_a_foreign_checkpoint_in_one_line(workspace, unreadable, foreign_tasks, marker):
    env = {"WANDB_MODE": "disabled"}
    for name, (path, message) in {**unreadable, **foreign_tasks}.items():
        tested = lits("test", "--config", "tiny.yaml", f"--ckpt_path={path}", "--run_dir=tested", cwd=workspace, env=env)
        assert_refused(tested, path, message)
        predicted = lits("predict", path, "--input", "scans", "--output", "predicted", cwd=workspace, env=env)
        assert_refused(predicted, path, PREDICT_MESSAGES.get(name, message))
    resumed = lits("fit", "--config", "tiny.yaml", f"--ckpt_path={unreadable['malicious'][0]}", "--run_dir=resumed", cwd=workspace, env=env)
    assert_refused(resumed, *unreadable["malicious"])
    assert not marker.exists() and not list(workspace.glob("predicted/*.nii*"))
    assert not {"tested", "resumed"} & {p.name for p in workspace.iterdir()}  # refused before any run folder
