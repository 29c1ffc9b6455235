"""``lits study STUDY.yaml [--key=value ...]``: every model of a study for N paired seeds, then a Table-1-style table.

A study file::

    name: cmunet_table1
    baseline: U-Net                      # the model the others are tested against
    seeds: [0, 1, 2]                     # or an integer N for seeds 0..N-1
    models:                              # label -> experiment (a `lits fit` config or a `lits run` stages file)
      U-Net: experiments/baseline_unet.yaml
      PU-Net: experiments/pu_net.yaml
      CMU-Net: experiments/cmunet.yaml
    args: ["--trainer.max_epochs=100"]   # optional overrides for every run
    inc: false                           # true for mask-mining experiments: see below
    table: segmentation                  # or lits_liver_lesion (the mask-mining paper's Table 1): see below
    rows: {U-Net: U-Net, ...}            # optional: which models are table rows, under which label
    share_stages: false                  # true: stages several models have alike are trained once per seed
    jobs: 1                              # runs at once (--jobs=K overrides; see experiments/study_jobs.py)
    runs_per_device: 1                   # or: runs per GPU (the CPU: one device), so jobs = devices x N

Seeds are paired: seed ``s`` sets ``--seed_everything=s`` (the same initial weights for the layers
models share, which the backbone builds in the same order) and ``--data.split_seed=s`` (the same
volumes in every split). Runs land in ``<default_root_dir>/<name>/<model>/seed_<s>/`` and a killed
study resumes: finished runs are skipped, an unfinished one continues from its last checkpoint.

The table (``results.md``, ``results.csv``, ``results.json`` in the study folder, printed at the
end) gives mean ± std over seeds of the test Dice and Hausdorff, per slice (px) and per volume
(mm), and for each model against the baseline the paired t-test and Wilcoxon signed-rank p-values
(scipy) over the seeds. With ``inc: true`` (mask-mining experiments) every model gets two rows,
as in the mask-mining paper's Table 1: before mining (the base evaluated in the same run,
``test/before/*``) and "Inc." after, tested against the row before; under the table a second one gives
each model's gain from mining: after minus before per seed, mean ± std, with the same p-values.

Spread over machines, as a W&B grid sweep over model and seed:

    lits study STUDY.yaml --sweep [--key=value ...]
        writes <study folder>/sweep.yaml; online it registers the sweep and prints the
        `wandb agent` command to start on each machine; offline it runs the grid here with
        `lits sweep`, then prints the table.
    lits study STUDY.yaml --model=LABEL --seed=S [--key=value ...]
        one run of the study (what each agent runs).
    lits study STUDY.yaml --from_sweep=ENTITY/PROJECT/SWEEP_ID
        the table from the sweep's finished runs (their W&B summaries).
With a shared run folder, plain ``lits study STUDY.yaml`` also builds the table: it skips finished runs.

Tables (``table:``, default ``segmentation``): ``segmentation`` is the one above (slice and volume
Dice and Hausdorff of a one-target model on the test volumes). ``lits_liver_lesion`` is the
mask-mining paper's Table 1 for liver-lesion models (a 2D cascade, the combined model): per-case
liver and lesion Dice (the LiTS ``*/liver/dice``, ``*/lesion/dice``) on the training, validation and
test volumes. For its training-volume columns the study evaluates the final stage (its best
checkpoint) of each finished run of a table row's model (not of a model trained for the figure
only) on the training volumes once more, with ``lits test --config <final stage>/config.yaml
--ckpt_path <best> --data.test_split=train --run_dir <run>/train_eval``; that evaluation's
``test/...`` figures are the run's ``train/...`` ones (``test/before/...``: the mined base's; its
error-type reports are the training volumes'), and a rerun skips a run whose
``train_eval/metrics.json`` exists. Without a test split
(the paper's ``--data.split=[0.85,0.15,0]``) the test columns read n/a. It also draws the paper's
Fig. 4, ``lesion_error_types.png``: per model labelled ``"<setup>, <mining loss>"``, the lesion FP /
FN / TP voxels of the validation volumes before and after mining, summed over seeds, each pair of
bars normalised to its larger bar. ``rows:`` picks and renames the models that become table rows
(``rows: {2D: "2D, dice"}``; default every model under its own label), so a study can train more
models (e.g. both mining losses for the figure) than its table shows. A table ``--from_sweep`` (W&B
summaries) has no training-volume columns (n/a) and no figure: with a shared run folder, build it with
plain ``lits study STUDY.yaml`` instead.

``share_stages: true`` trains a stage once per seed when several models have it with the same settings:
a model's leading stages (all but its last) that an earlier model of the study has with the same configs,
args, handed-over stages and overrides are taken from that model's run at the same seed (``lits run
--<stage>_ckpt``). With it, both mining losses mine the same base (the paper's Fig. 4 compares them on
one base) and a mask-mining study trains each base once. A run that trained such a stage itself keeps it.

Overrides given to the study (``args:`` and the command line) reach every run; one scoped to a stage
(``--mine.trainer.max_epochs=2``, see ``lits run``) reaches the runs whose experiment has that stage
and is dropped for a model whose experiment has no such stage while another model's does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

from datamodules import DataError
from experiments.commands.processes import call_forked, run_cli
from experiments.commands.stages import AGENT_ENV, load_experiment, normalise_overrides, override_value, run_experiment, stage_overrides
from experiments.commands.study_jobs import run_parallel, runs_at_once
from experiments.commands.study_tables import TABLES, before_and_after, lesion_error_counts, summarize, with_lesion_counts, write_tables


def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"study file {path} not found; pass a YAML with `models:` and `seeds:`, e.g. experiments/studies/quickstart.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    models = spec.get("models")
    if not isinstance(models, dict) or not models:
        raise DataError(f"{path}: no `models:` mapping of label -> experiment file")
    for label, experiment in models.items():
        found = [p for p in (Path(experiment), path.parent / experiment) if p.is_file()]
        if not found:
            raise DataError(f"{path}: model {label!r} names experiment file {experiment}, which does not exist")
        models[label] = found[0]
        load_experiment(found[0])  # a broken experiment fails now, not after hours of other models
    baseline = spec.get("baseline", next(iter(models)))
    if baseline not in models:
        raise DataError(f"{path}: baseline {baseline!r} is not one of the models {list(models)}")
    seeds = spec.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    table = spec.get("table", "segmentation")
    if table not in TABLES:
        raise DataError(f"{path}: table {table!r} is not one of {', '.join(TABLES)}")
    rows = spec.get("rows") or {label: label for label in models}
    if not isinstance(rows, dict) or any(model not in models for model in rows.values()):
        raise DataError(f"{path}: `rows:` maps a table row's label to one of the models {list(models)}; got {rows!r}")
    if not spec.get("inc") and baseline not in rows.values():
        raise DataError(f"{path}: the baseline {baseline!r} must be one of the table's rows {list(rows.values())}")
    return {"name": spec.get("name") or path.stem, "models": models, "baseline": baseline, "seeds": seeds,
            "args": list(spec.get("args", [])), "inc": bool(spec.get("inc", False)), "table": table, "rows": rows,
            "share_stages": bool(spec.get("share_stages", False)), "jobs": spec.get("jobs"),
            "runs_per_device": spec.get("runs_per_device")}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


STUDY_OPTIONS = ("model", "seed", "sweep", "from_sweep", "trial_dir", "jobs", "runs_per_device")


def _split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The study's own options (--model, --seed, --sweep, --from_sweep, --trial_dir, --jobs, --runs_per_device) and the overrides for every run."""
    options, rest = {}, []
    for arg in normalise_overrides(argv):
        key, _, value = arg[2:].partition("=")
        if key in STUDY_OPTIONS:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def model_overrides(study: dict, label: str, overrides: list[str]) -> list[str]:
    """The overrides one model's runs receive: all but those scoped to a stage that another model of the
    study has and this model's experiment lacks (``--liver.trainer.max_epochs=2`` or ``--liver_ckpt=PATH``
    for a model without a ``liver`` stage)."""
    stages = {label: {s["name"] for s in load_experiment(path)[1]} for label, path in study["models"].items()}
    foreign = set().union(*stages.values()) - stages[label]

    def scoped_to_foreign(arg: str) -> bool:
        key = arg[2:].split("=", 1)[0]
        return ("." in key and key.split(".", 1)[0] in foreign) or (key.endswith("_ckpt") and key[: -len("_ckpt")] in foreign)

    return [arg for arg in overrides if not scoped_to_foreign(arg)]


