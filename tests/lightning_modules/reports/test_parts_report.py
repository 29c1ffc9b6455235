"""A mined cascade's error-type report of both parts (the paper's Fig. 4 for the liver and the lesions), from hand-made
masks through ``case_figures`` and ``part_error_counts`` to the table's rows."""

import numpy as np

from lightning_modules.inference.cascade_evaluation import case_figures, part_error_counts
from lightning_modules.reports.error_report import write_parts_report


def labels(liver: tuple[slice, ...], lesion: tuple[slice, ...] | None) -> np.ndarray:
    out = np.zeros((4, 8, 8), dtype=np.uint8)
    out[liver] = 1
    if lesion is not None:
        out[lesion] = 2
    return out


def test_liver_and_lesion_rows_with_hand_counted_voxels(tmp_path):
    truth = labels(np.s_[1:3, 2:6, 2:6], np.s_[1:2, 3:5, 3:5])  # liver 32 voxels (lesion 4 of them)
    # before: the liver one column short (FN 8), the lesion missed; after: the liver one column too wide (FP 8), the
    # lesion found with one voxel more (FP 1)
    before = labels(np.s_[1:3, 2:6, 2:5], None)
    after = labels(np.s_[1:3, 2:6, 2:7], np.s_[1:2, 3:5, 3:5])
    after[1, 5, 3] = 2
    spacing = (1.0, 1.0, 1.0)
    parts = {part: ({0: part_error_counts({0: case_figures(before, truth, spacing)}, part)[0]},
                    {0: part_error_counts({0: case_figures(after, truth, spacing)}, part)[0]}) for part in ("liver", "lesion")}
    counts = write_parts_report(tmp_path, "val", parts)
    assert counts["liver"] == {"before/fp_voxels": 0, "before/fn_voxels": 8, "before/tp_voxels": 24,
                               "fp_voxels": 8, "fn_voxels": 0, "tp_voxels": 32}
    assert counts["lesion"] == {"before/fp_voxels": 0, "before/fn_voxels": 4, "before/tp_voxels": 0,
                                "fp_voxels": 1, "fn_voxels": 0, "tp_voxels": 4}
    rows = (tmp_path / "val_error_types.md").read_text().splitlines()
    assert rows[0] == "| part | error type | before | after | change |"
    assert rows[2:] == ["| liver | false positives | 0 | 8 | n/a |", "| liver | false negatives | 8 | 0 | -100.0% |",
                        "| liver | true positives | 24 | 32 | +33.3% |", "| lesion | false positives | 0 | 1 | n/a |",
                        "| lesion | false negatives | 4 | 0 | -100.0% |", "| lesion | true positives | 0 | 4 | n/a |"]
    assert (tmp_path / "val_error_types.png").stat().st_size > 5_000
