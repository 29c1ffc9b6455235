"""Two nodes of one process each, on the loopback address: `lits fit` under torchrun, as on a cluster.

Both nodes' rank 0 build one fresh cache folder at once (Lightning runs ``prepare_data`` on every node's local
rank 0), train together, and test the best checkpoint; the per-volume test figures equal a 1-process `lits test`
of that checkpoint.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.lits_commands import lits
from tests.synthetic import tiny_experiment

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(args: list[str], cwd: Path, nodes: int = 2) -> list[subprocess.Popen]:
    """``torchrun`` once per node, all at once, as each node's job script would: one process per node."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("LITS_RUN_VERSION", None)
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(rank), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "experiments.commands.cli", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(nodes)]


@pytest.fixture(scope="module")
def two_node_fit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multinode")
    config = tiny_experiment(folder, volumes=5, split=(2, 1, 2))
    config["seed_everything"] = 7
    config["trainer"].update(default_root_dir="runs", log_every_n_steps=1)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    nodes = start_nodes(["fit", "--config", "tiny.yaml", "--name", "nodes", "--trainer.strategy=ddp", "--trainer.num_nodes=2",
                         "--trainer.devices=1", "--trainer.accelerator=cpu"], folder)
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank} failed ({node.returncode}):\n{log[-5000:]}"
    return folder


def test_two_nodes_train_on_one_fresh_shared_cache_and_test_as_one_process(two_node_fit):
    runs = two_node_fit / "runs" / "nodes"
    assert [p.name for p in runs.iterdir()] == ["version_0"]  # one run folder, made by global rank 0 alone
    nodes = json.loads((runs / "version_0" / "metrics.json").read_text())
    assert nodes["world_size"] == 2 and nodes["epochs"] == 1
    lits("test", "--config", "tiny.yaml", f"--ckpt_path={nodes['best_checkpoint']}", "--name=single",
         cwd=two_node_fit, env={"WANDB_MODE": "disabled"}, check=True)
    single = json.loads((two_node_fit / "runs" / "single" / "version_0" / "metrics.json").read_text())
    names = [k for k in single if k.startswith("test/") and k != "test/loss"]
    assert len(names) == 8 and single["world_size"] == 1
    for name in names:
        assert nodes[name] == pytest.approx(single[name], abs=1e-6), name
    rows = {name: list(csv.DictReader(open(two_node_fit / "runs" / name / "version_0" / "test_per_volume.csv"))) for name in ("nodes", "single")}
    assert len(rows["nodes"]) == 2 and rows["nodes"] == rows["single"]
    cache = next((two_node_fit / "cache" / "preprocessed").iterdir())
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [str(i) for i in range(5)]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
