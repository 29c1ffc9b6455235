"""``python -m benchmarks --volumetric [--quick] [--device cpu|cuda]``: the 3D (volumetric) path's hot spots.

(g) **3D train step**, batch 2 of (D, H, W) crops (the paper's 128x128x64: (64, 128, 128); smaller on the CPU,
    see below) of three implementations of the same step (one forward, the suite's Dice loss, backward, Adam),
    through ``device_training.bench_training`` with a (D, H, W) size:

    * ``lightning``: ``BaselineUNet(spatial_dims=3)`` under a Lightning ``Trainer``;
    * ``plain``: the same network, loss, optimizer and batches in a plain PyTorch loop (target: Lightning at
      most 1.05x its time per step). Neither has a scheduler (``scheduler="none"`` in the task): the suite's
      per-step cosine scheduler costs microseconds against a 3D step's tenths of seconds or more;
    * ``basicunet``: MONAI's ``BasicUNet(spatial_dims=3, features=(16, 32, 64, 128, 256, 16))`` in the same
      plain loop. "The same widths": its five encoder levels are the suite's c = 16..256, and the sixth
      feature is the width of its last up-block, which is the suite's last decoder width, 16. Both up-sample
      with 2x2x2 transposed convolutions and use affine instance norm and LeakyReLU 0.2; BasicUNet's
      convolutions keep their bias and its last up-sampling keeps 32 channels (the suite's halves to 16), so
      it is slightly larger (5,658,881 against 5,646,385 parameters).

    The whole matrix (each implementation once per precision) is repeated ``repeats`` times and each
    configuration keeps its best repeat, so the sides alternate within one run, as the other ratios of
    ``python -m benchmarks`` are measured on these noisy machines.
(h) **Sliding-window prediction of a 512x512x100 volume** (0.8 mm pixels, 2.5 mm slices: the volume of the
    2D cascade's benchmark (f), so the two paths compare): an untrained ``BaselineUNet(spatial_dims=3)``
    whose segmentation head predicts liver everywhere (zero weights, bias +4, as in (f): the largest-component
    step then sees the largest possible component), through the suite's 3D evaluation chain. The chain is
    ``inference.evaluation_3d.evaluate_volume_3d`` and ``record_volume_3d`` (functions that need a Trainer and a data
    module) rebuilt from the public functions they call, in their order:

    1. ``cache.build_cache``: NIfTI decode, HU window, in-plane resize to ``image_size`` 256, cache written;
    2. ``WholeVolume3DDataset`` (``volume3d.resample_volume``): the z resampling to 2.5 mm, written beside the
       cache, and the whole-volume sample read back;
    3. MONAI's ``SlidingWindowInferer`` (windows of the crop size (64, 128, 128), ``sw_batch_size`` 2, overlap
       0.25, Gaussian blending) on the logits, then the sigmoid;
    4. ``volume3d.to_original_slices``: the probabilities mapped back onto the original slices;
    5. ``cascade.liver_mask``: quantised to uint8, upsampled to 512x512, thresholded at 0.5, largest 3D
       component, exactly as the per-volume metrics reassemble a prediction.

    Seconds per volume and per part. Model building and one warm-up forward pass (first-call initialisation,
    cuDNN autotuning on a GPU) are not timed.
(i) **3D crop loading**: ``Crop3DDataset`` (crop (64, 128, 128), target liver, positive_fraction 0.5) on cached
    phantom volumes, read in one process with one torch thread as a DataLoader worker does, without and
    with ``InPlaneAugmentation``: crops/s per worker. The volumes are 256x256x100 phantoms at 1.6 mm pixels and
    2.5 mm slices: the cache's 256x256 grid of a 512x512 volume at 0.8 mm, without writing the larger file.

On the CPU (fp32 only: bf16 autocast on a CPU without bf16 instructions is far slower, see ``experiments/gpu.yaml``)
everything runs on one torch thread (on the shared 2-core machines a second thread waits for a busy core at every
operation) and the train step uses (32, 64, 64) crops (``--quick``: (16, 32, 32), and a 512x512x32 volume with
(32, 64, 64) windows for (h)); the table names the sizes used. ``--device cuda`` runs (g) at full size in fp32 and
bf16-mixed with each configuration's peak device memory, and (h) on the device; ``--budget`` seconds bound (g) there.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import PreprocessSettings
from datamodules.augment.sample import InPlaneAugmentation
from datamodules.datasets.crops3d import Crop3DDataset, WholeVolume3DDataset
from datamodules.io.nifti import discover
from datamodules.io.phantom import write_phantom_dataset
from datamodules.io.volume3d import DEFAULT_SLICE_SPACING_MM, to_original_slices
from lightning_modules import BaselineUNet
from lightning_modules.inference.cascade_2d import liver_mask

from benchmarks.cascade_inference import set_head
from benchmarks.device_training import bench_training, find, ratio

FULL_CROP = (64, 128, 128)  # (D, H, W): the paper's 128x128x64, data.volume_3d.crop_size's default
CPU_CROP, QUICK_CROP = (32, 64, 64), (16, 32, 32)
BATCH = 2
PREDICT_SHAPE, QUICK_PREDICT_SHAPE = (512, 512, 100), (512, 512, 32)  # (x, y, z) as the phantom writer takes it
PREDICT_SPACING = (0.8, 0.8, 2.5)
IMAGE_SIZE = 256

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, D, H, W) windows -> (B, 1, D, H, W) logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (g) the 3D train step ----------------------------------------------------------------------
def bench_train_step(crop: Sequence[int], device: str = "cpu", steps: int = 3, warmup: int = 1, repeats: int = 2,
                     precisions: Sequence[str] = ("32-true",), budget_s: float = math.inf, batch: int = BATCH) -> dict:
    """Lightning vs plain loop vs BasicUNet at batch ``batch`` of ``crop`` (D, H, W) crops: each configuration's best of ``repeats``.

    ``rows`` are ``bench_training``'s (``slices_per_s`` counts crops); the ratios are time per step over the
    plain loop's in the same precision (> 1: slower), ``None`` where a side was skipped.
    """
    crop = tuple(int(n) for n in crop)
    best: dict[tuple, dict] = {}
    started = time.perf_counter()
    for _ in range(repeats):
        left = budget_s - (time.perf_counter() - started)
        for row in bench_training(device, batch_sizes=(batch,), size=crop, steps=steps, warmup=warmup, compile_modes=(False,),
                                  precisions=tuple(precisions), budget_s=max(left, 0.0)):
            key = (row["implementation"], row["precision"])
            if key not in best or row.get("slices_per_s", 0.0) > best[key].get("slices_per_s", 0.0):
                best[key] = row
    rows = list(best.values())
    result = {"crop": crop, "batch": batch, "steps": steps, "warmup": warmup, "repeats": repeats, "rows": rows}
    for precision in precisions:
        plain = find(rows, "plain", batch, precision)
        result[precision] = {
            "lightning_vs_plain": ratio(find(rows, "lightning", batch, precision), plain),
            "basicunet_vs_suite": ratio(find(rows, "basicunet", batch, precision), plain),
        }
    return result


# -- (h) sliding-window prediction of one volume -----------------------------------------------
def untrained_liver_network(device: str = "cpu") -> BaselineUNet:
    """The paper's 3D U-Net, untrained, its head set to predict liver everywhere (see the module docstring)."""
    torch.manual_seed(0)
    task = BaselineUNet(spatial_dims=3)
    set_head(task, 4.0)
    return task.eval().to(device)


