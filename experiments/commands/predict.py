"""``lits predict MODEL --input PATH --output DIR``: label maps for new CT scans, written on each input's own grid.

MODEL is a checkpoint of the suite or a ``lits run`` folder (its last stage's best checkpoint). The task class the
checkpoint records (``checkpoint["lits_suite"]["class_path"]``; older checkpoints: see ``base.checkpoint_class_path``)
says how it predicts: its ``predictor`` (one network) or its ``cascade_predictor`` (a checkpoint holding both):

* a liver network (any segmentation module trained on ``--data.target=liver``): labels 0/1;
* a cascade's lesion network, whose checkpoint names its liver network (``liver_checkpoint``; override
  with ``--liver_checkpoint``): labels 0/1/2, by the same whole-volume inference as ``lits test``
  (``lightning_modules.inference.cascade_2d``);
* 3D networks (``spatial_dims: 3``, e.g. ``experiments/cascade_3d.yaml``): the volume is windowed, resized in-plane
  and resampled along z to the networks' slice spacing exactly as the 3D cache is, then predicted with the sliding
  window of ``lits test`` (``lightning_modules.inference.cascade_3d``) and mapped back onto the input's own slices.

Several MODELs (``lits predict RUN1 RUN2 ...``) are an ensemble: each network's foreground probabilities are averaged
over the models, then thresholded once, as nnU-Net ensembles; the models must be of one kind (liver networks, cascades
or combined models) with the same inputs and settings (``predict_models.check_compatible``). ``--tta`` mirrors each
input along the in-plane axes (and the slice axis for 3D networks) and averages the predictions flipped back
(``lightning_modules.inference.ensemble``).

PATH is a NIfTI file or a folder: LiTS ``volume-<id>`` / ``test-volume-<id>`` files (any sub-folder),
an MSD folder with ``imagesTs/``, or any ``*.nii[.gz]``. Each output has the input's shape, affine and
orientation (not the canonical one the networks see), uint8, named as LiTS expects:
``volume-<id>`` -> ``segmentation-<id>.nii``, ``test-volume-<id>`` -> ``test-segmentation-<id>.nii``,
anything else keeps its own name. Files are written atomically (a killed run leaves whole files
only, and its ``.tmp-*`` files are ignored). ``--probabilities`` also writes ``<name>_liver_probability.nii.gz`` and
``<name>_lesion_probability.nii.gz`` (float32). Runs on the GPU when there is one.

Nothing is written before every input has been read whole (a CT with NaN or infinite voxels is refused, naming the
file and how many), no output replaces an input or its ground truth, and an existing output is replaced only with
``--overwrite``: rerun on a folder a killed run has partly done, the prediction skips the cases it finished and goes
on where it stopped (the rules: ``experiments/commands/predict_outputs.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.io.preprocess import read_box
from datamodules.io.atomic import write_atomically
from datamodules.io.nifti import check_finite, open_nifti, read_voxels
from datamodules.io.preprocess import PreprocessSettings, resize_image, to_display, window
from datamodules.io.volume3d import interpolate_z, original_positions, resampled_positions
from datamodules.settings import data_setting
from datamodules.errors import ConfigError
from experiments.commands.predict_models import check_compatible, load_member, resolve_model
from experiments.commands.predict_outputs import PREDICTION_MARK, Case, check_writable, find_inputs, plan_cases, prediction_mark
from lightning_modules.inference.cascade_2d import CASCADE_DEFAULTS, predict_volume
from lightning_modules.inference.cascade_3d import predict_volume_3d
from lightning_modules.inference.ensemble import mean_cascade, mean_predictor, mirror_axes


class CascadePredictor:
    """The liver network, and the lesion network when MODEL is a cascade's or a combined model: the same inference as
    ``lits test``. Several MODELs (an ensemble) and ``tta`` (test-time mirroring) average each network's probabilities
    over the models and the mirror images (``lightning_modules.inference.ensemble``) before the one threshold."""

    def __init__(self, model: str | Sequence[str], liver_checkpoint: str | None = None, device: str | None = None,
                 batch_size: int = 16, tta: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        paths = [resolve_model(m) for m in ([model] if isinstance(model, (str, Path)) else model)]
        self.members = [load_member(path, liver_checkpoint, self.device) for path in paths]
        check_compatible(self.members)
        self.mark = prediction_mark(paths, tta, liver_checkpoint)
        first = self.members[0]  # the ensemble's settings: every member's are the same (check_compatible)
        self.main, self.liver, self.lesion = first.main, first.liver, first.lesion
        axes = mirror_axes(self.liver.arch.spatial_dims) if tta else ()
        self.cascade = self.liver_predict = self.lesion_predict = None
        if first.cascade is not None:  # a combined model: its networks come from its cascade, per volume
            self.cascade = mean_cascade([m.cascade for m in self.members], axes)
        else:
            self.liver_predict = mean_predictor([m.liver.predictor for m in self.members], axes)
            self.lesion_predict = mean_predictor([m.lesion.predictor for m in self.members], axes) if self.lesion else None
        self.settings = {k: self.main.hparams.get(k, v) for k, v in CASCADE_DEFAULTS.items()}
        self.threshold = float(self.main.hparams.get("threshold", 0.5))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, hu_display: np.ndarray, probabilities: bool = False, slice_spacing: float | None = None) -> dict[str, np.ndarray]:
        """(Z, H, W) HU in display orientation (``slice_spacing``: its z spacing in mm, needed by 3D networks) ->
        ``predict_volume``'s result."""
        if self.liver.arch.spatial_dims == 3:
            if slice_spacing is None:
                raise ValueError("3D networks need the volume's slice spacing")
            return self._predict_3d(hu_display, float(slice_spacing), probabilities)
        liver_settings = PreprocessSettings(*self.liver.hu_window, self.liver.image_size)
        image = torch.from_numpy(resize_image(window(hu_display, liver_settings), self.liver.image_size)).float().to(self.device)
        full = None
        if self.lesion is not None:  # float16 like the cache, so `lits test` and `lits predict` see the same values
            full = window(hu_display, PreprocessSettings(*self.lesion.hu_window, 0)).astype(np.float16)

        def read_image(box):
            return read_box(full, [[0, n] for n in full.shape], box, np.float32)

        if self.cascade is not None:
            sample = {"image": image, "full_shape": torch.tensor(hu_display.shape)}
            liver, liver_channels, lesion, lesion_channels = self.cascade(sample)
        else:
            liver, liver_channels = self.liver_predict, self.liver.arch.in_channels
            lesion = self.lesion_predict
            lesion_channels = self.lesion.arch.in_channels if self.lesion else 1
        return predict_volume(liver, lesion, image, read_image, hu_display.shape, liver_in_channels=liver_channels,
                              lesion_in_channels=lesion_channels, threshold=self.threshold, batch_size=self.batch_size,
                              probabilities=probabilities, **self.settings)

    def _predict_3d(self, hu_display: np.ndarray, slice_spacing: float, probabilities: bool) -> dict[str, np.ndarray]:
        """The 3D cascade on the volume preprocessed as the 3D cache is: windowed, resized in-plane to float16 (``image.npy``),
        resampled linearly along z to the networks' slice spacing and stored as float16 (``image3d_<s>mm.npy``)."""
        network, data = self.liver, self.liver.data
        stack = resize_image(window(hu_display, PreprocessSettings(*network.hu_window, network.image_size)), network.image_size)
        target_spacing = float(data.get("slice_spacing_mm", 2.5))
        positions = resampled_positions(len(stack), slice_spacing, target_spacing)
        image = interpolate_z(torch.from_numpy(stack)[None], positions, "linear")[0].float().to(self.device)
        hparams = self.main.hparams
        return predict_volume_3d(self.liver_predict, self.lesion_predict, image, original_positions(len(stack), slice_spacing, target_spacing),
                                 hu_display.shape, data_setting(data, "volume_3d.crop_size", (64, 128, 128)), float(hparams.get("sw_overlap", 0.25)),
                                 str(hparams.get("sw_mode", "gaussian")), threshold=self.threshold, probabilities=probabilities,
                                 **self.settings)


