"""The study's paired tests pair a model's runs with its reference's by seed, whatever order the runs arrive in."""

import random

import numpy as np
import pytest
from scipy import stats

from experiments.commands.study_tables import before_and_after, markdown_table, summarize

KEY, TITLE = "test/dice_volume", "Dice (volume)"
# per seed; CMU-Net beats U-Net on every seed, by a margin that a pairing by position would scramble
UNET = {0: 0.70, 1: 0.90, 2: 0.75, 3: 0.85, 4: 0.80, 5: 0.72}
CMUNET = {0: 0.72, 1: 0.93, 2: 0.76, 3: 0.88, 4: 0.81, 5: 0.75}


def shuffled(figures: dict[int, float], order: int) -> dict[int, dict]:
    seeds = list(figures)
    random.Random(order).shuffle(seeds)
    return {s: {KEY: figures[s]} for s in seeds}


@pytest.mark.parametrize("order", range(4))
def test_runs_are_paired_by_seed_in_any_order(order):
    rows = summarize({"U-Net": shuffled(UNET, order), "CMU-Net": shuffled(CMUNET, order + 100)}, "U-Net", metrics={TITLE: KEY})
    cmunet = rows[1]
    after, before = [CMUNET[s] for s in range(6)], [UNET[s] for s in range(6)]
    assert cmunet[f"{TITLE} t-test p"] == pytest.approx(stats.ttest_rel(after, before).pvalue)  # 0.0029 (by position: about 0.7)
    assert cmunet[f"{TITLE} Wilcoxon p"] == pytest.approx(stats.wilcoxon(after, before).pvalue)  # 0.031: every seed better
    assert cmunet[f"{TITLE} difference mean"] == pytest.approx(0.13 / 6) and cmunet[f"{TITLE} difference std"] == pytest.approx(0.0098319, abs=1e-7)
    assert cmunet[f"{TITLE} mean"] == pytest.approx(np.mean(after)) and (cmunet[f"{TITLE} pairs"], cmunet["paired runs"]) == (6, 6)
    assert "| CMU-Net | 6 |" in markdown_table(rows, "U-Net", metrics={TITLE: KEY})


def test_a_seed_one_model_lacks_leaves_the_common_seeds_paired_and_the_table_says_how_many():
    unet = shuffled({s: v for s, v in UNET.items() if s != 3}, 1)  # U-Net's seed 3 did not finish
    rows = summarize({"U-Net": unet, "CMU-Net": shuffled(CMUNET, 2)}, "U-Net", metrics={TITLE: KEY})
    common = [0, 1, 2, 4, 5]
    cmunet = rows[1]
    assert cmunet[f"{TITLE} t-test p"] == pytest.approx(stats.ttest_rel([CMUNET[s] for s in common], [UNET[s] for s in common]).pvalue)
    assert (cmunet["runs"], cmunet["paired runs"], cmunet[f"{TITLE} pairs"]) == (6, 5, 5)
    assert cmunet[f"{TITLE} mean"] == pytest.approx(np.mean(list(CMUNET.values())))  # its own figures: all its runs
    assert cmunet[f"{TITLE} difference mean"] == pytest.approx(np.mean([CMUNET[s] - UNET[s] for s in common]))
    table = markdown_table(rows, "U-Net", metrics={TITLE: KEY})
    assert "| U-Net | 5 |" in table and "| CMU-Net | 6 (5 paired) |" in table and "runs paired by seed" in table
    # the other way round: the model lacks a seed its reference has; all of its runs are paired
    rows = summarize({"U-Net": shuffled(UNET, 3), "CMU-Net": {s: {KEY: v} for s, v in CMUNET.items() if s != 0}}, "U-Net", metrics={TITLE: KEY})
    assert (rows[1]["runs"], rows[1]["paired runs"]) == (5, 5) and "| CMU-Net | 5 |" in markdown_table(rows, "U-Net", metrics={TITLE: KEY})


def test_mining_s_gain_pairs_each_run_with_its_own_base_in_any_order():
    runs = {s: {KEY: CMUNET[s], "test/before/dice_volume": UNET[s]} for s in (4, 1, 5, 0, 3, 2)}
    expanded, references = before_and_after({"2D": runs}, {TITLE: KEY})
    gain = summarize(expanded, "2D", references, {TITLE: KEY})[1]
    assert gain[f"{TITLE} difference mean"] == pytest.approx(0.13 / 6)
    assert gain[f"{TITLE} t-test p"] == pytest.approx(stats.ttest_rel(list(CMUNET.values()), list(UNET.values())).pvalue)
