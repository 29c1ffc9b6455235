"""(f) The 2D cascade's whole-volume inference on the CPU: ``lits predict`` and one ``lits test`` pass per volume.

Both networks have the paper's widths (``BaselineUNet`` defaults: base_channels 16, in_channels 1)
and are untrained, except for their segmentation heads (see ``write_checkpoints``): the liver
network finds liver everywhere, so the lesion network runs on the whole 512 x 512 in-plane extent of
every slice, the worst case of the cascade.

* ``lits predict``: a ``CascadePredictor`` is built once (model loading is not timed), then
  ``predict_files`` on one NIfTI volume: decode, window + resize, both networks, upsampling + largest
  component, re-orientation and the NIfTI write. The run is instrumented (``Stopwatch``) to tell
  where the time goes; the wrappers cost microseconds per call against seconds of work.
* ``lits test``: what the test loop does per volume in a cascade's whole-volume evaluation: the
  ``VolumeDataset`` sample of that volume read from the cache, then ``SegmentationTask._evaluation_step``
  (the cascade through ``CascadeEvaluation.predict``, the ground truth at full resolution and the
  LiTS metrics ``case_figures``), called on the task through a minimal stand-in for the Trainer (the
  step only reads ``trainer.datamodule.volumes`` and ``trainer.global_rank``), in eval mode under
  ``torch.inference_mode`` as Lightning's test loop runs it. The epoch-end summary and reports
  (once per epoch, not per volume) are left out. Its LiTS metrics are a worst case too: the
  whole-volume liver's surface lies far from the true liver's, where a KD-tree query per surface voxel
  (MONAI's way) is slowest; ``surface_distance`` answers those far voxels from the box's distance
  transform instead (same values). A trained liver network's surface lies close to the truth and
  costs far less.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

import experiments.commands.predict as predict_module
import lightning_modules.inference.cascade_2d as cascade_module
import lightning_modules.segmentation as segmentation_module
from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import PreprocessSettings
from datamodules.io.nifti import discover
from datamodules.datasets.liver_region import VolumeDataset
from experiments.commands.predict import CascadePredictor, predict_files
from lightning_modules import BaselineUNet

DATA = {"image_size": 256, "hu_window": [-100.0, 600.0]}  # what `lits predict` reads of the data module's hyperparameters

# Timed parts of `lits predict`, in pipeline order: (module, function, label of each call in turn).
PREDICT_PARTS = [
    (predict_module, "open_nifti", ("NIfTI read + decode",)),
    (predict_module, "read_voxels", ("NIfTI read + decode",)),
    (predict_module, "window", ("window + resize input",)),  # once for the liver's input, once for the lesion network's fp16 copy
    (predict_module, "resize_image", ("window + resize input",)),
    (cascade_module, "slice_probabilities", ("liver network", "lesion network")),
    (cascade_module, "reassemble_volume", ("upsample liver probabilities",)),
    (cascade_module, "largest_connected_component", ("largest 3D component",)),
    (cascade_module, "dilate_in_plane", ("dilate liver (lesion gate)",)),
    (predict_module, "to_input_grid", ("reorient labels",)),
    (predict_module, "save_atomically", ("NIfTI write",)),
]
TEST_PARTS = [(segmentation_module, "case_figures", ("LiTS metrics",))]


class Stopwatch:
    """Wall time per label of module-level functions, while ``patched`` replaces them by timed wrappers.

    A function called several times can name each call in turn (the last label takes the rest); the
    patched functions must not call one another (no nesting), so the labels add up to at most the total.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def _wrap(self, function, labels):
        calls = [0]

        def timed(*args, **kwargs):
            label = labels[min(calls[0], len(labels) - 1)]
            calls[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def patched(self, parts):
        originals = []
        try:
            for module, name, labels in parts:
                originals.append((module, name, getattr(module, name)))
                setattr(module, name, self._wrap(getattr(module, name), labels))
            yield self
        finally:
            for module, name, original in reversed(originals):
                setattr(module, name, original)


def set_head(task: BaselineUNet, bias: float) -> None:
    """Zero the 1x1 segmentation head's weights and set its bias: the sigmoid is then sigmoid(bias) at every pixel."""
    with torch.no_grad():
        task.model.segmentation_head.weight.zero_()
        task.model.segmentation_head.bias.fill_(bias)


def _save(task: BaselineUNet, target: str, path: Path) -> None:
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "datamodule_hyper_parameters": {**DATA, "target": target}}, path)


