"""Volume-level train/validation/test splits: slices of one volume never end up in two splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datamodules.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")


def split_counts(split: Sequence[float], available: int) -> list[int]:
    """Counts from ``split``: integers summing to more than 1 are volume counts, otherwise fractions of ``available``."""
    if len(split) != 3 or any(v < 0 for v in split):
        raise ConfigError(f"split {list(split)} must be three non-negative numbers (train, val, test): counts like [10, 2, 5] or fractions like [0.7, 0.15, 0.15]")
    if all(float(v).is_integer() for v in split) and sum(split) > 1:
        counts = [int(v) for v in split]
    elif sum(split) <= 1 + 1e-9:
        val, test = round(split[1] * available), round(split[2] * available)
        train = available - val - test if abs(sum(split) - 1) < 1e-9 else round(split[0] * available)
        counts = [train, val, test]
    else:
        raise ConfigError(f"split {list(split)} mixes counts and fractions, or its fractions sum above 1; use counts like [10, 2, 5] or fractions like [0.7, 0.15, 0.15]")
    if sum(counts) > available:
        raise ConfigError(
            f"split {list(split)} asks for {sum(counts)} volumes ({counts[0]} train + {counts[1]} val + {counts[2]} test) "
            f"but the data folder has {available}; lower --data.split or add volumes"
        )
    return counts


def _drawn_shares(split: Sequence[float], drawn: list[str]) -> list[float] | None:
    """Fractions summing to 1 renormalised over the ``drawn`` splits (0 for the explicit ones), or None where ``split``
    is used as it is: counts, fractions leaving volumes out on purpose, no explicit list, nothing to share out.

    Without this, an explicit list's own fraction of the remaining volumes would end up in no split (e.g. val_ids with
    the mask-mining paper's [0.85, 0.15, 0] left 15% of the other volumes unused)."""
    if len(split) != 3 or min(split) < 0 or len(drawn) in (0, 3) or abs(sum(split) - 1) > 1e-9:
        return None
    if all(float(v).is_integer() for v in split) and sum(split) > 1:
        return None
    total = sum(v for name, v in zip(SPLIT_NAMES, split) if name in drawn)
    return [v / total if name in drawn else 0.0 for name, v in zip(SPLIT_NAMES, split)] if total > 0 else None


def split_volumes(
    volume_ids: Sequence[str],
    split: Sequence[float] = (10, 2, 5),
    seed: int = 0,
    explicit: dict[str, Sequence[str] | None] | None = None,
) -> dict[str, list[str]]:
    """Assign volume ids to train/val/test.

    Explicit id lists (``explicit={"train": [...], ...}``) are used as given; the splits without one
    are drawn from the remaining volumes by ``split`` with a seeded permutation of the sorted ids
    (numpy's PCG64, identical on every machine). Test is drawn first, then val, then train, so
    growing the training count never changes the test set. Fractions summing to 1 use every volume:
    with explicit lists, the drawn splits share the remaining volumes in proportion to their fractions.
    """
    explicit = {k: list(v) for k, v in (explicit or {}).items() if v is not None}
    known = set(volume_ids)
    for name, ids in explicit.items():
        missing = [i for i in ids if i not in known]
        if missing:
            raise ConfigError(f"--data.{name}_ids names volumes {missing[:5]} that are not in the data folder; use ids from its file names")
    taken = [i for ids in explicit.values() for i in ids]
    if len(taken) != len(set(taken)):
        raise ConfigError("a volume id appears in more than one of --data.train_ids/val_ids/test_ids; each volume belongs to one split")
    pool = sorted(known - set(taken))
    drawn = [name for name in ("test", "val", "train") if name not in explicit]
    shares = _drawn_shares(split, drawn)
    counts = dict(zip(SPLIT_NAMES, split_counts(shares or split, len(pool)))) if drawn else {}
    if shares:  # the last split drawn takes what rounding left over, as train does without explicit lists
        counts[drawn[-1]] += len(pool) - sum(counts[name] for name in drawn)
    needed = sum(counts[name] for name in drawn)
    if needed > len(pool):
        raise ConfigError(f"split asks for {needed} volumes beyond the explicit id lists but only {len(pool)} remain; lower --data.split or add volumes")
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    result = dict(explicit)
    start = 0
    for name in drawn:
        result[name] = sorted(order[start : start + counts[name]])
        start += counts[name]
    return {name: result[name] for name in SPLIT_NAMES}
