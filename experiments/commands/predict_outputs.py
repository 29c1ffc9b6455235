"""What ``lits predict`` reads and where it writes: the inputs it finds, the outputs it names, and the guard that
no output replaces a file it must not.

Checked before any voxel is predicted; each violation is one ``DataError`` naming the file and the fix:

* an output never lands on an input of the same command, nor on the ground truth of one (a LiTS
  ``segmentation-<id>`` beside ``volume-<id>``, an MSD ``labelsTs/<name>`` beside ``imagesTs/<name>``), not even with
  ``--overwrite``. Files are compared by resolved folder and name without suffix, so ``segmentation-3.nii`` is
  refused beside a truth ``segmentation-3.nii.gz`` too (it would make the truth's id ambiguous);
* an existing output is never replaced without ``--overwrite``. One that is a complete prediction of its input (a
  NIfTI that nibabel reads whole, of the input's shape, marked in the header's ``descrip`` as lits predict's with the
  same models and test-time mirroring: ``prediction_mark``) was written by an earlier run that stopped part way
  (outputs are written atomically, so a final name is whole): its case is skipped, and the prediction goes on where
  it stopped. Anything else under an output's name is refused: a ground truth of the same shape (a truth folder given
  as ``--output``), and a prediction made with other models or without ``--tta`` (or with it), which a resumed run
  would otherwise mix with its own;
* the suite's temporary files (``.tmp-*``, ``datamodules.io.atomic``), which a killed run leaves, are never inputs,
  nor is anything in the output folder when that lies inside the input folder (``--output <input>/predictions``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.errors import DataError
from datamodules.io.atomic import is_temporary, temporary_path
from datamodules.io.nifti import NIFTI_SUFFIXES, open_nifti, read_voxels

LITS_NAMES = (("test-volume-", "test-segmentation-"), ("volume-", "segmentation-"))  # longest first
MSD_FOLDERS = {"imagesTs": "labelsTs", "imagesTr": "labelsTr"}
PROBABILITIES = ("liver_probability", "lesion_probability")
PREDICTION_MARK = "lits-suite: lits predict"  # the start of the NIfTI header's descrip of every file lits predict writes


@dataclass
class Case:
    """One input and the outputs still to write for it (``labels``, and with ``--probabilities`` the two maps):
    all of them, or with a resumed run only those it lacks. Empty: the case was done before."""

    input: Path
    shape: tuple[int, ...]
    outputs: dict[str, Path] = field(default_factory=dict)


def nifti_stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_inputs(path: str | Path, skip: Path | None = None) -> list[Path]:
    """The CT volumes to predict under ``path`` (see ``experiments/commands/predict.py``), sorted; anything under
    ``skip`` (the output folder, when it lies inside ``path``) left out."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {path} does not exist; pass a NIfTI file or a folder of them")
    if (path / "imagesTs").is_dir():
        path = path / "imagesTs"
    inside = skip is not None and skip.resolve() != path.resolve() and skip.resolve().is_relative_to(path.resolve())
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("._") and not is_temporary(p)
                   and p.name.endswith(NIFTI_SUFFIXES) and not (inside and p.resolve().is_relative_to(skip.resolve())))
    lits = [p for p in files if nifti_stem(p).startswith(("volume-", "test-volume-"))]
    files = lits or [p for p in files if not nifti_stem(p).startswith(("segmentation-", "test-segmentation-"))]
    if not files:
        raise DataError(f"--input {path} holds no NIfTI volume (*.nii, *.nii.gz); pass a file or a LiTS/MSD folder")
    return files


def output_name(path: Path) -> str:
    stem = nifti_stem(path)
    for volume, segmentation in LITS_NAMES:
        if stem.startswith(volume):
            return segmentation + stem[len(volume):] + ".nii"
    return path.name


def output_files(path: Path, output: Path, probabilities: bool) -> dict[str, Path]:
    """Where the outputs of input ``path`` go: ``labels``, and the probability maps beside it."""
    name = output_name(path)
    files = {"labels": output / name}
    if probabilities:
        files |= {key: output / f"{nifti_stem(Path(name))}_{key}.nii.gz" for key in PROBABILITIES}
    return files


# -- the guard ---------------------------------------------------------------------------------------
def _key(path: Path) -> tuple[Path, str]:
    return path.parent.resolve(), nifti_stem(path)


