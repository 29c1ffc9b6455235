"""The LiTS-scale epoch model of `python -m benchmarks --scale lits`: LiTS' composition and the validation share."""

import pytest

from benchmarks.lits_scale import LITS_SLICES_PER_VOLUME, lits_epoch


def test_lits_epoch_scales_the_measured_parts_to_lits():
    parts = {"wait_s_per_slice": 0.001, "step_s_per_slice": 0.1, "val_forward_s_per_slice": 0.05,
             "val_metrics_s_per_volume": 1.0, "val_slices": 100}
    epoch = lits_epoch(parts, ranks=1)
    assert (epoch["train_volumes"], epoch["val_volumes"]) == (91, 20)  # split [0.7, 0.15, 0.15] of 131 volumes
    assert LITS_SLICES_PER_VOLUME == pytest.approx(447.6, abs=0.05)  # LiTS' 58,638 training slices
    metric = 1.0 * LITS_SLICES_PER_VOLUME / 100  # a 100-slice volume's metric time, scaled to LiTS' mean volume
    training = 91 * LITS_SLICES_PER_VOLUME * 0.101
    validation = 20 * LITS_SLICES_PER_VOLUME * 0.05 + 20 * metric
    assert epoch["metric_s_per_volume"] == pytest.approx(metric)
    assert epoch["validation_share"] == pytest.approx(validation / (training + validation))
    # ranks share both parts alike: the share does not move, the wall time divides
    halved = lits_epoch(parts, ranks=2)
    assert halved["validation_share"] == pytest.approx(epoch["validation_share"])
    assert halved["training_s"] == pytest.approx(epoch["training_s"] / 2)