def run_one(study: dict, folder: Path, label: str, seed: int, overrides: list[str]) -> dict:
    """One model at one seed (resumable); returns its final metrics (and, for a table with training-volume
    columns and a model that is one of its rows, the ``train/...`` figures of its training-volume evaluation)."""
    if label not in study["models"]:
        raise DataError(f"unknown model {label!r}; the study has {list(study['models'])}")
    print(f"[lits study] {label}, seed {seed}", flush=True)
    run_folder = folder / _slug(label) / f"seed_{seed}"
    seeded = [f"--seed_everything={seed}", f"--data.split_seed={seed}"]
    shared = shared_stages(study, folder, label, seed, overrides) if study.get("share_stages") else {}
    for stage, (source, checkpoint) in shared.items():
        print(f"[lits study] {label}, seed {seed}: stage {stage} is {source}'s (same settings), not trained again", flush=True)
    given = [f"--{stage}_ckpt={checkpoint}" for stage, (_, checkpoint) in shared.items()]
    run_experiment(study["models"][label], model_overrides(study, label, overrides) + seeded + given, run_folder=run_folder)
    final = json.loads((run_folder / "metrics.json").read_text())
    table = TABLES[study.get("table", "segmentation")]
    if table.evaluates_training_volumes and label in (study.get("rows") or {label: label}).values():  # table rows only
        final |= evaluate_training_volumes(run_folder)
    if table.figure == "lesion_error_types":
        final = with_lesion_counts(final, _final_stage(run_folder))
    return final