def predict_volume(predict: Predictor, data: Path, work: Path, roi: Sequence[int], device: str = "cpu",
                   image_size: int = IMAGE_SIZE, slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
                   overlap: float = 0.25, mode: str = "gaussian", threshold: float = 0.5) -> tuple[np.ndarray, dict[str, float], CachedVolume]:
    """The suite's 3D evaluation chain on the first volume of ``data``: (liver mask bool (Z, H, W) at the original
    resolution, seconds per part, the cache entry). ``predict`` maps windows to logits, on ``device``."""
    from monai.inferers import SlidingWindowInferer  # MONAI's inferers import a lot; only this part needs them

    device = torch.device(device)
    roi = tuple(int(n) for n in roi)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=2, overlap=overlap, mode=mode)
    with torch.inference_mode():  # first-call initialisation (and cuDNN autotuning) out of the timed parts
        predict(torch.zeros(2, 1, *roi, device=device))
    parts = {}

    def timed(label, function):
        _synchronize(device)
        start = time.perf_counter()
        value = function()
        _synchronize(device)
        parts[label] = time.perf_counter() - start
        return value

    pairs = discover(data)[:1]
    entry = timed(f"cache: decode, window, resize {image_size}",
                  lambda: build_cache(pairs, work / "cache", PreprocessSettings(image_size=image_size), workers=1, progress=False)[0])
    volume = CachedVolume(entry)
    sample = timed(f"resample z to {slice_spacing_mm:g} mm, read",
                   lambda: WholeVolume3DDataset([volume], [0], "liver", slice_spacing_mm)[0])
    with torch.inference_mode():
        image = sample["image"][None]  # (1, 1, Z', S, S), as the evaluation loader batches it
        probs = timed("sliding window + sigmoid", lambda: torch.sigmoid(inferer(image.to(device), predict)).float()[0])  # (1, Z', S, S)
        original = timed("to_original_slices",
                         lambda: to_original_slices(probs, volume, slice_spacing_mm).clamp_(0, 1).transpose(0, 1))  # (Z, 1, S, S)
        mask = timed("upsample, threshold, largest comp.",
                     lambda: liver_mask(original, tuple(volume.full_shape[1:]), threshold))
    return mask, parts, volume


