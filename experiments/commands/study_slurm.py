"""A study on a cluster: every run (model x seed) one SLURM job, submitted through submitit; the tables once all end.

``lits study STUDY.yaml --launcher=slurm`` (or ``launcher: slurm`` in the study file) submits each run as
``lits study STUDY.yaml --model=LABEL --seed=S``, the study's single-run mode, the same command that
``--jobs K`` starts on one machine and a W&B sweep agent runs: the same stages, seeds, resumable checkpoints
and figures. This process stays on the login node, waits for the jobs, and writes the tables as a study
on one machine does. The job's resources come from the study file's ``slurm:`` mapping::

    launcher: slurm
    slurm:
      partition: gpu          # any sbatch option submitit knows, without its "slurm_" prefix
      gpus_per_node: 1        # submitit's own names: timeout_min, gpus_per_node, cpus_per_task, mem_gb, nodes,
      cpus_per_task: 8        # tasks_per_node
      timeout_min: 600
      account: my_lab

A seed's models run one after another when the study shares stages (``share_stages: true``: a later model
takes the earlier one's finished stages); otherwise every run is submitted at once. The jobs read the data
cache at the experiments' ``cache_dir`` (``LITS_CACHE_DIR``): on the shared file system, the first jobs build it
together (``datamodules.io.locks``). Jobs log to ``<study folder>/.submitit/<job id>/``. A failed job stops
further submissions, the submitted ones finish, and the study names the failed job's log; rerunning the study
resumes (finished runs are skipped, unfinished ones continue from their last checkpoint).

``--launcher=submitit_local`` runs the same jobs on this machine with submitit's ``LocalExecutor`` (what the
tests use, and a way to try a study's cluster settings before queueing it).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datamodules.errors import ConfigError, SuiteError
from experiments.commands.processes import cli_command
from experiments.commands.stages import finished_figures
from experiments.commands.study_config import slug

LAUNCHERS = {"local": None, "slurm": "slurm", "submitit_local": "local"}  # the study's launcher -> submitit's cluster
# submitit's names common to every cluster; any other key of `slurm:` is an sbatch option (submitit's slurm_<key>)
GENERIC = ("timeout_min", "mem_gb", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "name", "stderr_to_stdout")


def launcher_of(options: dict, study: dict) -> str:
    """The launcher: the command line's ``--launcher``, else the study file's, else ``local`` (this machine)."""
    launcher = options.get("launcher") or study.get("launcher") or "local"
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    return launcher


def make_executor(launcher: str, folder: Path, settings: dict):
    """A submitit executor for ``launcher`` writing its logs under ``folder/.submitit``, with ``settings``' resources."""
    import submitit  # here: only a cluster study needs it

    try:
        executor = submitit.AutoExecutor(folder=folder / ".submitit" / "%j", cluster=LAUNCHERS[launcher])
    except RuntimeError as error:  # no SLURM commands on this machine
        raise ConfigError(f"--launcher={launcher}: {error} (start the study on the cluster's login node)") from None
    parameters = {key if key in GENERIC else f"slurm_{key}": value for key, value in (settings or {}).items()}
    try:
        executor.update_parameters(**{"name": "lits-study", **parameters})
    except (NameError, ValueError) as error:  # submitit's answer to an option it does not know
        raise ConfigError(f"study `slurm:` settings: {str(error).splitlines()[0]}") from None
    return executor


def trial_folder(folder: Path, label: str, seed: int) -> Path:
    """Where the run's ``lits study --model --seed`` copies its final figures (``metrics.json``)."""
    return folder / ".jobs" / f"{slug(label)}_seed_{seed}"


def run_on_cluster(path: str | Path, study: dict, folder: Path, overrides: list[str], launcher: str) -> dict:
    """Every (model, seed) of ``study`` as one job of ``launcher``; ``{label: {seed: final metrics}}`` once all ended.

    ``overrides`` are the command line's (each run reads the study file's own ``args`` again).
    """
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(launcher, folder, study.get("slurm"))
    results: dict = {label: {} for label in study["models"]}
    stop = threading.Event()

    def run(label: str, seed: int) -> None:
        command = cli_command(["study", str(path), *overrides, f"--model={label}", f"--seed={seed}",
                               f"--trial_dir={trial_folder(folder, label, seed)}"])
        from submitit.helpers import CommandFunction

        job = executor.submit(CommandFunction(command, verbose=False, cwd=os.getcwd()))
        print(f"[lits study] {label}, seed {seed}: job {job.job_id} submitted (log: {job.paths.stdout})\n", end="", flush=True)
        try:
            job.result()
        except Exception as error:  # submitit's FailedJobError or UncompletedJobError: the job's log says why
            stop.set()
            last = str(error).strip().splitlines()[-1:] or ["no message"]
            raise SuiteError(f"{label}, seed {seed}: job {job.job_id} failed ({last[0]}); its logs: {job.paths.stdout}, {job.paths.stderr}") from None
        results[label][seed] = finished_figures(trial_folder(folder, label, seed), f"{label}, seed {seed}")
        print(f"[lits study] {label}, seed {seed}: job {job.job_id} done\n", end="", flush=True)

    def chain(runs: list[tuple[str, int]]) -> None:
        for label, seed in runs:
            if not stop.is_set():
                run(label, seed)

    if study.get("share_stages"):
        chains = [[(label, seed) for label in study["models"]] for seed in study["seeds"]]
    else:
        chains = [[(label, seed)] for seed in study["seeds"] for label in study["models"]]
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        errors = [future.exception() for future in [pool.submit(chain, c) for c in chains]]
    failed = [error for error in errors if error is not None]
    if failed:
        raise failed[0]
    return results