def _stage_settings(stage: dict, overrides: list[str], names: list[str]) -> tuple:
    """Everything that decides what a stage trains: its configs, args, handed-over stages and the overrides it receives."""
    weights = tuple(sorted((k, tuple([v] if isinstance(v, str) else v)) for k, v in stage["weights"].items()))
    return (stage["name"], tuple(str(Path(c).resolve()) for c in stage["config"]), tuple(stage.get("args", [])), weights,
            tuple(stage_overrides(overrides, stage["name"], names)))


def shared_stages(study: dict, folder: Path, label: str, seed: int, overrides: list[str]) -> dict[str, tuple[str, str]]:
    """``share_stages: true``: the leading stages (all but the last) this model has in common with an earlier
    model of the study, with the same settings, finished in that model's run at the same seed:
    ``{stage: (that model, its best checkpoint)}``, handed to ``lits run`` as ``--<stage>_ckpt``. Nothing
    when this run has trained any of them itself already (a resumed study keeps its runs as they were)."""
    _, stages = load_experiment(study["models"][label])
    names = [s["name"] for s in stages]
    own = model_overrides(study, label, overrides)
    run_folder = folder / _slug(label) / f"seed_{seed}"
    if any((run_folder / s["name"] / "metrics.json").is_file() for s in stages[:-1]):
        return {}
    best: dict[str, tuple[str, str]] = {}
    for other in study["models"]:
        if other == label:
            break
        _, other_stages = load_experiment(study["models"][other])
        other_names = [s["name"] for s in other_stages]
        theirs = model_overrides(study, other, overrides)
        common: dict[str, tuple[str, str]] = {}
        for mine, their in zip(stages[:-1], other_stages):
            finished = folder / _slug(other) / f"seed_{seed}" / their["name"] / "metrics.json"
            if _stage_settings(mine, own, names) != _stage_settings(their, theirs, other_names) or not finished.is_file():
                break
            checkpoint = json.loads(finished.read_text()).get("best_checkpoint")
            if not checkpoint or not Path(checkpoint).is_file():
                break
            common[mine["name"]] = (other, str(Path(checkpoint).resolve()))
        if len(common) > len(best):
            best = common
    return best


TRAIN_EVAL = "train_eval"  # the run folder's sub-folder of the training-volume evaluation


