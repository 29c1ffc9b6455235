"""3D training and evaluation end to end (issue 11, section 2): a tiny 3D liver U-Net through `lits fit`, and
the one-line errors of inconsistent 3D settings."""

import csv
import json

import pytest
import yaml

from tests.synthetic import tiny_volume, write_pair
from tests.lits_commands import lits

# 32x32x12 voxels at 4 mm slices: 48 mm, some 19 slices at 2.5 mm, so 16x32x32 crops fit (16x16x16 would leave
# InstanceNorm a single voxel at the U-Net's bottom)
SHAPE = (32, 32, 12)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("liver3d")
    for i in range(5):
        write_pair(folder / "data", str(i), *tiny_volume(i, shape=SHAPE))
    config = {
        "seed_everything": 3,
        "model": {"class_path": "lightning_modules.BaselineUNet",
                  "init_args": {"base_channels": 4, "spatial_dims": 3, "lr": 0.003, "num_overlays": 1}},
        "data": {"root": str(folder / "data"), "cache_dir": str(folder / "cache"), "split": [1, 1, 3], "image_size": 32,
                 "spatial_dims": 3, "volume_3d": {"crop_size": [16, 32, 32]}, "batch_size": 2, "num_workers": 0, "preprocess_workers": 1},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "accelerator": "cpu", "devices": 1, "logger": None,
                    "default_root_dir": str(folder / "runs"), "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0},
    }
    (folder / "tiny3d.yaml").write_text(yaml.safe_dump(config))
    return folder


def lits_main(*args, capsys=None) -> tuple[int, str]:
    """`lits ARGS` in this process: (exit code, stderr); 0 when it returns."""
    from experiments.commands.cli import main

    if capsys is not None:
        capsys.readouterr()
    try:
        main(list(args))
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err if capsys is not None else ""
    return 0, capsys.readouterr().err if capsys is not None else ""


@pytest.fixture(scope="module")
def fitted(workspace):
    """A 1-epoch 3D fit (2 training steps), in this process; its run folder."""
    run = workspace / "runs" / "fit3d"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        patch.setenv("WANDB_MODE", "disabled")  # W&B offline is exercised in test_cli.py
        code, _ = lits_main("fit", "--config", "tiny3d.yaml", f"--run_dir={run}")
    assert code == 0
    return run


def test_3d_fit_writes_volume_figures(fitted):
    run = fitted
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("val", "test"):
        for name in ("dice_volume", "hd95_volume_mm", "dice_slice", "loss"):
            value = metrics[f"{stage}/{name}"]
            assert value == value and abs(value) != float("inf") and value >= 0, (stage, name, value)
        assert 0 <= metrics[f"{stage}/dice_volume"] <= 1
    assert metrics["test/tp_voxels"] + metrics["test/fn_voxels"] > 0  # scored against the whole original volume
    assert (run / "test_per_volume.csv").read_text().count("\n") == 4  # header + 3 test volumes
    assert (run / "test_overlays.png").exists()


def _one_error(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("lits: error:")]
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.init_args.spatial_dims=2"], "--model.init_args.spatial_dims=2 but --data.spatial_dims=3"),
        (["--data.volume_3d.crop_size=[16,32,24]"], "--data.volume_3d.crop_size"),
        (["--data.sampling=liver_roi"], "--data.spatial_dims=3 takes --data.sampling=slices, got liver_roi"),
        (["--data.context_slices=1", "--model.init_args.in_channels=3"], "--data.context_slices=1 is not supported yet"),
        (["--model=lightning_modules.CMUNet", "--model.init_args.spatial_dims=3", "--model.init_args.base_channels=4",
          "--trainer.num_sanity_val_steps=1"], "CMUNet is 2D only for now"),
    ],
)
def test_inconsistent_3d_settings_are_one_line_errors(workspace, monkeypatch, capsys, args, message):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B offline is exercised in test_cli.py
    line = _one_error(*lits_main("fit", "--config", "tiny3d.yaml", f"--run_dir={workspace / 'runs' / 'bad'}", *args, capsys=capsys))
    assert message in line, line
    assert not list((workspace / "runs" / "bad").rglob("*.ckpt"))


def test_volumes_thinner_than_the_crop_train_padded(workspace, monkeypatch):
    """Some 19 slices at 2.5 mm against 64-slice crops and windows (issue 21): the crops are padded with air, the sliding
    window pads and crops back, and every figure is finite and scored on the original volumes."""
    import nibabel as nib

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B offline is exercised in test_cli.py
    run = workspace / "runs" / "thin3d"
    code, _ = lits_main("fit", "--config", "tiny3d.yaml", f"--run_dir={run}", "--data.volume_3d.crop_size=[64,32,32]",
                        "--trainer.limit_train_batches=1", "--model.init_args.num_overlays=0")
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("val", "test"):
        for name in ("dice_volume", "hd95_volume_mm", "dice_slice", "loss"):
            value = metrics[f"{stage}/{name}"]
            assert value == value and abs(value) != float("inf") and value >= 0, (stage, name, value)
    rows = list(csv.DictReader(open(run / "test_per_volume.csv")))
    assert len(rows) == 3
    liver = sum(int((nib.load(workspace / "data" / f"segmentation-{row['volume']}.nii.gz").get_fdata() >= 1).sum()) for row in rows)
    assert metrics["test/tp_voxels"] + metrics["test/fn_voxels"] == liver  # the original volumes, not their padding


def test_3d_test_under_ddp_matches_one_process(fitted, workspace):
    """Two CPU processes: each rank predicts its whole volumes, the per-slice records are gathered, and the
    figures equal the fit's one-process test of the same checkpoint (3 test volumes: rank 1 gets a padded repeat)."""
    fit = json.loads((fitted / "metrics.json").read_text())
    result = lits("test", "--config", "tiny3d.yaml", f"--ckpt_path={fit['best_checkpoint']}", f"--run_dir={workspace / 'runs' / 'ddp3d'}",
                  "--trainer.devices=2", "--trainer.strategy=ddp_fork", "--trainer.accelerator=cpu", cwd=workspace, env={"WANDB_MODE": "disabled"})  # ddp_fork: the other rank forked, not a new interpreter; the launch itself is tested in test_stages.py
    assert result.returncode == 0, result.stderr[-5000:]
    ddp = json.loads((workspace / "runs" / "ddp3d" / "metrics.json").read_text())
    assert ddp["world_size"] == 2
    names = [k for k in fit if k.startswith("test/") and k != "test/loss"]
    assert len(names) == 8  # 5 figures and 3 voxel counts
    for name in names:
        assert ddp[name] == pytest.approx(fit[name], abs=1e-6), name
    rows = {name: list(csv.DictReader(open(workspace / "runs" / name / "test_per_volume.csv"))) for name in ("fit3d", "ddp3d")}
    assert len(rows["ddp3d"]) == 3 and rows["ddp3d"] == rows["fit3d"]
