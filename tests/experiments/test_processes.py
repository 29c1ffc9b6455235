"""A stage's process (experiments/processes.py): forked from the fork server, a process of its own with its own exit
code. (With LITS_FORK=0 it is `subprocess.run` of a new interpreter, the path every stage took before.)"""

import os

from experiments import processes


def synth(folder, env):
    return processes.run_cli(["synth", "--out", str(folder), "--volumes", "1", "--shape", "16", "16", "4"], env)


def test_forked_commands_run_in_their_own_process_with_their_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("LITS_FORK", "1")
    env = dict(os.environ)
    assert synth(tmp_path / "phantom", env) == 0
    assert sorted(p.name for p in (tmp_path / "phantom").iterdir()) == ["segmentation-0.nii.gz", "volume-0.nii.gz"]
    assert processes.run_cli(["synth"], env) == 2  # argparse in the child: --out is required
    assert synth(tmp_path / "second", env) == 0  # the server serves again