def evaluate_training_volumes(run_folder: Path) -> dict[str, float]:
    """The final stage's best checkpoint evaluated on the training volumes (``lits test --data.test_split=train``),
    once per run: its ``test/...`` figures as ``train/...``."""
    target = run_folder / TRAIN_EVAL
    if (target / "metrics.json").is_file():
        print(f"[lits study] training-volume evaluation of {run_folder}: finished earlier, skipped")
    else:
        stage = _final_stage(run_folder)
        best = json.loads((stage / "metrics.json").read_text()).get("best_checkpoint")
        if not best:
            raise DataError(f"{stage}/metrics.json names no best checkpoint to evaluate on the training volumes")
        command = ["test", "--config", str(stage / "config.yaml"), f"--ckpt_path={best}",
                   "--data.test_split=train", f"--name={TRAIN_EVAL}", f"--run_dir={target}"]
        print(f"[lits study] training-volume evaluation of {run_folder}", flush=True)
        code = run_cli(command, {k: v for k, v in os.environ.items() if k not in AGENT_ENV})
        if code:
            print(f"lits: error: the training-volume evaluation of {run_folder} failed (exit {code}); fix it and rerun the study to resume", file=sys.stderr)
            sys.exit(code)
    figures = json.loads((target / "metrics.json").read_text())
    return {f"train/{k[len('test/'):]}": v for k, v in figures.items() if k.startswith("test/")}


def sweep_config(path: str | Path, study: dict, overrides: list[str]) -> dict:
    """A W&B grid sweep over model and seed whose every run is `lits study PATH --model=.. --seed=..`."""
    return {
        "name": study["name"],
        "program": "lits",
        "method": "grid",
        "metric": {"name": TABLES[study.get("table", "segmentation")].sweep_metric, "goal": "maximize"},
        "parameters": {"model": {"values": list(study["models"])}, "seed": {"values": study["seeds"]}},
        "command": ["lits", "study", str(path), *overrides, "${args}"],
    }


