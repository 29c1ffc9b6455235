"""The per-volume CSV and the error report are written whole or not at all: a failure midway keeps the old files."""

from types import SimpleNamespace

import pytest

from lightning_modules.reports.error_report import write_error_report
from lightning_modules.reports.figures import write_per_volume_csv


def test_a_per_volume_csv_that_fails_midway_keeps_the_old_one(tmp_path):
    path = tmp_path / "test_volumes.csv"
    volumes = [SimpleNamespace(volume_id="a"), SimpleNamespace(volume_id="b")]
    write_per_volume_csv(path, {0: {"dice": 0.5}, 1: {"dice": 0.25}}, volumes)
    old = path.read_text()
    assert old.splitlines() == ["volume,dice", "a,0.5", "b,0.25"]
    with pytest.raises(IndexError):  # the third volume's id is missing: the file was half written
        write_per_volume_csv(path, {0: {"dice": 0.9}, 1: {"dice": 0.9}, 2: {"dice": 0.9}}, volumes)
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["test_volumes.csv"]


def test_the_error_report_table_and_csv_are_replaced_together(tmp_path, monkeypatch):
    from lightning_modules.reports import error_report

    figures = {"fp_voxels": 1, "fn_voxels": 2, "tp_voxels": 3, "dice_volume": 0.5}
    write_error_report(tmp_path, "val", {0: figures}, {0: figures}, ["a"])
    old = {name: (tmp_path / name).read_text() for name in ("error_types.md", "error_types.csv")}

    def full_disk(handle):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(error_report.csv, "writer", full_disk)  # the csv, written after the table, fails
    with pytest.raises(OSError):
        write_error_report(tmp_path, "val", {0: figures}, {0: {**figures, "tp_voxels": 2}}, ["a"])
    assert {name: (tmp_path / name).read_text() for name in old} == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