def truth_of(volume: Path) -> list[Path]:
    """The ground-truth files that belong to a volume by the LiTS and MSD naming (those that exist)."""
    stem = nifti_stem(volume)
    folder = volume.parent
    candidates = [folder / (segmentation + stem[len(prefix):]) for prefix, segmentation in LITS_NAMES if stem.startswith(prefix)]
    if folder.name in MSD_FOLDERS:
        candidates.append(folder.parent / MSD_FOLDERS[folder.name] / stem)
    return [Path(f"{c}{suffix}") for c in candidates for suffix in NIFTI_SUFFIXES if Path(f"{c}{suffix}").is_file()]


def protected_files(inputs: list[Path], output: Path) -> dict[tuple[Path, str], Path]:
    """The files no output may replace, by ``_key``: the inputs, their truths, and the LiTS volumes (with their truths)
    that sit in the output folder (a data folder the input search left out, or that holds volumes not asked for)."""
    volumes = list(inputs)
    if output.is_dir():
        volumes += [p for p in output.iterdir() if p.is_file() and not is_temporary(p) and p.name.endswith(NIFTI_SUFFIXES)
                    and nifti_stem(p).startswith(("volume-", "test-volume-"))]
    files = [p for volume in volumes for p in (volume, *truth_of(volume))]
    return {_key(q): p for p in files for q in (p, p.resolve())}  # a link's target too: a rename would not spare it


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prediction_mark(checkpoints: Sequence[str | Path], tta: bool = False, liver_checkpoint: str | Path | None = None) -> str:
    """The ``descrip`` of the files a prediction writes: ``PREDICTION_MARK``, how many models, whether mirrored, and a
    digest of the checkpoints' contents (in any order: an ensemble's mean does not depend on it; the liver network
    given by ``--liver_checkpoint`` included), so that a resumed run tells its own outputs from another setting's.
    At most 80 characters, the field's size."""
    members = sorted(file_digest(path) for path in checkpoints)
    liver = file_digest(liver_checkpoint) if liver_checkpoint and Path(liver_checkpoint).is_file() else str(liver_checkpoint)
    digest = hashlib.sha1("\n".join([*members, liver]).encode()).hexdigest()[:12]
    return f"{PREDICTION_MARK} {len(members)} model{'s' if len(members) > 1 else ''}{' tta' if tta else ''} #{digest}"


def incomplete(path: Path, shape: tuple[int, ...], mark: str = PREDICTION_MARK) -> str | None:
    """Why ``path`` is not a complete prediction of an input of ``shape`` marked ``mark``; None when it is."""
    try:
        image = open_nifti(path)
        read_voxels(image, path)
    except DataError:
        return "not a readable NIfTI"
    if image.shape != shape:
        return f"shape {image.shape}, not the input's {shape}"
    found = image.header["descrip"].item().decode(errors="replace")
    if not found.startswith(PREDICTION_MARK):
        return "not written by lits predict"
    if found != mark:
        return f"predicted with other models or mirroring: {found!r}, this run {mark!r}"
    return None


def plan_cases(inputs: list[Path], output: Path, probabilities: bool = False, overwrite: bool = False,
               mark: str = PREDICTION_MARK) -> list[Case]:
    """Every input's case, with the outputs still to write; DataError (nothing written) for an output that would land
    on an input or its truth, two inputs with one output name, an unreadable input header, or an existing output
    that is not a complete prediction marked ``mark`` (``prediction_mark``) while ``overwrite`` is off."""
    names = [output_name(p) for p in inputs]
    if len(set(names)) != len(names):
        raise DataError(f"--input {inputs[0].parent}: several inputs map to the same output name; predict them into separate folders")
    protected = protected_files(inputs, output)
    cases = []
    for path in inputs:
        files = output_files(path, output, probabilities)
        for target in files.values():
            if _key(target) in protected:
                raise DataError(f"--output {output}: {target.name} would replace {protected[_key(target)]}, a file this command reads "
                                f"(an input or its truth; --overwrite never does); pass another folder, e.g. --output {output / 'predictions'}")
        shape = open_nifti(path).shape
        if not overwrite:
            for target in (t for t in files.values() if t.exists()):
                reason = incomplete(target, shape, mark)
                if reason:
                    raise DataError(f"{target} exists and is not this command's prediction of {path.name} ({reason}); pass --overwrite to replace "
                                    "it, or another --output")
            files = {key: target for key, target in files.items() if not target.exists()}
        cases.append(Case(path, shape, files))
    return cases


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(folder / f"write-test-{uuid.uuid4().hex[:8]}")  # a temporary name: ignored if a kill leaves it
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"--output {folder} cannot be written ({error.strerror or error}); pass a writable folder") from None