def run_study(path: str | Path, argv: list[str]) -> Path:
    study = load_study(path)
    options, argv_overrides = _split_options(argv)
    overrides = normalise_overrides(study["args"]) + argv_overrides
    folder = Path(override_value(overrides, "trainer.default_root_dir") or "runs") / study["name"]
    if "model" in options or "seed" in options:
        if "model" not in options or "seed" not in options:
            raise DataError("one run of a study needs both --model=LABEL and --seed=S")
        final = run_one(study, folder, options["model"], _as_seed(options["seed"]), overrides)
        if options.get("trial_dir"):  # `lits sweep` reads each trial's figures from its own folder
            Path(options["trial_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(options["trial_dir"]) / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        return folder
    if "from_sweep" in options:  # no figure: it needs the run folders, which a sweep spread over machines does not have here
        report(study, folder, results_from_wandb(options["from_sweep"], study), overrides, figure=False)
        return folder
    if "sweep" in options:
        if run_as_sweep(path, study, folder, argv_overrides):
            return folder
    jobs = _runs_at_once(options, study)
    if jobs > 1:
        results = run_parallel(path, study, folder, argv_overrides, jobs, _slug)
    else:
        results = {label: {} for label in study["models"]}
        for seed in study["seeds"]:
            for label in study["models"]:
                results[label][seed] = run_one(study, folder, label, seed, overrides)
    # forked: the figure and the W&B run need torch and W&B, which the fork server has imported for the runs
    call_forked(report, study, folder, results, overrides)
    return folder


def _runs_at_once(options: dict, study: dict) -> int:
    """Runs at once from the command line's --jobs / --runs_per_device if it has either, else from the study file's."""
    source = options if "jobs" in options or "runs_per_device" in options else study
    return runs_at_once(source.get("jobs"), source.get("runs_per_device"))


def _as_seed(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"--seed must be an integer, got {value!r}") from None


def run_as_sweep(path: str | Path, study: dict, folder: Path, overrides: list[str]) -> bool:
    """Write the grid sweep; online, register it and stop (True); offline, run it here (False: go on to the table)."""
    from experiments.commands.sweep import run_sweep

    folder.mkdir(parents=True, exist_ok=True)
    config = sweep_config(path, study, overrides)
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(config, sort_keys=False))
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        import wandb

        sweep_id = wandb.sweep(config, project=override_value(overrides, "wandb_project") or "lits-suite")
        print(f"[lits study] sweep {sweep_id} registered ({sweep_file}). On each machine run:\n"
              f"  wandb agent <entity>/<project>/{sweep_id}\nthen build the table with:\n"
              f"  lits study {path} --from_sweep=<entity>/<project>/{sweep_id}")
        return True
    count = len(study["models"]) * len(study["seeds"])
    run_sweep(sweep_file, [f"--count={count}", f"--trainer.default_root_dir={folder / 'sweep'}"])
    return False


def results_from_wandb(sweep_path: str, study: dict) -> dict[str, dict[int, dict]]:
    """Each (model, seed)'s final figures from the summaries of a W&B sweep's finished runs."""
    import wandb

    results: dict[str, dict[int, dict]] = {label: {} for label in study["models"]}
    for run in wandb.Api().sweep(sweep_path).runs:
        label, seed = run.config.get("model"), run.config.get("seed")
        if run.state == "finished" and label in results and seed is not None:
            results[label][int(seed)] = dict(run.summary)
    missing = [f"{label}/seed {s}" for label in results for s in study["seeds"] if s not in results[label]]
    if missing:
        raise DataError(f"sweep {sweep_path} has no finished run for {', '.join(missing)}; let its agents finish, then rerun")
    return results


def report(study: dict, folder: Path, results: dict[str, dict[int, dict]], overrides: list[str], figure: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table_kind = TABLES[study.get("table", "segmentation")]
    rows_of = study.get("rows") or {label: label for label in results}
    baseline = next((row for row, model in rows_of.items() if model == study["baseline"]), study["baseline"])
    chosen, references = {row: results[model] for row, model in rows_of.items()}, None
    if study["inc"]:
        chosen, references = before_and_after(chosen, table_kind.metrics)
    rows = summarize(chosen, baseline, references, table_kind.metrics)
    table = write_tables(folder, rows, baseline, study["inc"], table_kind.metrics, table_kind.caption)
    # here, not at the top: the figures need torch and matplotlib, a study's runs do not
    from experiments.commands.study_figure import lesion_error_types_figure, qualitative_figure

    figures = []
    if table_kind.figure == "qualitative" and figure:
        first_seed = study["seeds"][0]
        finals = {label: _final_stage(folder / _slug(label) / f"seed_{first_seed}") for label in study["models"]}
        figures.append(qualitative_figure(finals, folder / "qualitative.png"))
    if table_kind.figure == "lesion_error_types":
        counts = lesion_error_counts(results)
        if counts:
            figures.append(lesion_error_types_figure(counts, folder / "lesion_error_types.png", seeds=len(study["seeds"])))
        else:
            print("[lits study] no run reports lesion voxel counts before and after mining: no lesion_error_types.png")
    log_to_wandb(study["name"], folder, rows, project=override_value(overrides, "wandb_project") or "lits-suite", figures=figures)
    print(f"\n{table}\n\n[lits study] tables in {folder}/results.{{md,csv,json}}" + "".join(f", figure {f}" for f in figures))
    return folder


def _final_stage(run_folder: Path) -> Path:
    stages = json.loads((run_folder / "metrics.json").read_text())["stages"]
    return Path(list(stages.values())[-1])


def log_to_wandb(name: str, folder: Path, rows: list[dict], project: str, figures: list[Path] | None = None) -> None:
    """The table and the figures as one W&B run of job type `study` (offline without a key, like every run)."""
    import wandb

    from experiments.commands.console import quiet_library_noise, wandb_offline_hint

    quiet_library_noise()  # W&B's offline chatter: the one line below names the run instead, as a run's does
    columns = list(dict.fromkeys(k for row in rows for k in row))
    run = wandb.init(project=project, name=name, job_type="study", dir=str(folder))
    logged = {"study/results": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])}
    for path in figures if figures is not None else [folder / "qualitative.png"]:
        if Path(path).is_file():
            logged[f"study/{Path(path).stem}"] = wandb.Image(str(path))
    run.log(logged)
    run.finish()
    hint = wandb_offline_hint(folder)
    if hint:
        print(f"[lits study] {hint}")


def study_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_study(argv[0], argv[1:])
