import pytest

from datamodules.errors import ConfigError
from datamodules.splits import split_volumes

IDS = [str(i) for i in range(20)]


def test_counts_are_disjoint_and_stable_per_seed():
    first = split_volumes(IDS, [10, 2, 5], seed=3)
    assert [len(first[k]) for k in ("train", "val", "test")] == [10, 2, 5]
    assert not set(first["train"]) & set(first["val"]) | set(first["train"]) & set(first["test"]) | set(first["val"]) & set(first["test"])
    assert split_volumes(list(reversed(IDS)), [10, 2, 5], seed=3) == first  # input order does not matter
    assert split_volumes(IDS, [10, 2, 5], seed=4) != first


def test_pinned_split_is_the_same_on_every_machine():
    # numpy's PCG64 permutation is platform independent: pin it so a change in the recipe is noticed.
    assert split_volumes([str(i) for i in range(6)], [4, 1, 1], seed=0) == {"train": ["0", "1", "4", "5"], "val": ["2"], "test": ["3"]}


def test_fractions_use_every_volume():
    split = split_volumes(IDS, [0.85, 0.15, 0.0], seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [17, 3, 0]


def test_growing_train_count_keeps_test_set():
    assert split_volumes(IDS, [5, 2, 5], seed=1)["test"] == split_volumes(IDS, [12, 2, 5], seed=1)["test"]


def test_explicit_ids_win_and_the_rest_is_drawn():
    split = split_volumes(IDS, [3, 1, 0], seed=0, explicit={"test": ["0", "1"]})
    assert split["test"] == ["0", "1"]
    assert len(split["train"]) == 3 and not {"0", "1"} & set(split["train"] + split["val"])


@pytest.mark.parametrize(
    "split, explicit, message",
    [
        ([10, 2, 9], None, "asks for 21 volumes"),
        ([0.8, 0.5, 0.1], None, "fractions sum above 1"),
        ([1, 2], None, "three non-negative"),
        ([2, 1, 1], {"val": ["99"]}, "not in the data folder"),
        ([2, 1, 1], {"val": ["1"], "test": ["1"]}, "more than one"),
    ],
)
def test_bad_splits_raise_one_line_errors(split, explicit, message):
    with pytest.raises(ConfigError, match=message) as error:
        split_volumes(IDS, split, 0, explicit)
    assert "\n" not in str(error.value)
