"""The accelerator benchmark (``python -m benchmarks --device cuda``) on the CPU at toy sizes: every
configuration it reports is measured or says why not, and its ratios read the right rows."""

import pytest
import torch

import lightning_modules.base as base
from benchmarks.device_training import (
    IMPLEMENTATIONS,
    _losses_in_progress_bar,
    bench_training,
    find,
    progress_bar_readback,
    ratio,
)


@pytest.fixture(scope="module")
def rows():
    return bench_training("cpu", batch_sizes=(2, 3), size=32, steps=1, warmup=1, compile_modes=(False,),
                         precisions=("32-true", "bf16-mixed"))


def test_every_eager_configuration_is_measured(rows):
    # 2 batch sizes x 2 precisions x 3 implementations, then the largest batch in the other layout (bf16)
    assert len(rows) == 2 * 2 * 3 + 3
    assert {r["implementation"] for r in rows} == set(IMPLEMENTATIONS)
    assert all(r["slices_per_s"] > 0 and "skipped" not in r for r in rows)
    other_layout = [r for r in rows if r["channels_last"]]
    assert {(r["batch"], r["precision"]) for r in other_layout} == {(3, "bf16-mixed")}
    assert "peak_memory_gib" not in rows[0]  # device memory is read on CUDA only


def test_ratio_reads_time_per_slice(rows):
    lightning, plain = find(rows, "lightning", 3, "bf16-mixed"), find(rows, "plain", 3, "bf16-mixed")
    assert ratio(lightning, plain) == pytest.approx(plain["slices_per_s"] / lightning["slices_per_s"], abs=1e-3)
    assert find(rows, "lightning", 64, "bf16-mixed") == {}
    assert ratio({}, plain) is None


def test_budget_and_failures_are_reported_not_estimated():
    spent = bench_training("cpu", batch_sizes=(2,), size=32, steps=1, warmup=1, compile_modes=(False,),
                           precisions=("32-true",), budget_s=0.0)
    assert all(r["skipped"].startswith("time budget") and "slices_per_s" not in r for r in spent)
    broken = bench_training("cpu", batch_sizes=(2,), size=32, steps=1, warmup=1, compile_modes=(False,),
                            precisions=("no-such-precision",))
    lightning = find(broken, "lightning", 2, "no-such-precision")
    assert "slices_per_s" not in lightning and "precision" in lightning["skipped"]  # the Trainer refused it
    assert find(broken, "plain", 2, "no-such-precision")["slices_per_s"] > 0  # the other rows still ran


def test_progress_bar_readback_times_both_loggings_and_restores_the_choice():
    with _losses_in_progress_bar(True):
        assert base.losses_in_progress_bar(torch.device("cuda"))  # the suite's logging before 2026-11-28
    assert not base.losses_in_progress_bar(torch.device("cuda")) and base.losses_in_progress_bar(torch.device("cpu"))
    result = progress_bar_readback("cpu", batch_size=2, size=32, steps=2, warmup=1, precision="32-true")
    assert result["with_s"] > 0 and result["without_s"] > 0
    assert result["ratio"] == pytest.approx(result["with_s"] / result["without_s"], abs=1e-3)
    assert not base.losses_in_progress_bar(torch.device("cuda"))
