"""`lits evaluate` in-process on tiny NIfTI pairs: figures against evaluate_case and hand values, orientation
independence, and a one-line DataError with nothing written for each kind of bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datamodules import DataError
from datamodules.errors import ConfigError
from experiments.commands.evaluate import evaluate_main
from lightning_modules.metrics.lits import CASE_KEYS, evaluate_case, summarize_cases

SHAPE, ZOOMS = (32, 32, 8), (1.5, 1.5, 3.0)  # canonical (X, Y, Z), mm
DIAGONAL = 72.0  # sqrt(48^2 + 48^2 + 24^2): the field of view's diagonal in mm
RAS = np.diag([*ZOOMS, 1.0])


def labels(liver=None, lesions=()) -> np.ndarray:
    """Canonical uint8 label map: a liver box and lesion boxes, each ((x0, x1), (y0, y1), (z0, z1))."""
    array = np.zeros(SHAPE, dtype=np.uint8)
    if liver:
        array[tuple(slice(*r) for r in liver)] = 1
    for lesion in lesions:
        array[tuple(slice(*r) for r in lesion)] = 2
    return array


LIVER = ((8, 20), (10, 22), (2, 6))  # 12 x 12 x 4 = 576 voxels
LESION_A, LESION_B = ((10, 13), (12, 15), (3, 5)), ((16, 18), (18, 20), (2, 4))  # 18 and 8 voxels
FALSE_LESION = ((25, 27), (25, 27), (5, 7))  # 8 voxels, outside the liver
CASES = {  # id: (prediction, truth), canonical arrays
    # Liver one x-slab short plus a false-positive lesion; lesion A found exactly, lesion B missed.
    "0": (labels(((9, 20), (10, 22), (2, 6)), [LESION_A, FALSE_LESION]), labels(LIVER, [LESION_A, LESION_B])),
    # Perfect.
    "1": (labels(LIVER, [LESION_B]), labels(LIVER, [LESION_B])),
    # A liver-only prediction: the lesion is missed.
    "10": (labels(LIVER), labels(LIVER, [LESION_A])),
}


# -- storing a canonical array in other orientations -------------------------------------------------
def lps(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored LPS: x and y axes reversed, affine with negative x/y columns placing voxel
    (0, 0, 0) where canonical voxel (X-1, Y-1, 0) is."""
    affine = RAS.copy()
    affine[0, 0], affine[1, 1] = -ZOOMS[0], -ZOOMS[1]
    affine[0, 3], affine[1, 3] = (SHAPE[0] - 1) * ZOOMS[0], (SHAPE[1] - 1) * ZOOMS[1]
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine


