"""End to end through the `lits` command: fit then test from a YAML, DDP equality, synth, preprocess, bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import tiny_volume, write_pair
from tests.lits_commands import lits as run_lits


def lits(*args, cwd, check=True, env=None):
    return run_lits(*args, cwd=cwd, env={"WANDB_MODE": "offline", **(env or {})}, check=check)


def lits_in_process(*args, capsys) -> tuple[int, str]:
    """`lits ARGS` in this process (no interpreter start-up) for commands that stop before training: (exit code, stderr)."""
    from experiments.commands.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    return stop.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    for i in range(5):
        write_pair(folder / "data", str(i), *tiny_volume(i, shape=(40, 40, 9)))
    config = {
        "seed_everything": 7,
        "model": {"class_path": "lightning_modules.BaselineUNet", "init_args": {"lr": 0.003, "base_channels": 4, "restart_period": 1}},
        "data": {"root": str(folder / "data"), "cache_dir": str(folder / "cache"), "split": [1, 1, 3], "image_size": 32,
                 "batch_size": 4, "num_workers": 0, "preprocess_workers": 1},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "default_root_dir": str(folder / "runs"),
                    "enable_progress_bar": False, "log_every_n_steps": 1},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def fitted(workspace):
    lits("fit", "--config", "tiny.yaml", "--trainer.max_epochs=2", cwd=workspace)
    return workspace / "runs" / "tiny" / "version_0"


def test_fit_writes_metrics_config_and_checkpoints(fitted):
    metrics = json.loads((fitted / "metrics.json").read_text())
    for stage in ("val", "test"):
        for name in ("dice_slice", "hd_slice_px", "dice_volume", "hd95_volume_mm", "hd_volume_mm"):
            value = metrics[f"{stage}/{name}"]
            assert value == value and value >= 0  # not NaN
    assert metrics["epochs"] == 2
    assert Path(metrics["best_checkpoint"]).name == "best.ckpt"
    assert (fitted / "checkpoints" / "last.ckpt").exists()
    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["model"]["class_path"] == "lightning_modules.BaselineUNet"
    assert (fitted / "test_per_volume.csv").read_text().count("\n") == 4  # header + 3 test volumes
    rows = list(csv.DictReader(open(fitted / "test_per_volume.csv")))
    for name in ("tp_voxels", "fp_voxels", "fn_voxels"):  # the error types, summed over volumes
        assert metrics[f"test/{name}"] == sum(int(row[name]) for row in rows)
    assert metrics["test/tp_voxels"] + metrics["test/fn_voxels"] > 0  # the test volumes hold liver
    assert (fitted / "metrics.csv").exists()
    assert (fitted / "test_overlays.png").stat().st_size > 10_000 and (fitted / "val_overlays.png").exists()


def test_test_subcommand_reproduces_fit_figures_and_ddp_matches(fitted, workspace):
    best = json.loads((fitted / "metrics.json").read_text())["best_checkpoint"]
    lits("test", "--config", "tiny.yaml", f"--ckpt_path={best}", "--name=single", cwd=workspace)
    lits("test", "--config", "tiny.yaml", f"--ckpt_path={best}", "--name=ddp",
         "--trainer.devices=2", "--trainer.strategy=ddp_fork", "--trainer.accelerator=cpu", cwd=workspace)  # ddp_fork: the other rank forked, not a new interpreter; the launch itself is tested in test_stages.py
    fit = json.loads((fitted / "metrics.json").read_text())
    single = json.loads((workspace / "runs" / "single" / "version_0" / "metrics.json").read_text())
    ddp = json.loads((workspace / "runs" / "ddp" / "version_0" / "metrics.json").read_text())
    # 3 test volumes x 9 slices = 27 slices: ranks interleave slices of every volume, and the sampler pads one
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    names = [k for k in single if k.startswith("test/") and k != "test/loss"]
    assert len(names) == 8  # 5 figures and 3 voxel counts
    for name in names:
        assert single[name] == pytest.approx(fit[name], abs=1e-6), name
        assert ddp[name] == pytest.approx(single[name], abs=1e-6), name
    # each rank scored its share of the volumes (rank 0 two, rank 1 one); the gathered rows are one process's
    rows = {name: list(csv.DictReader(open(workspace / "runs" / name / "version_0" / "test_per_volume.csv"))) for name in ("single", "ddp")}
    assert len(rows["ddp"]) == 3 and rows["ddp"] == rows["single"]


def test_synth_and_preprocess(tmp_path, monkeypatch, capsys):
    from experiments.commands.cli import main

    monkeypatch.chdir(tmp_path)  # in this process: neither command trains
    main(["synth", "--out", "phantom", "--volumes", "2", "--shape", "48", "48", "12"])
    assert sorted(p.name for p in (tmp_path / "phantom").iterdir()) == ["segmentation-0.nii.gz", "segmentation-1.nii.gz", "volume-0.nii.gz", "volume-1.nii.gz"]
    # the exact command (the default split asks for 17 volumes: preprocessing ignores the split)
    main(["preprocess", "--data.root=phantom", "--data.cache_dir=cache", "--trainer.default_root_dir=runs"])
    assert "cache ready" in capsys.readouterr().out
    entries = list((tmp_path / "cache" / "preprocessed").glob("*/*/meta.json"))
    assert len(entries) == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda root: (root / "segmentation-1.nii.gz").unlink(), "volume-1.nii.gz: volume has no segmentation"),
        (lambda root: (root / "volume-1.nii.gz").write_bytes((root / "volume-1.nii.gz").read_bytes()[:300]), "volume-1.nii.gz: "),
        (lambda root: write_pair(root, "1", tiny_volume(1)[0], tiny_volume(1)[1] * 3), "segmentation-1.nii.gz: label values"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, make_bad, message, capsys):
    root = tmp_path / "data"
    for i in range(3):
        write_pair(root, str(i), *tiny_volume(i))
    make_bad(root)
    code, stderr = lits_in_process("fit", "--model=lightning_modules.BaselineUNet", f"--data.root={root}", f"--data.cache_dir={tmp_path / 'cache'}",
                                   "--data.split=[1,1,1]", "--data.image_size=32", "--data.preprocess_workers=1",
                                   f"--trainer.default_root_dir={tmp_path / 'runs'}", capsys=capsys)
    assert code == 2  # a suite error: any other exception would have propagated here as a traceback
    error_lines = [line for line in stderr.splitlines() if line.startswith("lits: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], stderr[-2000:]
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_pu_net_with_a_foreign_encoder_checkpoint_fails_before_training(tmp_path, capsys):
    import torch

    from lightning_modules import EncoderPretraining

    encoder = EncoderPretraining(base_channels=8, in_channels=3)  # wrong width and wrong in_channels
    torch.save({"state_dict": encoder.state_dict(), "hyper_parameters": dict(encoder.hparams)}, tmp_path / "encoder.ckpt")
    code, stderr = lits_in_process("fit", "--model=lightning_modules.PretrainedUNet", "--model.init_args.base_channels=4",
                                   f"--model.init_args.encoder_checkpoint={tmp_path / 'encoder.ckpt'}", "--data.root=nowhere",
                                   f"--trainer.default_root_dir={tmp_path / 'runs'}", capsys=capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("lits: error:")]
    assert len(lines) == 1 and "encoder.ckpt" in lines[0] and "in_channels=3, base_channels=8" in lines[0], stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_the_console_script_import_does_not_import_lightning():
    # the `lits` script's `from experiments.commands.cli import main` looks `__path__` up on the module: that must not import the
    # LightningCLI side (~5 s), which `lits study`, `run` and `sweep` leave to the processes they start
    code = "from experiments.commands.cli import main; import sys; print('pytorch_lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_run_study_sweep_and_synth_import_neither_torch_lightning_monai_nor_wandb():
    # `lits run`, `study` and `sweep` only read YAML and start processes: their process imports none of the heavy
    # libraries (the fork server that starts their stages does, once); `lits synth` writes NIfTI files with numpy
    code = ("import sys; from experiments.commands.cli import COMMANDS, command_function\n"
            "for name in ('run', 'study', 'sweep', 'synth'): command_function(COMMANDS[name])\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'monai', 'wandb', 'experiments.commands.lightning_cli') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("args, message", [
    (["--name=../../escaped"], "--name: a name has only letters, digits, '-', '_' and '.', not starting with '.'; got '../../escaped'"),
    (["--name=/tmp/escaped"], "--name: a name has only letters, digits"),
    (["--data.batch_size=0"], "--data.batch_size must be 1 or more (samples per step); got 0"),
    (["--data.eval_batch_size=0"], "--data.eval_batch_size must be 1 or more"),
])
def test_bad_names_and_batch_sizes_are_one_line_and_write_nothing_outside(tmp_path, args, message, capsys):
    root = tmp_path / "a" / "runs"
    code, stderr = lits_in_process("fit", "--model=lightning_modules.BaselineUNet", "--model.init_args.base_channels=4",
                                   "--data.root=nowhere", f"--trainer.default_root_dir={root}", *args, capsys=capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("lits: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "runs" not in p.parts) in ([], ["a"])


def test_help_lists_every_subcommand_and_a_subcommand_gets_its_whole_parser(capsys):
    from experiments.commands.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("fit", "validate", "test", "preprocess"))
    for name in ("fit", "test"):  # only the subcommand asked for builds the Trainer's, model's and data's arguments
        with pytest.raises(SystemExit):
            main([name, "--help"])
        help_text = capsys.readouterr().out
        assert f"[options] {name} " in help_text and "--trainer.max_epochs" in help_text and "--data.batch_size" in help_text
