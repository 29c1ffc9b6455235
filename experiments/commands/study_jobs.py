"""Runs side by side: ``lits study STUDY.yaml --jobs K`` (and the pieces ``lits sweep --jobs K`` shares).

A study's runs are chains, one per seed: the models of a seed run in the study's order, because
``share_stages`` hands a seed's finished stages to the later models of the same seed. Chains are
independent (seeds share nothing but the data cache), so K of them run at once, after one
``lits preprocess`` of the first model's first stage has generated and preprocessed the data cache
that the runs then read (caches that only later stages use are built by their first run). Each run is ``lits study STUDY.yaml --model=LABEL --seed=S`` (the study's single-run mode,
also what a W&B sweep agent runs): the same code, the same seeds and resumable stages as a sequential
study, so the figures are the same where the arithmetic is (same threads per run: see ``threads``).

How many at once: ``--jobs K``, or ``--runs_per_device N`` for K = devices x N, where the devices are the
visible GPUs, or the CPU as one device (there N runs share its cores: K = N). ``--jobs`` wins when both
are given; the command line wins over the study file's ``jobs:`` / ``runs_per_device:``.
On a CPU the cores are shared out: each run gets ``cores // K`` intra-op threads (``OMP_NUM_THREADS``;
a value the user set is kept).
On GPUs, each run starts on the visible device that runs the fewest runs then (``CUDA_VISIBLE_DEVICES``), so
K = devices x N keeps N runs on every device. Each run's console goes to ``console.log`` in its run
folder; the study prints one line when a run starts and when it ends. A failed run stops new runs
from starting, lets the running ones finish, and names its log. A killed parallel study resumes like a
sequential one: finished runs are skipped, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import glob
import multiprocessing.process
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datamodules.errors import ConfigError, SuiteError
from experiments.commands.processes import cli_arguments, cli_command, poll_cli, run_cli, start_cli, wait_cli
from experiments.commands.stages import finished_figures, load_experiment, normalise_overrides, stage_overrides
from experiments.commands.study_config import as_seed, load_study, model_overrides, run_folder, seed_overrides, slug, split_options


def threads(jobs: int) -> int:
    """Intra-op threads per run: the user's ``OMP_NUM_THREADS`` if set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // jobs)


def devices() -> list[str]:
    """The visible GPUs (``CUDA_VISIBLE_DEVICES`` if set, else every CUDA device); none on a CPU machine."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if sys.platform.startswith("linux") and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return []  # no NVIDIA or ROCm device node: a CPU machine, known without importing torch (~1 s)
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: CPU runs
        return []


def whole_number(option: str, value, what: str) -> int:
    """``value`` (text from the command line, or a YAML value) as an integer of at least 1; one-line ConfigError otherwise."""
    try:
        number = int(str(value).strip())  # through text: 2.5, true or null are refused, not rounded
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"--{option} must be a whole number of {what}, 1 or more; got {value!r}")
    return number


def runs_at_once(jobs=None, runs_per_device=None) -> int:
    """K: ``jobs`` if given, else the devices (visible GPUs, or the CPU as one) x ``runs_per_device``, else 1."""
    per_device = whole_number("runs_per_device", runs_per_device, "runs per device") if runs_per_device is not None else None
    if jobs is not None:
        return whole_number("jobs", jobs, "runs at once")
    if per_device is None:
        return 1
    return max(1, len(devices())) * per_device


@dataclass
class Started:
    """A run started by a ``Launcher``: its process, its GPU (None: no GPU assigned) and its console log."""

    process: subprocess.Popen | multiprocessing.process.BaseProcess  # see experiments.commands.processes.start_cli
    device: str | None
    log: Path
    freed: bool = False

    @property
    def where(self) -> str:
        return f" on GPU {self.device}" if self.device is not None else ""


class Launcher:
    """Starts suite commands as processes for ``jobs`` runs at once, each with its console appended to a log.

    With ``jobs`` > 1 each run gets ``threads(jobs)`` intra-op threads and, on GPUs, the visible device
    that runs the fewest of this launcher's runs at its start (ties: the first); with ``jobs`` = 1 a run
    inherits the environment unchanged, as a run started by hand would.
    A suite command without a GPU is forked from the fork server (``experiments.commands.processes.start_cli``: no
    interpreter start, no second import of the suite per run); one given a GPU, or any other program, starts
    as a new process, so its ``CUDA_VISIBLE_DEVICES`` is read by a CUDA that has not started yet.
    """

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._load = {device: 0 for device in devices()} if jobs > 1 else {}
        self._lock = threading.Lock()

    def start(self, command: list[str], log: Path, own_session: bool = False) -> Started:
        """Start ``command``; ``own_session`` puts it in a process group of its own, which ``os.killpg`` ends with its children."""
        env = dict(os.environ)
        device = None
        if self.jobs > 1:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads(self.jobs))
            if self._load:
                with self._lock:
                    device = min(self._load, key=self._load.__getitem__)
                    self._load[device] += 1
                env["CUDA_VISIBLE_DEVICES"] = device
        log.parent.mkdir(parents=True, exist_ok=True)
        suite_args = cli_arguments(command) if command[0] == sys.executable else None
        if device is None and suite_args is not None:
            return Started(start_cli(suite_args, env, log, new_session=own_session), device, log)
        with open(log, "a") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=own_session)
        return Started(process, device, log)

    def poll(self, run: Started) -> int | None:
        """The run's exit code once it has ended (its GPU is then free for the next run), else None."""
        code = poll_cli(run.process)
        if code is not None:
            self._free(run)
        return code

    def wait(self, run: Started) -> int:
        """Wait for the run to end; its exit code (its GPU is then free for the next run)."""
        code = wait_cli(run.process)
        self._free(run)
        return code

    def _free(self, run: Started) -> None:
        with self._lock:
            if run.device is not None and not run.freed:
                self._load[run.device] -= 1
            run.freed = True