def canonical_slice_spacing(reference: nib.Nifti1Image) -> float:
    """The z spacing (mm) of a file in its closest canonical (RAS+) order, without reading its voxels."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(reference.affine), nib.orientations.axcodes2ornt(("R", "A", "S")))
    zooms = reference.header.get_zooms()[:3]
    return float(next(zoom for zoom, (axis, _) in zip(zooms, transform) if int(axis) == 2))


# -- grids and files (which files: experiments/commands/predict_outputs.py) ------------------------
def from_display(array: np.ndarray) -> np.ndarray:
    """Inverse of ``cache.to_display``: display (Z, rows, cols) -> canonical (X, Y, Z)."""
    return array.transpose(2, 1, 0)[::-1, ::-1, :]


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A file's voxel array -> closest canonical (RAS+) order, as ``nib.as_closest_canonical`` (which would
    read the data itself, outside the one-line error for a truncated file)."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S")))
    return nib.orientations.apply_orientation(array, transform)


def to_input_grid(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Canonical (RAS+) array -> the voxel order of a file with ``affine`` (undoes ``as_closest_canonical``)."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), nib.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, transform))


def save_atomically(array: np.ndarray, reference: nib.Nifti1Image, path: Path, mark: str = PREDICTION_MARK) -> None:
    image = nib.Nifti1Image(array, reference.affine)
    image.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    image.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    image.header.set_xyzt_units(*reference.header.get_xyzt_units())
    image.header["descrip"] = mark  # what tells a resumed run its own outputs from the user's files and other settings'
    write_atomically(path, lambda tmp: nib.save(image, tmp))


def read_checked(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """An input's header and voxels; DataError if they are truncated or not all finite."""
    reference = open_nifti(path)
    voxels = read_voxels(reference, path)
    check_finite(voxels, path)
    return reference, voxels