def write_checkpoints(folder: Path) -> tuple[Path, BaselineUNet]:
    """An untrained 2D cascade with the paper's widths: (the lesion network's checkpoint, the lesion task).

    Untrained networks time like trained ones, but an untrained liver network may find no liver, and
    then the lesion network never runs. So the liver network's segmentation head gets zero weights and
    a bias of +4: its sigmoid is 0.98 (> the 0.5 threshold) at every pixel, the predicted liver is the
    whole volume, and the lesion network runs on every full-resolution slice (the cascade's worst case).
    The lesion network's head gets zero weights and a bias of -4 (sigmoid 0.02 everywhere: no lesion),
    so that the LiTS lesion metrics of the test pass time a fixed, plausible answer rather than
    whatever noise a random head would predict.
    """
    torch.manual_seed(0)
    liver = BaselineUNet()
    set_head(liver, 4.0)
    liver_path = folder / "liver.ckpt"
    _save(liver, "liver", liver_path)
    lesion = BaselineUNet(liver_checkpoint=str(liver_path))  # reads the liver checkpoint for its cascade evaluation
    set_head(lesion, -4.0)
    lesion_path = folder / "lesion.ckpt"
    _save(lesion, "lesion", lesion_path)
    return lesion_path, lesion


def bench_predict(predictor: CascadePredictor, volume: Path, output: Path) -> dict:
    """One instrumented ``predict_files`` call on one volume: its wall time and where it went."""
    watch = Stopwatch()
    with watch.patched(PREDICT_PARTS), contextlib.redirect_stderr(io.StringIO()):  # no progress bar in the table
        start = time.perf_counter()
        predict_files(predictor, [volume], output)
        total = time.perf_counter() - start
    parts = {label: watch.seconds.get(label, 0.0) for label in dict.fromkeys(l for _, _, labels in PREDICT_PARTS for l in labels)}
    parts["other"] = total - sum(parts.values())
    return {"seconds": total, "parts": parts}


def bench_test_pass(task: BaselineUNet, entry: Path, device: str = "cpu") -> dict:
    """One volume through the test loop's per-volume work: its ``VolumeDataset`` sample (moved to ``device``, as
    Lightning does), then ``_evaluation_step``."""
    volumes = [CachedVolume(entry)]
    dataset = VolumeDataset(volumes, [0])
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(volumes=volumes), global_rank=0)  # the stand-in Trainer
    task.eval().to(device)
    watch = Stopwatch()
    try:
        with watch.patched(TEST_PARTS), torch.inference_mode():
            start = time.perf_counter()
            sample = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dataset[0].items()}
            task._evaluation_step(sample, "test")
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
    finally:
        task._trainer = None
    figures = task.volume_records["test"].compute()[0]
    task.volume_records["test"].reset()
    return {"seconds": total, "metrics_s": watch.seconds["LiTS metrics"], "liver_dice": figures["liver/dice"]}


def bench_cascade(data: Path, work: Path, device: str = "cpu") -> dict:
    """``lits predict`` and a ``lits test`` pass of the untrained cascade on the first volume of ``data``, on ``device``."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = discover(data)[:1]
    lesion_path, lesion_task = write_checkpoints(work)
    predictor = CascadePredictor(str(lesion_path), device=device)  # model loading: not timed
    predicted = bench_predict(predictor, pairs[0].image, work / "predictions")
    entry = build_cache(pairs, work / "cascade_cache", PreprocessSettings(image_size=DATA["image_size"]), workers=1, progress=False)[0]
    tested = bench_test_pass(lesion_task, entry, device)
    shape = tuple(CachedVolume(entry).full_shape)
    return {"shape": f"{shape[1]}x{shape[2]}x{shape[0]}", "predict_s": predicted["seconds"], "parts": predicted["parts"],
            "test_s": tested["seconds"], "metrics_s": tested["metrics_s"], "liver_dice": tested["liver_dice"]}
