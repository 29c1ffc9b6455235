"""datamodules/io/atomic.py: files whole or absent, files replaced together, state files that a kill cut short."""

import json
import warnings

import pytest

from datamodules.io.atomic import (TEMPORARY_PREFIX, is_temporary, owner_tag, read_state, remove_own_temporaries, replace_together,
                                   temporary_path, write_atomically, write_json_atomically, write_text_atomically)


def half_then_fail(tmp):
    tmp.write_text('{"dice": 0.')
    raise OSError("disk full")


def test_a_write_that_fails_midway_leaves_the_old_file_or_none(tmp_path):
    kept = tmp_path / "metrics.json"
    write_json_atomically(kept, {"dice": 0.5})
    with pytest.raises(OSError, match="disk full"):
        write_atomically(kept, half_then_fail)
    assert json.loads(kept.read_text()) == {"dice": 0.5}
    with pytest.raises(OSError):
        write_atomically(tmp_path / "new.json", half_then_fail)
    assert not (tmp_path / "new.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left behind
    write_text_atomically(kept, "replaced\n")
    assert kept.read_text() == "replaced\n"


def test_files_replaced_together_are_all_new_or_all_old(tmp_path):
    for name in ("results.md", "results.csv", "results.json"):
        (tmp_path / name).write_text("old")
    writes = [(tmp_path / "results.md", lambda tmp: tmp.write_text("new")),
              (tmp_path / "results.csv", lambda tmp: tmp.write_text("new")),
              (tmp_path / "results.json", half_then_fail)]
    with pytest.raises(OSError):
        replace_together(writes)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == dict.fromkeys(("results.md", "results.csv", "results.json"), "old")
    replace_together(writes[:2])
    assert (tmp_path / "results.md").read_text() == (tmp_path / "results.csv").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if is_temporary(p)]


@pytest.mark.parametrize("text", ["", '{"best_checkpoint": "/runs/a/check', "not json"])
def test_a_cut_or_empty_state_file_reads_as_not_done_with_one_line(tmp_path, text):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.warns(UserWarning) as caught:
        assert read_state(path, "metrics.json") is None
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "metrics.json" in str(caught[0].message)


def test_a_missing_state_file_is_not_done_silently_and_a_whole_one_reads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_state(tmp_path / "missing.json") is None
        write_json_atomically(tmp_path / "sweep.json", {"trials": []})
        assert read_state(tmp_path / "sweep.json") == {"trials": []}


def test_temporaries_are_recognised_and_a_writer_removes_only_its_own(tmp_path):
    own = temporary_path(tmp_path / "image.npy")
    other = tmp_path / f"{TEMPORARY_PREFIX}otherhost-1-0123abcd-image.npy"
    for path in (own, other, tmp_path / "image.npy"):
        path.write_bytes(b"x")
    assert own.name.startswith(f"{TEMPORARY_PREFIX}{owner_tag()}-") and own.name.endswith("-image.npy")
    assert is_temporary(own) and is_temporary(other) and not is_temporary(tmp_path / "image.npy")
    remove_own_temporaries(tmp_path)
    assert not own.exists() and other.exists() and (tmp_path / "image.npy").exists()
