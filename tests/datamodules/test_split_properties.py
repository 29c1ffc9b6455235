"""``split_volumes`` over many seeds, data-set sizes, id spellings and explicit id lists: the splits are disjoint,
hold only known volumes, keep the explicit lists, have the asked sizes, use every volume when the fractions sum to
1, and are a function of (ids as a set, split, seed, explicit lists) alone."""

from __future__ import annotations

import random

import pytest

from datamodules.splits import SPLIT_NAMES, split_volumes

SPELLINGS = (lambda i: str(i), lambda i: f"{i:03d}", lambda i: f"case-{i}", lambda i: f"v{i % 7}_{i}")


def random_case(rng: random.Random) -> tuple[list[str], list[float], dict[str, list[str]], str]:
    """Volume ids, a split, explicit lists and the split's kind ("counts", "whole" fractions summing to 1, "part")."""
    n = rng.randint(1, 40)
    ids = [rng.choice(SPELLINGS)(i) for i in rng.sample(range(1000), n)]
    explicit, free = {}, list(ids)
    rng.shuffle(free)
    for name in SPLIT_NAMES:
        if rng.random() < 0.3 and free:
            explicit[name], free = free[: rng.randint(0, min(4, len(free)))], free[min(4, len(free)):]
    pool = len(free)
    kind = rng.choice(["counts", "whole", "part"])
    if kind == "counts":
        counts = [rng.randint(0, pool) for _ in range(3)]
        while sum(counts) > pool:
            counts[rng.randrange(3)] //= 2
        split = [float(c) for c in counts] if sum(counts) > 1 else [0.0, 0.0, 0.0]
        kind = "counts" if sum(counts) > 1 else "part"
    else:
        cut = sorted(round(rng.random(), 2) for _ in range(2))
        split = [1 - cut[1], cut[1] - cut[0], cut[0]] if kind == "whole" else [c * 0.9 for c in (1 - cut[1], cut[1] - cut[0], cut[0])]
    return ids, split, explicit, kind


CASES = [random_case(random.Random(case)) for case in range(300)]


def assigned(result: dict[str, list[str]]) -> list[str]:
    return [i for name in SPLIT_NAMES for i in result[name]]


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_splits_are_disjoint_known_and_keep_the_explicit_lists(seed):
    for ids, split, explicit, kind in CASES:
        result = split_volumes(ids, split, seed, explicit)
        everything = assigned(result)
        assert set(result) == set(SPLIT_NAMES)
        assert len(everything) == len(set(everything)), (ids, split, explicit)  # disjoint
        assert set(everything) <= set(ids)
        for name, given in explicit.items():
            assert result[name] == given
        drawn = [name for name in SPLIT_NAMES if name not in explicit]
        pool = len(ids) - sum(len(given) for given in explicit.values())
        if kind == "counts":
            assert [len(result[name]) for name in drawn] == [int(split[SPLIT_NAMES.index(name)]) for name in drawn]
        if kind == "whole":
            shares = {name: split[SPLIT_NAMES.index(name)] for name in drawn}
            if sum(shares.values()) > 0:
                assert sorted(everything) == sorted(ids), (ids, split, explicit)  # every volume is used
                for name, share in shares.items():
                    assert abs(len(result[name]) - pool * share / sum(shares.values())) <= 1, (name, split, explicit)
        if kind == "part":  # fractions summing below 1: each drawn split its fraction of the remaining volumes
            assert [len(result[name]) for name in drawn] == [round(split[SPLIT_NAMES.index(name)] * pool) for name in drawn]


def test_a_split_is_a_function_of_the_seed_and_the_id_set():
    for case, (ids, split, explicit, _) in enumerate(CASES[:100]):
        shuffled = list(ids)
        random.Random(case).shuffle(shuffled)
        first = split_volumes(ids, split, case, explicit)
        assert split_volumes(shuffled, split, case, explicit) == first
        assert split_volumes(ids, split, case, explicit) == first
        assert all(result == sorted(result) for name, result in first.items() if name not in explicit)


def test_seeds_draw_different_splits_and_a_test_set_independent_of_the_train_count():
    ids = [f"case-{i}" for i in range(30)]
    tests = {tuple(split_volumes(ids, [10, 5, 5], seed)["test"]) for seed in range(50)}
    assert len(tests) == 50  # C(30, 5) = 142506 test sets: 50 seeds never repeat one
    for seed in range(50):
        small, large = split_volumes(ids, [2, 5, 5], seed), split_volumes(ids, [20, 5, 5], seed)
        assert small["test"] == large["test"] and small["val"] == large["val"]
        assert set(small["train"]) < set(large["train"])


def test_explicit_lists_with_the_mask_mining_fractions_use_every_volume():
    ids = [str(i) for i in range(20)]
    result = split_volumes(ids, [0.85, 0.15, 0.0], 0, {"val": ["0", "1", "2"]})
    # 17 volumes left after the 3 explicit ones: all of them train (the test fraction is 0). Before the fix the val
    # fraction of those 17 (3 volumes) went nowhere.
    assert (len(result["train"]), result["val"], result["test"]) == (17, ["0", "1", "2"], [])
    result = split_volumes(ids, [0.7, 0.15, 0.15], 0, {"train": ids[:15]})
    assert (len(result["val"]), len(result["test"])) == (3, 2)  # 5 left, shared 1:1, the odd one to val (drawn last)