def transposed(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with axes (Z, Y, X): the affine's columns permuted to match."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = ZOOMS[2], ZOOMS[1], ZOOMS[0], 1.0
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine


def save(path: Path, array: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Predictions (LiTS submission names) and a LiTS truth folder (a sub-folder, volumes beside the masks).

    Case 1 is stored LPS on both sides, case 10's truth with permuted axes: canonical orientation and
    spacing must still line up."""
    pred, truth = tmp_path / "pred", tmp_path / "lits"
    storage = {"0": lambda a: (a, RAS), "1": lps, "10": lambda a: (a, RAS)}
    truth_storage = {"0": lambda a: (a, RAS), "1": lps, "10": transposed}
    for case_id, (p, t) in CASES.items():
        save(pred / f"segmentation-{case_id}.nii", *storage[case_id](p))
        save(truth / "batch 1" / f"segmentation-{case_id}.nii.gz", *truth_storage[case_id](t))
        save(truth / "batch 1" / f"volume-{case_id}.nii.gz", np.zeros(SHAPE, dtype=np.int16))
    save(pred / "segmentation-0_liver_probability.nii.gz", np.zeros(SHAPE, dtype=np.float32))  # ignored
    return pred, truth


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def expected() -> dict[str, dict[str, dict[str, float]]]:
    return {case_id: evaluate_case(p, t, ZOOMS) for case_id, (p, t) in CASES.items()}


# -- figures -------------------------------------------------------------------------------------
def test_figures_equal_evaluate_case_and_hand_values(folders, capsys):
    pred, truth = folders
    evaluate_main(["--pred", str(pred), "--truth", str(truth)])
    out = pred / "evaluation"
    rows = read_csv(out / "per_case.csv")
    assert list(rows) == ["0", "1", "10"]  # natural order
    reference = expected()
    for case_id, figures in reference.items():
        for structure, part in figures.items():
            for key, value in part.items():
                assert float(rows[case_id][f"{structure}_{key}"]) == pytest.approx(value, rel=1e-12), (case_id, structure, key)
    # Hand values. Case 0 liver: truth 576 voxels; prediction 11 x 12 x 4 = 528 inside it plus the 8-voxel false lesion.
    assert float(rows["0"]["liver_dice"]) == pytest.approx(2 * 528 / (576 + 536))
    # Case 0 lesions: 26 voxels each side, 18 shared; 1 of 2 lesions found, 1 of 2 components matched.
    assert float(rows["0"]["lesion_dice"]) == pytest.approx(36 / 52)
    assert [rows["0"][f"lesion_{k}"] for k in ("truth_lesions", "detected_lesions", "pred_lesions", "matched_pred_lesions")] == ["2", "1", "2", "1"]
    assert float(rows["1"]["liver_dice"]) == 1.0 and float(rows["1"]["lesion_hd95_mm"]) == 0.0
    # Case 10: lesion missed, distances = the diagonal (checks the spacing read from a permuted header).
    assert float(rows["10"]["lesion_mssd_mm"]) == pytest.approx(DIAGONAL)
    assert float(rows["10"]["lesion_rvd"]) == -1.0
    summary = json.loads((out / "summary.json").read_text())
    for structure in ("liver", "lesion"):
        wanted = summarize_cases({i: f[structure] for i, f in reference.items()})
        assert {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(structure + "/")} == pytest.approx(wanted)
    assert summary["lesion/dice"] == pytest.approx((36 / 52 + 1 + 0) / 3)
    assert summary["lesion/lesion_recall"] == pytest.approx(2 / 4)  # A and B of case 1 found, B of 0 and A of 10 missed
    table = (out / "summary.md").read_text()
    assert "| liver | 3 |" in table and "| lesion | 3 |" in table and "Dice global" in table
    assert "| liver | 3 |" in capsys.readouterr().out


def test_orientation_of_the_prediction_does_not_matter(tmp_path):
    truth_labels = CASES["0"][1]
    pred_labels = CASES["0"][0]
    save(tmp_path / "truth" / "segmentation-0.nii.gz", truth_labels)
    results = {}
    for name, (array, affine) in {"same": (pred_labels, RAS), "lps": lps(pred_labels), "transposed": transposed(pred_labels)}.items():
        save(tmp_path / name / "0.nii.gz", array, affine)
        evaluate_main(["--pred", str(tmp_path / name), "--truth", str(tmp_path / "truth")])
        results[name] = read_csv(tmp_path / name / "evaluation" / "per_case.csv")
    assert results["lps"] == results["same"] == results["transposed"]
    # The raw LPS array against the truth would not give these figures: the reorientation did the work.
    assert evaluate_case(lps(pred_labels)[0], truth_labels, ZOOMS)["liver"]["dice"] != pytest.approx(float(results["same"]["0"]["liver_dice"]))
    # A prediction whose header puts it elsewhere (a tool that wrote an identity affine) is evaluated, with a warning.
    save(tmp_path / "no_header" / "0.nii.gz", pred_labels, np.eye(4))
    with pytest.warns(UserWarning, match=r"affine different from their truth's \(ids 0\)"):
        evaluate_main(["--pred", str(tmp_path / "no_header"), "--truth", str(tmp_path / "truth")])


def test_predictions_inside_the_truth_folder(tmp_path, monkeypatch):
    # The truth search is recursive; it must not take the predictions (same names) for duplicate truths.
    save(tmp_path / "lits" / "segmentation-1.nii.gz", CASES["1"][1])
    save(tmp_path / "lits" / "predictions" / "segmentation-1.nii.gz", CASES["1"][0])
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    evaluate_main(["--pred", "lits/predictions", "--truth", "lits"])
    assert read_csv(tmp_path / "lits" / "predictions" / "evaluation" / "per_case.csv")["1"]["liver_dice"] == "1.0"


@pytest.fixture
def fork_workers(monkeypatch):
    """Worker processes forked rather than spawned: the pool's logic (cases pickled to the workers, results and
    errors back, case order) is the same, without each worker's seconds of importing torch and MONAI."""
    import experiments.commands.evaluate

    monkeypatch.setattr(experiments.commands.evaluate, "START_METHOD", "fork")


def test_msd_truth_no_lesions_out_and_workers(tmp_path, fork_workers):
    truth = tmp_path / "Task03_Liver"
    for case_id, (p, t) in CASES.items():
        save(truth / "labelsTr" / f"liver_{case_id}.nii.gz", t)
        save(truth / "imagesTr" / f"liver_{case_id}.nii.gz", np.zeros(SHAPE, dtype=np.int16))
        save(tmp_path / "pred" / f"liver_{case_id}.nii.gz", p)
    out = tmp_path / "figures"
    evaluate_main(["--pred", str(tmp_path / "pred"), "--truth", str(truth), "--out", str(out), "--no-lesions", "--workers", "2"])
    rows = read_csv(out / "per_case.csv")
    assert list(rows) == ["liver_0", "liver_1", "liver_10"]
    assert set(next(iter(rows.values()))) == {"id", *(f"liver_{k}" for k in CASE_KEYS)}
    summary = json.loads((out / "summary.json").read_text())
    assert all(k.startswith("liver/") for k in summary)
    wanted = summarize_cases({f"liver_{i}": f["liver"] for i, f in expected().items()})
    assert {k[len("liver/"):]: v for k, v in summary.items()} == pytest.approx(wanted)
    assert not (tmp_path / "pred" / "evaluation").exists()


def test_subset_and_empty_truth_rvd(tmp_path):
    # Truth 0 has no liver at all: its RVD is undefined, left out of the mean, written as nan / null.
    save(tmp_path / "truth" / "segmentation-0.nii", labels())
    save(tmp_path / "truth" / "segmentation-1.nii", CASES["1"][1])
    save(tmp_path / "truth" / "segmentation-2.nii", CASES["1"][1])  # no prediction: skipped with --subset
    save(tmp_path / "pred" / "test-segmentation-0.nii", labels(LIVER))
    save(tmp_path / "pred" / "1.nii", CASES["1"][0])
    with pytest.raises(DataError, match=r"truth case\(s\) .* no prediction .*ids 2\b.*--subset"):
        evaluate_main(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")])
    evaluate_main(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--subset"])
    out = tmp_path / "pred" / "evaluation"
    rows = read_csv(out / "per_case.csv")
    assert list(rows) == ["0", "1"] and rows["0"]["liver_rvd"] == "nan"
    assert float(rows["0"]["liver_hd95_mm"]) == pytest.approx(DIAGONAL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["liver/rvd_cases"] == 1 and summary["liver/rvd"] == 0.0 and summary["liver/cases"] == 2
    assert summary["lesion/rvd_cases"] == 2 and summary["lesion/rvd"] == 0.0  # case 0: both lesion masks empty, rvd 0
    assert "liver RVD: mean over the 1 of 2 cases" in (out / "summary.md").read_text()


# -- bad input: one line naming the file, nothing written ----------------------------------------
def _fails(pred: Path, truth: Path, *needles: str, workers: int = 1) -> None:
    with pytest.raises(DataError) as caught:
        evaluate_main(["--pred", str(pred), "--truth", str(truth), "--workers", str(workers)])
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (pred / "evaluation").exists()


def test_missing_or_empty_folders(folders, tmp_path):
    pred, truth = folders
    _fails(tmp_path / "nowhere", truth, "nowhere", "does not exist")
    _fails(pred, tmp_path / "nowhere", "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path / "empty", truth, "empty", "no label map")
    _fails(pred, tmp_path / "empty", "empty", "no segmentation-<id>")


def test_ids_that_do_not_match(folders):
    pred, truth = folders
    save(pred / "segmentation-7.nii", CASES["0"][0])
    (pred / "segmentation-10.nii").unlink()
    _fails(pred, truth, "ids 7", "ids 10", str(pred), str(truth))


def test_duplicate_prediction_id(folders):
    pred, truth = folders
    save(pred / "1.nii.gz", CASES["1"][0])
    _fails(pred, truth, "segmentation-1.nii", "1.nii.gz", "'1'")


def test_shape_mismatch_names_both_files_and_shapes(folders):
    pred, truth = folders
    save(pred / "segmentation-1.nii", np.zeros((32, 32, 7), dtype=np.uint8))
    _fails(pred, truth, "segmentation-1.nii", "segmentation-1.nii.gz", "(32, 32, 7)", "(32, 32, 8)")


def test_not_nifti_and_truncated(folders):
    pred, truth = folders
    (pred / "segmentation-1.nii").write_bytes(b"this is not a NIfTI file" * 10)
    _fails(pred, truth, "segmentation-1.nii", "cannot be read as NIfTI")
    save(pred / "segmentation-1.nii", CASES["1"][0])
    path = truth / "batch 1" / "segmentation-10.nii.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])  # header intact, data cut
    _fails(pred, truth, "segmentation-10.nii.gz", "truncated")


def test_label_values_outside_lits(folders, fork_workers):
    pred, truth = folders
    bad = CASES["10"][0].copy()
    bad[0, 0, 0] = 3
    save(pred / "segmentation-10.nii", bad)
    _fails(pred, truth, "segmentation-10.nii", "[3]")
    _fails(pred, truth, "segmentation-10.nii", "[3]", workers=2)  # raised in a worker process, re-raised here


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from experiments.commands.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["evaluate", "--pred", str(tmp_path / "nowhere"), "--truth", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lits: error: prediction folder") and "\n" not in err


# -- what a killed or failing run leaves ---------------------------------------------------------
def test_temporary_files_of_a_killed_predict_are_ignored(folders):
    pred, truth = folders
    (pred / ".tmp-xyz-volume-1.nii.gz").write_bytes(b"cut short")
    (pred / ".tmp-node7-4242-0a1b2c3d-segmentation-1.nii").write_bytes(b"cut short")
    (truth / "batch 1" / ".tmp-xyz-segmentation-7.nii.gz").write_bytes(b"cut short")
    evaluate_main(["--pred", str(pred), "--truth", str(truth)])
    assert list(read_csv(pred / "evaluation" / "per_case.csv")) == ["0", "1", "10"]


def test_the_three_outputs_are_replaced_together_or_not_at_all(folders, monkeypatch):
    pred, truth = folders
    evaluate_main(["--pred", str(pred), "--truth", str(truth)])
    out = pred / "evaluation"
    old = {name: f"the previous evaluation's {name}" for name in ("per_case.csv", "summary.json", "summary.md")}
    for name, text in old.items():
        (out / name).write_text(text)
    write_text = Path.write_text

    def full_disk_at_the_third(self, *args, **kwargs):
        if self.name.endswith("summary.md"):
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk_at_the_third)
    with pytest.raises(ConfigError, match="No space left on device"):
        evaluate_main(["--pred", str(pred), "--truth", str(truth)])
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # the old three, and no temporary file left
