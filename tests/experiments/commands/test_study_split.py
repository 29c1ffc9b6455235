"""A study's split protocol (``split: fixed | per_seed``): what each seed's runs receive, the volumes they get, the
papers' Table 1 studies, and the table's caption that names it."""

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from datamodules.errors import ConfigError
from datamodules.lits import LiTSDataModule
from experiments.commands import study as study_module
from experiments.commands.stages import load_experiment, override_value
from experiments.commands.study_config import load_study
from experiments.commands.study_tables import split_protocol

ROOT = Path(__file__).parents[3]
VOLUMES = [str(i) for i in range(17)]  # the CMU-Net paper's 17 volumes


def study_file(tmp_path, **keys) -> Path:
    (tmp_path / "exp.yaml").write_text("model: {}\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"models": {"A": "exp.yaml", "B": "exp.yaml"}, "seeds": 4, **keys}))
    return tmp_path / "study.yaml"


def splits_of_each_run(study: dict, folder: Path, monkeypatch) -> dict[tuple[str, int], tuple]:
    """Each (model, seed): the model seed its run receives and the train/val/test volumes its data module draws."""
    handed = {}

    def run_experiment(path, argv, run_folder):
        handed[run_folder] = argv
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "metrics.json").write_text("{}")

    monkeypatch.setattr(study_module, "run_experiment", run_experiment)
    drawn = {}
    for seed in study["seeds"]:
        for label in study["models"]:
            study_module.run_one(study, folder, label, seed, [])
            argv = handed[folder / label / f"seed_{seed}"]
            data = LiTSDataModule(split=[10, 2, 5], split_seed=int(override_value(argv, "data.split_seed")))
            drawn[label, seed] = (override_value(argv, "seed_everything"), data._split(VOLUMES))
    return drawn


def test_a_fixed_split_gives_every_seed_the_same_volumes_and_per_seed_a_new_split(tmp_path, monkeypatch):
    fixed = splits_of_each_run(load_study(study_file(tmp_path, split="fixed", split_seed=7)), tmp_path / "fixed", monkeypatch)
    assert len({json.dumps(split) for _, split in fixed.values()}) == 1  # one split for all 8 runs...
    assert fixed["A", 0][1] == LiTSDataModule(split=[10, 2, 5], split_seed=7)._split(VOLUMES)  # ...drawn by split_seed
    assert [fixed["A", s][0] for s in range(4)] == ["0", "1", "2", "3"]  # the model seed still varies
    per_seed = splits_of_each_run(load_study(study_file(tmp_path)), tmp_path / "per_seed", monkeypatch)
    assert len({json.dumps(per_seed["A", s][1]) for s in range(4)}) == 4  # a new split per seed...
    assert all(per_seed["A", s] == per_seed["B", s] for s in range(4))  # ...the same for both models of a seed
    assert [per_seed["A", s][0] for s in range(4)] == ["0", "1", "2", "3"]
    default = splits_of_each_run(load_study(study_file(tmp_path, split="fixed")), tmp_path / "default", monkeypatch)
    assert default["B", 3][1] == LiTSDataModule(split=[10, 2, 5], split_seed=0)._split(VOLUMES) != fixed["A", 0][1]  # split_seed: 0


def test_a_run_folder_trained_on_another_split_seed_is_refused_not_mixed_into_the_table(tmp_path, monkeypatch):
    study = load_study(study_file(tmp_path, split="fixed"))
    stage = tmp_path / "out" / "A" / "seed_2" / "fit"
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 2, "data": {"split_seed": 2}}))  # per_seed's
    monkeypatch.setattr(study_module, "run_experiment", lambda *a, **k: pytest.fail("a run trained on another split resumed"))
    with pytest.raises(ConfigError, match=r"fit/config.yaml was trained with split seed 2, but this study's run uses 0") as error:
        study_module.run_one(study, tmp_path / "out", "A", 2, [])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("keys, message", [
    ({"split": "fix"}, "split: expected 'per_seed' or 'fixed', got 'fix'"),
    ({"split": True}, "split: expected 'per_seed' or 'fixed', got True"),
    ({"split": "fixed", "split_seed": -1}, "split_seed: expected a number >= 0, got -1"),
    ({"split": "fixed", "split_seed": "0"}, "split_seed: expected an integer, got '0'"),
    ({"split_seed": 3}, "split_seed applies to `split: fixed` only"),
    ({"splits": "fixed"}, "unknown key 'splits' (did you mean 'split'?)"),
])
def test_the_split_keys_are_checked_in_one_line(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_study(study_file(tmp_path, **keys))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("keys, expected", [({}, ("per_seed", 0)), ({"split": "per_seed"}, ("per_seed", 0)),
                                           ({"split": "fixed"}, ("fixed", 0)), ({"split": "fixed", "split_seed": 3}, ("fixed", 3))])
def test_the_split_keys_accept_both_protocols_and_default_to_per_seed(tmp_path, keys, expected):
    study = load_study(study_file(tmp_path, **keys))
    assert (study["split"], study["split_seed"]) == expected


def data_split(experiment: Path) -> list:
    """The ``data.split`` every stage of an experiment trains on (its configs in order, else the data module's default)."""
    default = inspect.signature(LiTSDataModule).parameters["split"].default
    splits = set()
    for stage in load_experiment(experiment)[1]:
        split = default
        for config in stage["config"]:
            split = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("split", split)
        splits.add(tuple(split))
    return sorted(splits)


def test_the_table1_studies_follow_their_papers_protocol_and_the_quickstarts_keep_per_seed_splits(monkeypatch):
    monkeypatch.chdir(ROOT)
    cmunet = load_study("experiments/studies/cmunet_table1.yaml")  # 10 runs on one 10/2/5 split
    assert (cmunet["split"], cmunet["split_seed"], cmunet["seeds"]) == ("fixed", 0, list(range(10)))
    assert all(data_split(path) == [(10, 2, 5)] for path in cmunet["models"].values())
    mining = load_study("experiments/studies/mask_mining_table1.yaml")  # 3 runs on fixed training and validation sets
    assert (mining["split"], mining["seeds"]) == ("fixed", [0, 1, 2])
    for quickstart in ("quickstart", "mask_mining_table1_quickstart"):
        assert load_study(f"experiments/studies/{quickstart}.yaml")["split"] == "per_seed"


def test_the_table_caption_names_the_split_protocol(tmp_path, monkeypatch):
    assert split_protocol("fixed", 0, 10) == "one fixed split (split seed 0), 10 runs"
    assert split_protocol("per_seed", 0, 3) == "a new split per seed, 3 runs"
    monkeypatch.setattr(study_module, "log_to_wandb", lambda *a, **k: None)
    results = {"U-Net": {s: {"test/dice_volume": 0.8 + 0.01 * s} for s in range(3)}, "CMU-Net": {s: {"test/dice_volume": 0.85} for s in range(3)}}
    study = {"name": "s", "models": dict.fromkeys(results, "x.yaml"), "baseline": "U-Net", "seeds": [0, 1, 2], "inc": False}
    for keys, protocol in (({"split": "fixed", "split_seed": 4}, "one fixed split (split seed 4), 3 runs"), ({}, "a new split per seed, 3 runs")):
        study_module.report(study | keys, tmp_path, results, [], figure=False)
        caption = (tmp_path / "results.md").read_text().split("\n\n")[1]
        assert caption.startswith(f"Test-set figures, mean ± std over seeds, {protocol}; p: paired t-test"), caption