def bench_predict(work: Path, quick: bool, device: str = "cpu", roi: Sequence[int] | None = None,
                  shape: Sequence[int] | None = None, image_size: int = IMAGE_SIZE) -> dict:
    """(h): seconds per volume of ``predict_volume`` on a phantom of ``shape`` (x, y, z) at ``PREDICT_SPACING``."""
    roi = tuple(roi or (CPU_CROP if quick else FULL_CROP))
    shape = tuple(shape or (QUICK_PREDICT_SHAPE if quick else PREDICT_SHAPE))
    write_phantom_dataset(work / "predict_data", volumes=1, seed=1, shape=shape, spacing=PREDICT_SPACING)
    task = untrained_liver_network(device)
    predict = lambda window: task(window)["seg"]  # noqa: E731 - the logits, as evaluate_volume_3d blends them
    mask, parts, volume = predict_volume(predict, work / "predict_data", work / "predict", roi, device, image_size)
    z, y, x = volume.full_shape
    resampled = np.load(next(volume.entry.glob("image3d_*mm.npy")), mmap_mode="r").shape
    return {"shape": f"{x}x{y}x{z}", "spacing_mm": list(PREDICT_SPACING), "resampled_shape": list(resampled), "roi": list(roi),
            "mask_shape": list(mask.shape), "liver_fraction": float(mask.mean()),
            "seconds": sum(parts.values()), "parts": parts}


# -- (i) 3D crop loading ----------------------------------------------------------------------
def write_crop_volumes(work: Path, volumes: int = 2, slices: int = 100) -> list[Path]:
    """Cache entries of ``volumes`` 256x256x``slices`` phantoms at 1.6 mm pixels and 2.5 mm slices."""
    write_phantom_dataset(work / "crop_data", volumes=volumes, seed=2, shape=(IMAGE_SIZE, IMAGE_SIZE, slices), spacing=(1.6, 1.6, 2.5))
    return build_cache(discover(work / "crop_data"), work / "crop_cache", PreprocessSettings(image_size=IMAGE_SIZE), workers=1, progress=False)


def bench_crop_loading(entries: Sequence[Path], samples: int, augment: bool, crop: Sequence[int] = FULL_CROP, warm: int = 20) -> dict:
    """Crops/s of ``Crop3DDataset`` (target liver, positive_fraction 0.5) in one process with one torch thread.

    The first ``warm`` samples (memory maps opened, page cache filled, as in a worker after its first batch)
    are not timed.
    """
    volumes = [CachedVolume(entry) for entry in entries]
    transform = InPlaneAugmentation().set_random_state(0) if augment else None
    dataset = Crop3DDataset(volumes, range(len(volumes)), crop_size=crop, target="liver", positive_fraction=0.5,
                            samples_per_volume=samples, transform=transform)  # resamples along z here, untimed
    order = np.random.default_rng(0).integers(0, len(dataset), warm + samples)
    torch.manual_seed(0)  # the crops' centres
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in order[:warm]:
            dataset[i]
        start = time.perf_counter()
        for i in order[warm:]:
            sample = dataset[i]
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"samples": samples, "volumes": len(volumes), "crop": list(dataset.crop_size), "augment": augment,
            "resampled_shape": list(dataset.volumes[0].shape), "sample_shape": list(sample["image"].shape),
            "seconds": elapsed, "crops_per_s": samples / elapsed}


# -- the run ----------------------------------------------------------------------------------
def run(quick: bool = False, device: str = "cpu", budget_s: float = 240.0) -> dict:
    """Every figure of (g), (h) and (i): cheap parts first, so a device budget or time limit cuts the train matrix."""
    started = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    elif torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = True  # experiments/gpu.yaml's setting: the windows and crops have one shape
    try:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            predict = bench_predict(work, quick, device)
            entries = write_crop_volumes(work)
            crops = bench_crop_loading(entries, samples=100 if quick else 400, augment=False)
            augmented = bench_crop_loading(entries, samples=20 if quick else 80, augment=True)
        if cuda:
            step = bench_train_step(FULL_CROP, device, steps=5 if quick else 15, warmup=3, repeats=2,
                                    precisions=("32-true", "bf16-mixed"), budget_s=budget_s)
        else:
            step = bench_train_step(QUICK_CROP if quick else CPU_CROP, device, steps=2 if quick else 3, warmup=1, repeats=1 if quick else 2)
    finally:
        torch.set_num_threads(threads)
    return {"device": device, "threads": torch.get_num_threads() if cuda else 1, "train_step": step, "predict": predict,
            "crops": crops, "crops_augmented": augmented, "wall_s": time.perf_counter() - started}


