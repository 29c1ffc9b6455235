"""A stage's process (experiments/processes.py): forked from the fork server, a process of its own with its own exit
code. (With LITS_FORK=0 it is `subprocess.run` of a new interpreter, the path every stage took before.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.errors import ConfigError
from experiments.commands import processes
from experiments.commands.study import load_study

ROOT = Path(__file__).resolve().parents[3]


def synth(folder, env):
    return processes.run_cli(["synth", "--out", str(folder), "--volumes", "1", "--shape", "16", "16", "4"], env)


def test_forked_commands_run_in_their_own_process_with_their_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("LITS_FORK", "1")
    env = dict(os.environ)
    assert synth(tmp_path / "phantom", env) == 0
    assert sorted(p.name for p in (tmp_path / "phantom").iterdir()) == ["segmentation-0.nii.gz", "volume-0.nii.gz"]
    assert processes.run_cli(["synth"], env) == 2  # argparse in the child: --out is required
    assert synth(tmp_path / "second", env) == 0  # the server serves again



def test_a_forked_call_leaves_with_its_exit_code_and_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LITS_FORK", "1")
    processes.call_forked(Path.write_text, tmp_path / "written", "by the child")
    assert (tmp_path / "written").read_text() == "by the child"
    with pytest.raises(SystemExit) as stop:
        processes.call_forked(load_study, tmp_path / "missing.yaml")  # the suite's ConfigError: `lits: error: ...`
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        processes.call_forked(json.loads, "not JSON")  # any other error: its traceback
    assert stop.value.code == 1
    monkeypatch.setenv("LITS_FORK", "0")  # no fork server: called here, errors raised as they are
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        processes.call_forked(load_study, tmp_path / "missing.yaml")


def test_forked_commands_leave_no_semaphore_for_the_resource_tracker_to_report(tmp_path):
    # tqdm's progress bar creates a multiprocessing lock in the child; the child's exit must unregister it, or the
    # parent's resource tracker prints "There appear to be 1 leaked semaphore objects" when the parent ends
    # (the server preloads only this module: `lits synth` needs no torch, and the lock is the child's own)
    script = (f"from experiments.commands import processes\nimport os\nprocesses._PRELOAD[:] = ['experiments.commands.processes']\n"
              f"if __name__ == '__main__':\n"
              f"    assert processes.run_cli(['synth', '--out', {str(tmp_path / 'p')!r}, '--volumes', '1', '--shape', '16', '16', '4'],"
              f" dict(os.environ, LITS_FORK='1')) == 0\n")
    (tmp_path / "parent.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "parent.py")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "phantom volumes: 100%" in done.stderr and "leaked" not in done.stderr
