"""The LiTS-scale epoch model of `python -m benchmarks --scale lits`: LiTS' composition and the validation share."""

import math
from types import SimpleNamespace

import pytest

from benchmarks import lits_scale
from benchmarks.lits_scale import LITS_SLICES_PER_VOLUME, EpochTimer, lits_epoch, lits_metric_workers, report_rows, summary
from lightning_modules.metrics import volume_scoring
PARTS = {"wait_s_per_slice": 0.001, "step_s_per_slice": 0.1, "val_forward_s_per_slice": 0.05,
         "val_metrics_s_per_volume": 1.0, "val_slices": 100}


def test_lits_epoch_scales_the_measured_parts_to_lits():
    epoch = lits_epoch(PARTS, ranks=1)
    assert (epoch["train_volumes"], epoch["val_volumes"]) == (91, 20)  # split [0.7, 0.15, 0.15] of 131 volumes
    assert LITS_SLICES_PER_VOLUME == pytest.approx(447.6, abs=0.05)  # LiTS' 58,638 training slices
    metric = 1.0 * LITS_SLICES_PER_VOLUME / 100  # a 100-slice volume's metric time, scaled to LiTS' mean volume
    training = 91 * LITS_SLICES_PER_VOLUME * 0.101
    validation = 20 * LITS_SLICES_PER_VOLUME * 0.05 + 20 * metric
    assert epoch["metric_s_per_volume"] == pytest.approx(metric)
    assert epoch["validation_share"] == pytest.approx(validation / (training + validation))
    assert epoch["validation_share_1_worker"] == epoch["validation_share"] and epoch["metric_workers"] == 1
    # ranks share both parts alike: the share does not move, the wall time divides
    halved = lits_epoch(PARTS, ranks=2)
    assert halved["validation_share"] == pytest.approx(epoch["validation_share"])
    assert halved["training_s"] == pytest.approx(epoch["training_s"] / 2)


def test_lits_epoch_scores_each_share_in_rounds_of_workers():
    # 16 copies of the 100-slice volume scored at once in 4 s: a rank's 20 volumes take 2 such rounds
    parts = PARTS | {"metric_workers": 16, "metric_round_s": 4.0}
    epoch = lits_epoch(parts, ranks=1)
    scale = LITS_SLICES_PER_VOLUME / 100
    forward = 20 * LITS_SLICES_PER_VOLUME * 0.05
    assert epoch["validation_s"] == pytest.approx(forward + 2 * 4.0 * scale)
    assert epoch["metric_s_per_volume_workers"] == pytest.approx(4.0 * scale / 16)
    assert epoch["validation_s_1_worker"] == pytest.approx(lits_epoch(PARTS, ranks=1)["validation_s"])
    assert epoch["validation_share"] < epoch["validation_share_1_worker"]
    # 3 ranks: shares of 7, 7 and 6 volumes; the largest takes ceil(7 / 16) = 1 round
    assert lits_epoch(parts, ranks=3)["validation_s"] == pytest.approx(forward / 3 + 4.0 * scale)


def test_lits_metric_workers_is_the_suites_count_for_a_lits_share(monkeypatch):
    monkeypatch.setattr(volume_scoring, "_usable_cpus", lambda: 16)
    assert [lits_metric_workers(ranks) for ranks in (1, 2, 8)] == [16, 8, 2]
    monkeypatch.setattr(volume_scoring, "_usable_cpus", lambda: 2)
    assert lits_metric_workers(1) == 2


def test_validation_timer_skips_its_warm_up_batches(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(lits_scale.time, "perf_counter", lambda: float(next(clock)))
    for batches, sizes, skip, timed in ((6, [6] * 5 + [4], 2, 22), (3, [32, 32, 16], 1, 48)):
        timer = EpochTimer(skip=2)
        trainer = SimpleNamespace(sanity_checking=False, num_val_batches=[batches])
        timer.on_validation_epoch_start(trainer, None)
        ends = []
        for index, size in enumerate(sizes):
            timer.on_validation_batch_end(trainer, None, None, {"image": [0] * size}, index)
            ends.append(timer.val_last)
        timer.on_validation_end(trainer, None)
        assert (timer.val_skip, timer.val_slices, timer.val_timed_slices) == (skip, sum(sizes), timed)
        assert timer.val_forward == ends[-1] - ends[skip - 1]  # from the end of the warm-up to the last batch's end
    with pytest.raises(ValueError, match="too few"):
        EpochTimer(skip=2).on_validation_epoch_start(SimpleNamespace(sanity_checking=False, num_val_batches=[1]), None)


def test_summary_and_table_hold_the_figures_the_issue_tracks():
    parts = PARTS | {"metric_workers": 2, "metric_round_s": 1.5, "val_timed_slices": 88, "val_warmup_batches": 2,
                     "eval_batch_size": 6, "steps": 2, "val_volume_shape": [100, 512, 512]}
    result = {"pre": {"preprocess_s": 2.0, "decode_s": 1.0, "volumes": 2, "ratio": 2.0}, "parts": parts,
              "epoch": lits_epoch(parts, ranks=1), "ranks": 1, "geometry": [((512, 512, 100), (0.8, 0.8, 5.0))],
              "against": {"suite_s": 1.0, "monai_s": 4.0, "shape": [100, 512, 512]},
              "worst": {"suite_s": 2.0, "monai_s": 20.0, "shape": [100, 512, 512]},
              "augmentation": {"augment_sample_slices_per_s": 100.0, "augment_batch_slices_per_s": 1000.0,
                               "augment_batch_vs_sample": 10.0, "batch": 64}}
    figures = summary(result, "cpu")
    for key in ("validation_share", "validation_share_1_worker", "augment_batch_vs_sample", "metric_s_per_volume",
                "metric_workers", "metric_s_per_volume_workers"):
        assert key in figures, key
    assert figures["metric_workers"] == 2
    assert figures["metric_s_per_volume_workers"] == pytest.approx(1.5 * LITS_SLICES_PER_VOLUME / 100 / 2, abs=1e-3)
    assert math.isclose(figures["validation_share"], result["epoch"]["validation_share"], abs_tol=1e-4)
    table = {name.strip(): (value, note) for name, value, note in report_rows(result, "cpu")}
    assert "88 of 100 slices" in table["validation: forward"][1] and "2 warm-up" in table["validation: forward"][1]
    assert (figures["surface_worst_s"], figures["surface_worst_monai_s"]) == (2.0, 20.0)
    assert table["MONAI"] == ("20.00 s/volume", "same values; 10.00x")
    quick = summary(result | {"worst": result["worst"] | {"monai_s": None}}, "cpu")
    assert quick["surface_worst_monai_s"] is None
    assert table["with 2 worker(s)"][0].startswith(f"{1.5 * LITS_SLICES_PER_VOLUME / 100 / 2:.2f}")
