"""``lits study STUDY.yaml [--key=value ...]``: every model of a study for N paired seeds, then a Table-1-style table.

The study file (its format: ``experiments/commands/study_config.py``) names the models, the seeds and the table.

Seeds are paired: seed ``s`` sets ``--seed_everything=s`` (the same initial weights for the layers
models share, which the backbone builds in the same order) and ``--data.split_seed``: ``s`` with
``split: per_seed`` (the default: a new train/val/test split per seed, the same for every model of that
seed), the study's ``split_seed`` (default 0) with ``split: fixed`` (one split for every run, only the
model seed varies: the papers' protocol, e.g. CMU-Net's 10 runs on one 10/2/5 split). Runs land in
``<default_root_dir>/<name>/<model>/seed_<s>/`` and a killed study resumes: finished runs are skipped,
an unfinished one continues from its last checkpoint; a run folder trained on another split seed (the
study's ``split:`` changed) is refused, not mixed into the table.

The table (``results.md``, ``results.csv``, ``results.json`` in the study folder, printed at the
end) gives mean ± std over seeds of the test Dice and Hausdorff, per slice (px) and per volume
(mm), and for each model against the baseline the paired t-test and Wilcoxon signed-rank p-values
(scipy) over the seeds, each run paired with the baseline's run of the same seed (a seed one of the
two lacks is left out, and the runs column says how many pairs remain: ``6 (5 paired)``). Its caption
names the split protocol ("one fixed split (split seed 0), 10 runs" or "a new split per seed, 3 runs").
With ``inc: true`` (mask-mining experiments) every model gets two rows, as in the mask-mining paper's
Table 1: before mining (the base evaluated in the same run, ``test/before/*``) and "Inc." after, tested
against the row before; under the table a second one gives each model's gain from mining: after minus
before per seed, mean ± std, with the same p-values.

Spread over machines, as a W&B grid sweep over model and seed:

    lits study STUDY.yaml --sweep [--key=value ...]
        writes <study folder>/sweep.yaml; online it registers the sweep and prints the
        `wandb agent` command to start on each machine; offline it runs the grid here with
        `lits sweep`, then prints the table.
    lits study STUDY.yaml --model=LABEL --seed=S [--key=value ...]
        one run of the study (what each agent runs).
    lits study STUDY.yaml --from_sweep=ENTITY/PROJECT/SWEEP_ID
        the table from the sweep's finished runs (their W&B summaries).
    lits study STUDY.yaml --launcher=slurm [--key=value ...]
        each run one SLURM job (submitit), the table when all have ended: the study file's
        ``slurm:`` gives the jobs' resources (experiments/commands/study_slurm.py, docs/cluster.md).
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

import os
import sys
from pathlib import Path

import yaml

# Light imports only: this process orchestrates (its runs are processes of their own). Torch, matplotlib and W&B are
# imported inside the functions of the report, which runs in a child forked from a server that has them imported.
from datamodules.errors import CheckpointError, ConfigError, DataError
from datamodules.io.atomic import write_json_atomically
from experiments.commands.names import inside
from experiments.commands.processes import call_forked, run_cli
from experiments.commands.stages import (AGENT_ENV, load_experiment, normalise_overrides, override_value, read_metrics, run_experiment,
                                         stage_overrides)
from experiments.commands.study_config import (as_seed, load_study, model_overrides, run_folder, seed_overrides, split_options,
                                               split_seed_of)
from experiments.commands.study_jobs import run_parallel, runs_at_once
from experiments.commands.study_slurm import launcher_of, run_on_cluster
from experiments.commands.study_sweep import results_from_wandb, run_as_sweep
from experiments.commands.study_tables import (TABLES, before_and_after, lesion_error_counts, split_protocol, summarize, with_lesion_counts,
                                               write_tables)
from experiments.commands.wandb_mode import yaml_command


def run_one(study: dict, folder: Path, label: str, seed: int, overrides: list[str]) -> dict:
    """One model at one seed (resumable); returns its final metrics (and, for a table with training-volume
    columns and a model that is one of its rows, the ``train/...`` figures of its training-volume evaluation)."""
    if label not in study["models"]:
        raise ConfigError(f"unknown model {label!r}; the study has {list(study['models'])}")
    print(f"[lits study] {label}, seed {seed}", flush=True)
    own_folder = run_folder(folder, label, seed)
    seeded = seed_overrides(study, seed)
    check_recorded_split(own_folder, split_seed_of(study, seed))
    shared = shared_stages(study, folder, label, seed, overrides) if study.get("share_stages") else {}
    for stage, (source, checkpoint) in shared.items():
        print(f"[lits study] {label}, seed {seed}: stage {stage} is {source}'s (same settings), not trained again", flush=True)
    given = [f"--{stage}_ckpt={checkpoint}" for stage, (_, checkpoint) in shared.items()]
    run_experiment(study["models"][label], model_overrides(study, label, overrides) + seeded + given, run_folder=own_folder)
    final = read_metrics(own_folder)  # run_experiment has just written it whole
    table = TABLES[study.get("table", "segmentation")]
    if table.evaluates_training_volumes and label in (study.get("rows") or {label: label}).values():  # table rows only
        final |= evaluate_training_volumes(own_folder)
    if table.figure == "lesion_error_types":
        final = with_lesion_counts(final, final_stage(own_folder))
    return final


def check_recorded_split(run: Path, wanted: int) -> None:
    """Refuse to resume or reuse a run whose stages were trained on another split seed (a study switched between
    ``split: fixed`` and ``per_seed``): its figures would enter the table under the wrong protocol."""
    for config in sorted(run.glob("*/config.yaml")):
        recorded = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("split_seed")
        if recorded is not None and recorded != wanted:
            raise ConfigError(f"{config} was trained with split seed {recorded}, but this study's run uses {wanted} (its `split:` "
                              "changed?); use another --trainer.default_root_dir, or delete the run folder to train it again")


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
    if any(read_metrics(run_folder(folder, label, seed) / s["name"]) is not None for s in stages[:-1]):
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
            finished = read_metrics(run_folder(folder, other, seed) / their["name"])
            if _stage_settings(mine, own, names) != _stage_settings(their, theirs, other_names) or finished is None:
                break
            checkpoint = finished.get("best_checkpoint")
            if not checkpoint or not Path(checkpoint).is_file():
                break
            common[mine["name"]] = (other, str(Path(checkpoint).resolve()))
        if len(common) > len(best):
            best = common
    return best


TRAIN_EVAL = "train_eval"  # the run folder's sub-folder of the training-volume evaluation


def evaluate_training_volumes(run: Path) -> dict[str, float]:
    """The final stage's best checkpoint evaluated on the training volumes (``lits test --data.test_split=train``),
    once per run: its ``test/...`` figures as ``train/...``."""
    target = run / TRAIN_EVAL
    if read_metrics(target) is not None:
        print(f"[lits study] training-volume evaluation of {run}: finished earlier, skipped")
    else:
        stage = final_stage(run)
        best = (read_metrics(stage) or {}).get("best_checkpoint")
        if not best:
            raise CheckpointError(f"{stage}/metrics.json names no best checkpoint to evaluate on the training volumes")
        command = ["test", "--config", str(stage / "config.yaml"), f"--ckpt_path={best}",
                   "--data.test_split=train", f"--name={TRAIN_EVAL}", f"--run_dir={target}"]
        print(f"[lits study] training-volume evaluation of {run}", flush=True)
        code = run_cli(command, {k: v for k, v in os.environ.items() if k not in AGENT_ENV})
        if code:
            print(f"lits: error: the training-volume evaluation of {run} failed (exit {code}); fix it and rerun the study to resume", file=sys.stderr)
            sys.exit(code)
    figures = read_metrics(target)
    if figures is None:
        raise DataError(f"{target / 'metrics.json'}: the training-volume evaluation ended without its figures; rerun the study")
    return {f"train/{k[len('test/'):]}": v for k, v in figures.items() if k.startswith("test/")}


def run_study(path: str | Path, argv: list[str]) -> Path:
    study = load_study(path)
    options, argv_overrides = split_options(argv)
    overrides = normalise_overrides(study["args"]) + argv_overrides
    root = Path(override_value(overrides, "trainer.default_root_dir") or "runs")
    folder = inside(root, root / study["name"], "study folder")
    if "model" in options or "seed" in options:
        if "model" not in options or "seed" not in options:
            raise ConfigError("one run of a study needs both --model=LABEL and --seed=S")
        final = run_one(study, folder, options["model"], as_seed(options["seed"]), overrides)
        if options.get("trial_dir"):  # `lits sweep` reads each trial's figures from its own folder
            Path(options["trial_dir"]).mkdir(parents=True, exist_ok=True)
            write_json_atomically(Path(options["trial_dir"]) / "metrics.json", final)
        return folder
    if "from_sweep" in options:  # no figure: it needs the run folders, which a sweep spread over machines does not have here
        report(study, folder, results_from_wandb(options["from_sweep"], study), overrides, figure=False)
        return folder
    if "sweep" in options:
        if run_as_sweep(path, study, folder, argv_overrides):
            return folder
    jobs, launcher = _runs_at_once(options, study), launcher_of(options, study)
    if launcher != "local":  # one cluster job per run (experiments/commands/study_slurm.py)
        results = run_on_cluster(path, study, folder, argv_overrides, launcher)
    elif jobs > 1:
        results = run_parallel(path, study, folder, argv_overrides, jobs)
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


def report(study: dict, folder: Path, results: dict[str, dict[int, dict]], overrides: list[str], figure: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table_kind = TABLES[study.get("table", "segmentation")]
    rows_of = study.get("rows") or {label: label for label in results}
    baseline = next((row for row, model in rows_of.items() if model == study["baseline"]), study["baseline"])
    chosen, references = {row: results[model] for row, model in rows_of.items()}, None
    if study["inc"]:
        chosen, references = before_and_after(chosen, table_kind.metrics)
    rows = summarize(chosen, baseline, references, table_kind.metrics)
    protocol = split_protocol(study.get("split", "per_seed"), study.get("split_seed", 0), len(study["seeds"]))
    table = write_tables(folder, rows, baseline, study["inc"], table_kind.metrics, table_kind.caption, protocol)
    # here, not at the top: the figures need torch and matplotlib, a study's runs do not
    from experiments.commands.study_figure import lesion_error_types_figure, qualitative_figure

    figures = []
    if table_kind.figure == "qualitative" and figure:
        first_seed = study["seeds"][0]
        finals = {label: final_stage(run_folder(folder, label, first_seed)) for label in study["models"]}
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


def final_stage(run: Path) -> Path:
    """The folder of a finished run's last stage."""
    figures = read_metrics(run)
    if figures is None or "stages" not in figures:
        raise DataError(f"{run / 'metrics.json'} is missing or not a finished run's (no `stages`); rerun the study to finish it")
    stages = figures["stages"]
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
    yaml_command(argv, __doc__, run_study)