def failure(what: str, code: int, log: Path) -> str:
    """A failed run's message: its exit code and the last lines of its console."""
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
    return f"{what} failed (exit {code}); last lines of {log}:\n{tail}"


def prepare_data(command: list[str], tag: str) -> None:
    """Before runs start side by side: ``lits preprocess`` (a forked child) with the data settings of ``command``'s first training.

    ``command`` is a suite command line (``python -m experiments.commands.cli fit|run|study ...``, see
    ``processes.cli_command``): of a ``lits fit`` its own arguments, of a ``lits run`` its first stage's, of a
    ``lits study`` the first stage of the model it runs (``--model``, else the study's first). The runs then find
    the data cache built instead of each building it at once (safe, but they would wait on each other's
    entries' locks). Another command: nothing.
    """
    suite_args = cli_arguments(command) or []
    subcommand, rest = (suite_args[0], suite_args[1:]) if len(suite_args) > 1 else (None, [])
    if subcommand == "fit":
        args = [a for a in rest if not a.startswith(("--run_dir=", "--ckpt_path="))]
    elif subcommand in ("run", "study"):
        if subcommand == "run":
            experiment = rest[0]
            every = normalise_overrides(rest[1:])
        else:
            study = load_study(rest[0])
            options, overrides = split_options(rest[1:])
            model = options.get("model") or next(iter(study["models"]))
            seed = options.get("seed") or study["seeds"][0]
            experiment = study["models"][model]
            every = model_overrides(study, model, normalise_overrides(study["args"]) + overrides)
            every += seed_overrides(study, as_seed(seed))
        _, stages = load_experiment(experiment)
        names = [stage["name"] for stage in stages]
        args = [x for config in stages[0]["config"] for x in ("--config", str(config))]
        args += list(stages[0].get("args", [])) + stage_overrides(every, names[0], names)
    else:
        return
    print(f"[{tag}] preparing the data cache", flush=True)
    # forked, not in this process: a process that has computed with torch must not fork the runs after it
    code = run_cli(["preprocess", *args], dict(os.environ))
    if code != 0:  # its one-line error (`lits: error: ...`) is printed already: leave with its exit code
        sys.exit(code)


def run_parallel(path: str | Path, study: dict, folder: Path, overrides: list[str], jobs: int) -> dict:
    """Every (model, seed) of ``study`` through ``jobs`` worker processes; ``{label: {seed: final metrics}}``.

    ``overrides`` are the command line's (the study file's own ``args`` are read again by each run).
    """
    launcher = Launcher(jobs)
    results: dict = {label: {} for label in study["models"]}
    stop = threading.Event()

    def trial(label: str, seed: int) -> Path:  # where the run's `lits study --model --seed` copies its figures
        return folder / ".jobs" / f"{slug(label)}_seed_{seed}"

    def command(label: str, seed: int) -> list[str]:
        return cli_command(["study", str(path), *overrides, f"--model={label}", f"--seed={seed}", f"--trial_dir={trial(label, seed)}"])

    def run(label: str, seed: int) -> None:
        log = run_folder(folder, label, seed) / "console.log"
        started = launcher.start(command(label, seed), log)
        # one write per line: runs start from several threads, and print writes the text and the newline apart
        print(f"[lits study] {label}, seed {seed}: started{started.where} (console: {log})\n", end="", flush=True)
        code = launcher.wait(started)
        if code != 0:
            stop.set()
            # the run printed its own error in its log; which kind it was, this process does not know
            raise SuiteError(failure(f"{label}, seed {seed}", code, log))
        results[label][seed] = finished_figures(trial(label, seed), f"{label}, seed {seed}")
        print(f"[lits study] {label}, seed {seed}: done\n", end="", flush=True)

    def chain(runs: list[tuple[str, int]]) -> None:
        for label, seed in runs:
            if stop.is_set():
                return
            run(label, seed)

    prepare_data(command(next(iter(study["models"])), study["seeds"][0]), "lits study")
    chains = [[(label, seed) for label in study["models"]] for seed in study["seeds"]]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(chain, c) for c in chains if c]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    return results
