"""Train the phantom model that tests/test_real_ct_transfer.py checks on real CT, and store it in tests/data.

    python -m tests.data.make_phantom_model

It runs the README's single-model command (``lits fit --config experiments/quickstart.yaml``: the baseline
U-Net trained on the embedded phantom only) in a temporary folder and keeps its best checkpoint, trimmed to
what ``lits predict`` reads (weights as float16, hyperparameters, the suite's record): ~4 MB instead of 23.
The checkpoint records the phantom version and a fingerprint of the recipe; the transfer test refuses a stale
model, so a change to the phantom or the quickstart recipe must retrain it here before the test passes again.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from datamodules.io.phantom import PHANTOM_VERSION

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "experiments" / "quickstart.yaml"
MODEL = Path(__file__).parent / "phantom-quickstart-unet.ckpt"
KEPT = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "lits_suite", "pytorch-lightning_version")


def recipe_fingerprint() -> dict:
    """What the stored model was trained from: the phantom version and the recipe file's SHA-256."""
    return {"phantom_version": PHANTOM_VERSION, "recipe_sha256": hashlib.sha256(RECIPE.read_bytes()).hexdigest()}


def trim(checkpoint_path: Path, out: Path) -> None:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    kept = {key: checkpoint[key] for key in KEPT if key in checkpoint}
    kept["state_dict"] = {name: value.half() if value.is_floating_point() else value for name, value in kept["state_dict"].items()}
    kept["phantom_model"] = recipe_fingerprint()
    torch.save(kept, out)


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "experiments.commands.cli", "fit", "--config", str(RECIPE),
                        f"--trainer.default_root_dir={work}", "--trainer.enable_progress_bar=false"], check=True, cwd=ROOT)
        best = sorted(Path(work).glob("**/checkpoints/best.ckpt"))
        if len(best) != 1:
            sys.exit(f"expected one best.ckpt under {work}, found {len(best)}")
        trim(best[0], MODEL)
    print(f"wrote {MODEL} ({MODEL.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