def _step_label(step: dict, precision: str) -> str:
    return f"batch {step['batch']} of {'x'.join(map(str, step['crop']))}, {precision}"


def print_report(result: dict) -> None:
    step, predict, crops, augmented = (result[k] for k in ("train_step", "predict", "crops", "crops_augmented"))
    batch = step["batch"]
    print(f"\n3D benchmarks on {result['device']} ({result['threads']} torch thread(s)); crops (D, H, W), volumes x*y*z")
    rows = []
    for precision in (p for p in ("32-true", "bf16-mixed") if p in step):
        lightning, plain, basic = (find(step["rows"], name, batch, precision) for name in ("lightning", "plain", "basicunet"))
        seconds = lambda row: f"{batch / row['slices_per_s']:.3f} s/step" if row.get("slices_per_s") else row.get("skipped", "-")[:40]  # noqa: E731
        memory = lambda row: f", {row['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in row else ""  # noqa: E731
        label = _step_label(step, precision)
        rows += [
            ("(g) 3D step, Lightning", label, seconds(lightning) + memory(lightning), _ratio(step[precision]["lightning_vs_plain"]), "<= 1.05x"),
            ("    plain PyTorch loop", f"best of {step['repeats']} x {step['steps']} steps", seconds(plain) + memory(plain), "1", ""),
            ("    MONAI BasicUNet, same widths", "same loop, loss, batches", seconds(basic) + memory(basic), _ratio(step[precision]["basicunet_vs_suite"]), ""),
        ]
    rows.append(("(h) sliding-window prediction", f"1 vol {predict['shape']}, windows {'x'.join(map(str, predict['roi']))}",
                 f"{predict['seconds']:.2f} s/volume", "", ""))
    rows += [(f"      {part}", "", f"{seconds:.2f} s", f"{seconds / predict['seconds']:.1%}", "") for part, seconds in predict["parts"].items()]
    for name, figures in (("(i) 3D crops, 1 worker", crops), ("    same, InPlaneAugmentation", augmented)):
        rows.append((name, f"{figures['samples']} crops {'x'.join(map(str, figures['crop']))} of {figures['volumes']} vols",
                     f"{figures['crops_per_s']:,.1f} crops/s", "", ""))
    print(f"{'benchmark':40s} {'workload':38s} {'measured':24s} {'ratio':8s} target")
    for row in rows:
        print(f"{row[0]:40s} {row[1]:38s} {row[2]:24s} {row[3]:8s} {row[4]}")
    print(f"(the whole run: {result['wall_s']:.0f} s)")


def _ratio(value: float | None) -> str:
    return f"{value:.3f}x" if value is not None else "-"


def summary(result: dict) -> dict:
    """The figures of the last-line JSON."""
    step, predict = result["train_step"], result["predict"]
    figures = {
        "device": result["device"],
        "threads": result["threads"],
        "step_crop": list(step["crop"]),
        "step_batch": step["batch"],
    }
    for precision, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
        if precision not in step:
            continue
        lightning = find(step["rows"], "lightning", step["batch"], precision)
        figures[f"step3d_s_{tag}"] = round(step["batch"] / lightning["slices_per_s"], 4) if lightning.get("slices_per_s") else None
        figures[f"step3d_vs_plain_loop_{tag}"] = step[precision]["lightning_vs_plain"]
        figures[f"basicunet3d_vs_suite_{tag}"] = step[precision]["basicunet_vs_suite"]
        if "peak_memory_gib" in lightning:
            figures[f"step3d_peak_memory_gib_{tag}"] = round(lightning["peak_memory_gib"], 3)
    figures.update({
        "predict3d_volume": predict["shape"],
        "predict3d_s_per_volume": round(predict["seconds"], 3),
        "predict3d_parts_s": {part: round(seconds, 3) for part, seconds in predict["parts"].items()},
        "crops3d_per_s": round(result["crops"]["crops_per_s"], 1),
        "crops3d_augmented_per_s": round(result["crops_augmented"]["crops_per_s"], 1),
        "wall_s": round(result["wall_s"], 1),
    })
    return figures