@dataclass
class Plan:
    """The cases to predict, how many were done before, and the first case's voxels, already read and checked."""

    cases: list[Case]
    skipped: int
    first: tuple[nib.Nifti1Image, np.ndarray] | None


def plan_prediction(inputs: list[Path], output: Path, probabilities: bool = False, overwrite: bool = False,
                    mark: str = PREDICTION_MARK) -> Plan:
    """Every check before the first output is written (``predict_outputs.plan_cases``, a writable ``output``, and every
    input to predict read whole with finite voxels), so that a bad input ends the command with nothing written rather
    than after the volumes before it. Each input is therefore decoded twice, here and when it is predicted; only the
    first one's voxels are kept, since a folder of CTs does not fit in memory."""
    cases = plan_cases(inputs, output, probabilities, overwrite, mark)
    check_writable(output)
    todo = [case for case in cases if case.outputs]
    first = read_checked(todo[0].input) if todo else None
    for case in todo[1:]:
        read_checked(case.input)
    if len(todo) < len(cases):
        print(f"skipped {len(cases) - len(todo)} of {len(cases)} case(s) already predicted in {output} (complete outputs); --overwrite redoes them")
    return Plan(todo, len(cases) - len(todo), first)


def predict_cases(predictor: CascadePredictor, plan: Plan) -> list[Path]:
    """Predict each case of ``plan`` and write its outputs atomically; the paths written."""
    written = []
    for index, case in enumerate(tqdm(plan.cases, desc="Predicting", unit="volume")):
        reference, voxels = plan.first if index == 0 else read_checked(case.input)
        result = predictor(to_display(to_canonical(voxels, reference.affine)), set(case.outputs) != {"labels"},
                           slice_spacing=canonical_slice_spacing(reference))
        for key, path in case.outputs.items():
            grid = to_input_grid(from_display(result[key]), reference.affine)
            save_atomically(grid if key == "labels" else grid.astype(np.float32), reference, path, predictor.mark)
            written.append(path)
    return written


def predict_files(predictor: CascadePredictor, inputs: list[Path], output: Path, probabilities: bool = False,
                  overwrite: bool = False) -> list[Path]:
    """``plan_prediction`` then ``predict_cases``: the whole of ``lits predict`` for a predictor already built."""
    return predict_cases(predictor, plan_prediction(inputs, output, probabilities, overwrite, predictor.mark))


def check_device(name: str | None) -> None:
    """ConfigError for a ``--device`` that is not a torch device, or a GPU this machine does not have."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device; pass cpu, cuda or cuda:<index>") from None
    available = {"cpu": True, "cuda": device.type == "cuda" and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ConfigError(f"--device {name} is not available here ({torch.cuda.device_count()} CUDA device(s) visible); "
                          "pass cpu, or cuda:<index> of a visible GPU")


def predict_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lits predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="+", help="a checkpoint (.ckpt) or a lits run / lits fit folder; several: an ensemble")
    parser.add_argument("--input", required=True, help="a NIfTI file or a folder (LiTS, MSD imagesTs/, any *.nii[.gz])")
    parser.add_argument("--output", required=True, help="folder for the label maps (cases already predicted there are skipped)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input or its ground truth)")
    parser.add_argument("--liver_checkpoint", default=None, help="the cascade's liver network (default: the one the lesion checkpoint names)")
    parser.add_argument("--probabilities", action="store_true", help="also write float32 probability maps")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch_size", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring: average over the flips of the in-plane axes (and slices in 3D)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: pass at least 1 slice per forward pass")
    check_device(args.device)
    output = Path(args.output)
    paths = [resolve_model(model) for model in args.model]
    resolved = [Path(path).resolve() for path in paths]
    for model, path in zip(args.model, resolved):
        if resolved.count(path) > 1:
            raise ConfigError(f"{model} is given twice (checkpoint {path}); an ensemble averages different models: name each once")
    mark = prediction_mark(paths, args.tta, args.liver_checkpoint)
    plan = plan_prediction(find_inputs(args.input, skip=output), output, args.probabilities, args.overwrite, mark)
    if not plan.cases:
        print(f"nothing to predict: every case already has its outputs in {output}")
        return
    predictor = CascadePredictor(paths, args.liver_checkpoint, args.device, args.batch_size, args.tta)
    written = predict_cases(predictor, plan)
    kind = "liver and lesion (0/1/2)" if predictor.lesion else "liver (0/1)"
    how = (f", mean of {len(paths)} models" if len(paths) > 1 else "") + (", mirrored" if args.tta else "")
    print(f"predicted {len(plan.cases)} case(s), {kind}{how}: wrote {len(written)} file(s) to {output}")
