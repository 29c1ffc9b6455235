"""``lits run EXPERIMENT.yaml [--key=value ...]``: the stages of a multi-stage experiment, in order.

An experiment file lists stages; each stage is a ``lits fit`` of stacked config files::

    name: pu_net                       # the run folder's name (default: the file's name)
    stages:
      - name: encoder
        config: experiments/encoder_pretraining.yaml
      - name: segmentation
        config: [experiments/baseline_unet.yaml, experiments/pu_net_model.yaml]
        args: ["--model.init_args.freeze_encoder_epochs=0"]    # optional extra overrides
        weights_from: encoder                                   # best checkpoint of an earlier stage...
        weights_arg: model.init_args.encoder_checkpoint         # ...passed as this key (weights only)

Everything lands in ``<trainer.default_root_dir>/<name>/`` (default ``runs/<name>``): a folder
per stage (a complete ``lits fit`` run folder) and the final ``metrics.json`` (the last stage's
figures). Overrides given on the command line reach every stage. A rerun skips finished stages
(those with a ``metrics.json``) and resumes an unfinished one from its ``last.ckpt``.

Each stage runs as its own ``lits fit`` process, so DDP launches, crashes and memory stay per stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from datamodules import DataError


def normalise_overrides(argv: list[str]) -> list[str]:
    """``--key value`` and ``--key=value`` -> ``--key=value``, so overrides can be searched and forwarded."""
    result, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise DataError(f"unexpected argument {arg!r}; overrides look like --data.root=DIR")
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        result.append(arg)
        i += 1
    return result


def override_value(overrides: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0] == f"--{key}"]
    return values[-1] if values else None


def _resolve(path: str, experiment: Path) -> Path:
    for candidate in (Path(path), experiment.parent / path):
        if candidate.is_file():
            return candidate
    raise DataError(f"{experiment}: config file {path} not found (relative to the current folder or the experiment file)")


def load_experiment(path: str | Path) -> tuple[str, list[dict]]:
    """Read and check an experiment file: (name, stages) with config paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"experiment file {path} not found; pass a YAML with a `stages:` list, e.g. experiments/pu_net.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    if "stages" not in spec and "model" in spec:  # a plain `lits fit` config is a one-stage experiment
        spec = {"stages": [{"name": "fit", "config": str(path)}]}
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise DataError(f"{path}: no `stages:` list (nor a `model:` of a plain `lits fit` config)")
    seen: list[str] = []
    for stage in stages:
        name = stage.get("name")
        if not name or name in seen:
            raise DataError(f"{path}: every stage needs a unique `name:` (got {name!r})")
        configs = stage.get("config") or []
        stage["config"] = [_resolve(c, path) for c in ([configs] if isinstance(configs, str) else configs)]
        if stage.get("weights_from") and (stage["weights_from"] not in seen or not stage.get("weights_arg")):
            raise DataError(f"{path}: stage {name} takes weights_from {stage['weights_from']!r}, which must be an earlier stage, with a weights_arg")
        seen.append(name)
    return spec.get("name") or path.stem, stages


def stage_command(stage: dict, folder: Path, run_folder: Path, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "experiments.cli", "fit"]
    for config in stage["config"]:
        command += ["--config", str(config)]
    command += list(stage.get("args", []))
    command += [f"--name={stage['name']}", f"--run_dir={folder}"]
    if stage.get("weights_from"):
        best = json.loads((run_folder / stage["weights_from"] / "metrics.json").read_text())["best_checkpoint"]
        command.append(f"--{stage['weights_arg']}={best}")
    command += overrides
    if (folder / "checkpoints" / "last.ckpt").is_file():
        command.append(f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}")
    return command


def run_experiment(path: str | Path, argv: list[str], run_folder: Path | None = None) -> Path:
    """Run (or resume) every stage; ``run_folder`` defaults to ``<trainer.default_root_dir>/<name>``."""
    name, stages = load_experiment(path)
    overrides = normalise_overrides(argv)
    run_folder = run_folder or Path(override_value(overrides, "trainer.default_root_dir") or "runs") / name
    run_folder.mkdir(parents=True, exist_ok=True)
    for index, stage in enumerate(stages, 1):
        folder = run_folder / stage["name"]
        if (folder / "metrics.json").is_file():
            print(f"[lits run] stage {index}/{len(stages)} {stage['name']}: finished earlier, skipped")
            continue
        command = stage_command(stage, folder, run_folder, overrides)
        resumed = " (resuming from last.ckpt)" if any(a.startswith("--ckpt_path=") for a in command) else ""
        print(f"[lits run] stage {index}/{len(stages)} {stage['name']}{resumed}", flush=True)
        code = subprocess.run(command).returncode
        if code:
            print(f"lits: error: stage {stage['name']} of {path} failed (exit {code}); fix it and rerun the same command to resume", file=sys.stderr)
            sys.exit(code)
    final = json.loads((run_folder / stages[-1]["name"] / "metrics.json").read_text())
    final["stages"] = {s["name"]: str(run_folder / s["name"]) for s in stages}
    (run_folder / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"[lits run] done: {run_folder / 'metrics.json'}")
    return run_folder


def run_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_experiment(argv[0], argv[1:])
