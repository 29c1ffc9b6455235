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

or, for several handovers, ``weights: {model.init_args.base_checkpoint: base,
model.init_args.miner_checkpoints: [fold_0, fold_1]}`` (a list of stages gives a list of paths).

Everything lands in ``<trainer.default_root_dir>/<name>/`` (default ``runs/<name>``): a folder
per stage (a complete ``lits fit`` run folder) and the final ``metrics.json`` (the last stage's
figures, and each earlier stage's under ``stage_metrics``). Overrides given on the command line reach every stage; one prefixed with a stage's name
(``--segmentation.model.init_args.lr=0.01``) reaches that stage alone. ``--<stage>_ckpt=PATH``
(e.g. ``--base_ckpt=runs/unet/checkpoints/best.ckpt``) skips that stage and hands PATH on in place
of its best checkpoint. A rerun skips finished stages (those with a whole ``metrics.json``: one cut short by a kill
counts as unfinished) and resumes an unfinished one from its ``last.ckpt``.

The file's shape is declared in ``experiments/commands/yaml_schema.py`` (``Experiment``): unknown keys, values of
another type and names that are not folder names (``name: ../x``) are refused in one line before any stage starts.

Each stage runs as its own ``lits fit`` process, so DDP launches, crashes and memory stay per stage
(forked from a fork server that has the suite imported: ``experiments/commands/processes.py``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


from datamodules.errors import CheckpointError, ConfigError, DataError, SuiteError
from datamodules.io.atomic import read_state, write_json_atomically
from experiments.commands.names import check_name, inside
from experiments.commands.processes import run_cli
from experiments.commands.wandb_mode import yaml_command
from experiments.commands.yaml_schema import Experiment, read_yaml, validate

# Set by `wandb agent` for the one run it started; stage processes must not all claim that run.
AGENT_ENV = ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH")


def normalise_overrides(argv: list[str]) -> list[str]:
    """``--key value`` and ``--key=value`` -> ``--key=value``, so overrides can be searched and forwarded."""
    result, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --data.root=DIR")
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
    raise ConfigError(f"{experiment}: config file {path} not found (relative to the current folder or the experiment file)")


def load_experiment(path: str | Path) -> tuple[str, list[dict]]:
    """Read and check an experiment file against its schema (``yaml_schema.Experiment``): (name, stages) with config
    paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found; pass a YAML with a `stages:` list, e.g. experiments/pu_net.yaml")
    spec = read_yaml(path)
    spec = {} if spec is None else spec
    if isinstance(spec, dict) and "stages" not in spec and "model" in spec:  # a plain `lits fit` config is a one-stage experiment
        spec = {"stages": [{"name": "fit", "config": str(path)}]}
    if not isinstance(spec, dict) or not spec.get("stages"):
        raise ConfigError(f"{path}: no `stages:` list (nor a `model:` of a plain `lits fit` config)")
    experiment = validate(Experiment, spec, path)
    stages = [stage.model_dump() for stage in experiment.stages]
    seen: list[str] = []
    for stage in stages:
        name = stage["name"]
        if name in seen:
            raise ConfigError(f"{path}: every stage needs a unique `name:` (got {name!r} twice)")
        configs = stage["config"]
        stage["config"] = [_resolve(c, path) for c in ([configs] if isinstance(configs, str) else configs)]
        weights = dict(stage["weights"])  # argument -> stage, or list of stages
        if stage["weights_from"]:
            if not stage["weights_arg"]:
                raise ConfigError(f"{path}: stage {name} takes weights_from {stage['weights_from']!r} but has no weights_arg naming the argument that receives them")
            weights[stage["weights_arg"]] = stage["weights_from"]
        for argument, sources in weights.items():
            if any(s not in seen for s in ([sources] if isinstance(sources, str) else sources)):
                raise ConfigError(f"{path}: stage {name} takes weights from {sources!r}, which must name earlier stages")
        stage["weights"] = weights
        seen.append(name)
    return experiment.name or check_name(path.stem, f"{path}: name (from the file's name)"), stages


def stage_overrides(overrides: list[str], stage: str, stage_names: list[str]) -> list[str]:
    """The overrides one stage receives: the common ones, and its own with the ``<stage>.`` prefix removed."""
    result = []
    for arg in overrides:
        key = arg[2:].split("=", 1)[0]
        prefix = key.split(".", 1)[0]
        if prefix in stage_names and "." in key:
            if prefix == stage:
                result.append("--" + arg[len(prefix) + 3:])
        elif not (key.endswith("_ckpt") and key[: -len("_ckpt")] in stage_names):
            result.append(arg)
    return result


def given_checkpoints(overrides: list[str], stage_names: list[str]) -> dict[str, str]:
    """``--<stage>_ckpt=PATH`` options: stages replaced by an existing checkpoint."""
    given = {}
    for name in stage_names:
        path = override_value(overrides, f"{name}_ckpt")
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--{name}_ckpt={path}: no such checkpoint file; pass the .ckpt of a finished run (e.g. its checkpoints/best.ckpt)")
            given[name] = path
    return given


def read_metrics(folder: Path) -> dict | None:
    """The figures of a finished run or stage (its ``metrics.json``); None, with a one-line warning for a file cut
    short by a kill or emptied, when it is not finished: it is then run again."""
    figures = read_state(folder / "metrics.json", "metrics.json")
    if figures is not None and not isinstance(figures, dict):
        warnings.warn(f"{folder / 'metrics.json'}: not a mapping of figures; treating it as not done", stacklevel=2)
        return None
    return figures


def finished_figures(folder: Path, run: str) -> dict:
    """The figures of a run that has just ended well; a one-line SuiteError when its metrics.json is missing or cut."""
    figures = read_metrics(folder)
    if figures is None:
        raise SuiteError(f"{run}: ended, but {folder / 'metrics.json'} is missing or cut short; run the study again to redo it")
    return figures


def best_checkpoint(run_folder: Path, stage: str, given: dict[str, str]) -> str:
    # absolute: the path is recorded in the next stage's hyperparameters (e.g. a cascade's liver_checkpoint)
    if stage in given:
        return str(Path(given[stage]).resolve())
    best = (read_metrics(run_folder / stage) or {}).get("best_checkpoint")
    if not best:
        raise CheckpointError(f"{run_folder / stage / 'metrics.json'} names no best checkpoint to hand on; delete it to train stage {stage} again")
    return str(Path(best).resolve())


def stage_command(stage: dict, folder: Path, run_folder: Path, overrides: list[str], given: dict[str, str] | None = None) -> list[str]:
    command = ["fit"]
    for config in stage["config"]:
        command += ["--config", str(config)]
    command += list(stage.get("args", []))
    command += [f"--name={stage['name']}", f"--run_dir={folder}"]
    for argument, sources in stage["weights"].items():
        paths = [best_checkpoint(run_folder, s, given or {}) for s in ([sources] if isinstance(sources, str) else sources)]
        value = paths[0] if isinstance(sources, str) else "[" + ",".join(paths) + "]"
        command.append(f"--{argument}={value}")
    command += overrides
    if (folder / "checkpoints" / "last.ckpt").is_file():
        command.append(f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}")
    return command


def run_experiment(path: str | Path, argv: list[str], run_folder: Path | None = None) -> Path:
    """Run (or resume) every stage; ``run_folder`` defaults to ``<trainer.default_root_dir>/<name>``."""
    name, stages = load_experiment(path)
    overrides = normalise_overrides(argv)
    root = Path(override_value(overrides, "trainer.default_root_dir") or "runs")
    run_folder = run_folder or inside(root, root / name)
    names = [s["name"] for s in stages]
    given = given_checkpoints(overrides, names)
    if names[-1] in given:
        raise ConfigError(f"--{names[-1]}_ckpt would skip the last stage, leaving nothing to run")
    run_folder.mkdir(parents=True, exist_ok=True)
    for index, stage in enumerate(stages, 1):
        folder = inside(run_folder, run_folder / stage["name"], f"stage {stage['name']}'s folder")
        if stage["name"] in given:
            print(f"[lits run] stage {index}/{len(stages)} {stage['name']}: replaced by {given[stage['name']]}")
            continue
        if read_metrics(folder) is not None:
            print(f"[lits run] stage {index}/{len(stages)} {stage['name']}: finished earlier, skipped")
            continue
        command = stage_command(stage, folder, run_folder, stage_overrides(overrides, stage["name"], names), given)
        resumed = " (resuming from last.ckpt)" if any(a.startswith("--ckpt_path=") for a in command) else ""
        print(f"[lits run] stage {index}/{len(stages)} {stage['name']}{resumed}", flush=True)
        code = run_cli(command, {k: v for k, v in os.environ.items() if k not in AGENT_ENV})
        if code:
            print(f"lits: error: stage {stage['name']} of {path} failed (exit {code}); fix it and rerun the same command to resume", file=sys.stderr)
            sys.exit(code)
    figures = {s["name"]: read_metrics(run_folder / s["name"]) for s in stages if s["name"] not in given}
    if figures[names[-1]] is None:
        raise DataError(f"{run_folder / names[-1] / 'metrics.json'}: the last stage ended without its figures; rerun the same command")
    final = dict(figures[names[-1]])
    final["stages"] = {s["name"]: str(run_folder / s["name"]) for s in stages if s["name"] not in given}
    # each earlier stage's own figures beside the final ones (a cascade's liver network, a mined base, ...)
    final["stage_metrics"] = {s["name"]: figures[s["name"]] for s in stages[:-1] if s["name"] not in given}
    write_json_atomically(run_folder / "metrics.json", final)
    print(f"[lits run] done: {run_folder / 'metrics.json'}")
    if "WANDB_SWEEP_ID" in os.environ:
        report_to_agent(final)
    return run_folder


def report_to_agent(figures: dict) -> None:
    """Under `wandb agent`: the final figures become the summary of the run the agent started."""
    import wandb

    run = wandb.init()
    run.summary.update({k: v for k, v in figures.items() if isinstance(v, (int, float))})
    run.finish()


def run_main(argv: list[str]) -> None:
    yaml_command(argv, __doc__, run_experiment)
