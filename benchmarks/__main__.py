"""Benchmarks of the suite's hot paths: ``python -m benchmarks [--quick]``.

(a) preprocessing (decode + reorient + window + resize + write the cache) with its default
    parallelism (one process per core, over volumes) against a plain sequential nibabel decode of
    the same files; target at most 1.3x. The single-process ratio is printed too.
(b) cached random-slice loading through the training Dataset (no augmentation), one worker;
    target at least 10,000 slices/s.
(c) the baseline LightningModule's train step under a Lightning Trainer against a plain PyTorch
    loop with the same model, batches, optimizer and scheduler; target at most 1.05x.
(d) the mask-mining train step (on-the-fly mining: one extra forward pass of the frozen base per
    batch) against the baseline's train step, both under Lightning: the price of mining on the fly
    instead of storing error masks.
(e) cached full-resolution lesion crops through the cascade's ``LiverCropDataset`` (target lesion, crop
    256, 1 input channel, no augmentation), one worker, on volumes of LiTS' in-plane size (512x512);
    target at least 5,000 crops/s.
(f) the 2D cascade's whole-volume inference on the CPU (``benchmarks/cascade_inference.py``): ``lits
    predict`` of one 512x512x100 volume (``--quick``: 512x512x8; model loading excluded) and where
    that time goes, and one ``lits test`` evaluation pass (cascade + LiTS metrics) over the same
    volume, in seconds per volume.

``--device cuda`` runs the accelerator benchmarks instead (``benchmarks/device_training.py``), ``--volumetric`` the 3D
path's (``benchmarks/volumetric.py``), ``--scale lits`` the epoch at LiTS scale (``benchmarks/lits_scale.py``): each
module's docstring says what it measures.

Ratios are measured within one run, alternating the two sides and keeping each side's best
repeat, because these machines are noisy. The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules.io.cache import CachedVolume, build_cache
from datamodules.io.preprocess import PreprocessSettings
from datamodules.datasets.slices import SliceDataset
from datamodules.io.nifti import discover
from datamodules.io.phantom import write_phantom_dataset
from datamodules.datasets.liver_region import LiverCropDataset
from lightning_modules import BaselineUNet, MaskMining
from lightning_modules.base import adam

from benchmarks import volumetric
from benchmarks.cascade_inference import bench_cascade
from benchmarks.preprocessing import bench_preprocess
from benchmarks.lits_scale import bench_lits_scale
from benchmarks.lits_scale import print_report as print_lits_report
from benchmarks.lits_scale import summary as lits_summary
from benchmarks.device_training import progress_bar_readback, bench_training, find, print_table, ratio
from benchmarks.device_training import random_batches as device_batches


def _read_seconds(dataset, samples: int) -> float:
    """Seconds to read ``samples`` random samples of ``dataset`` in one process with one torch thread.

    One thread, as in a DataLoader worker (torch sets it there): the float16 -> float32 copies go through
    torch, and on a busy machine a 2-thread copy of one slice can wait milliseconds for the second core.
    """
    order = np.random.default_rng(0).integers(0, len(dataset), samples)
    torch.manual_seed(0)  # the lesion crops' centres
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in order[:200]:  # open the memory maps and warm the page cache, as a worker does after its first batch
            dataset[i]
        start = time.perf_counter()
        for i in order:
            dataset[i]
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def bench_loading(work: Path, samples: int) -> dict:
    volumes = [CachedVolume(entry) for entry in sorted((work / "cache").iterdir())]
    dataset = SliceDataset(volumes, range(len(volumes)), [np.arange(v.num_slices) for v in volumes])
    elapsed = _read_seconds(dataset, samples)
    return {"samples": samples, "seconds": elapsed, "slices_per_s": samples / elapsed}


def bench_lesion_crops(entries: list[Path], samples: int) -> dict:
    volumes = [CachedVolume(entry) for entry in entries]
    dataset = LiverCropDataset(volumes, range(len(volumes)), target="lesion", context_slices=0, crop_size=256)
    elapsed = _read_seconds(dataset, samples)
    return {"samples": samples, "volumes": len(volumes), "shape": CachedVolume(entries[0]).full_shape, "crops_per_s": samples / elapsed}


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``skip`` to the end of the last batch (loop overhead included)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def random_batches(count: int, batch_size: int, size: int) -> list[dict]:
    """The accelerator benchmark's random batches, on the CPU in the default layout."""
    return device_batches(count, batch_size, size, torch.device("cpu"), channels_last=False)


def lightning_seconds(module: pl.LightningModule, batches: list[dict], warmup: int) -> float:
    """Wall time of the training steps after ``warmup`` under a Lightning Trainer."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.end - timer.start


def bench_train_step(steps: int, warmup: int, batch_size: int, size: int, repeats: int) -> dict:
    batches = random_batches(steps + warmup, batch_size, size)

    def make_module():
        torch.manual_seed(0)
        return BaselineUNet(lr=1e-3, scheduler="cosine_warm_restarts", restart_period=1)

    def plain_loop():
        module = make_module()
        optimizer = adam(module.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=len(batches))
        module.train()
        for index, batch in enumerate(batches):
            if index == warmup:
                start = time.perf_counter()
            loss = module.segmentation_loss(module(batch["image"])["seg"], batch["mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        return time.perf_counter() - start

    plain, lightning = float("inf"), float("inf")
    for _ in range(repeats):
        plain = min(plain, plain_loop())
        lightning = min(lightning, lightning_seconds(make_module(), batches, warmup))
    return {"steps": steps, "batch": f"{batch_size}x1x{size}x{size}", "plain_s": plain, "lightning_s": lightning, "ratio": lightning / plain}


def bench_mining_step(work: Path, steps: int, warmup: int, batch_size: int, size: int, repeats: int) -> dict:
    batches = random_batches(steps + warmup, batch_size, size)
    torch.manual_seed(0)
    base = BaselineUNet(lr=1e-3, scheduler="none")
    checkpoint = work / "base.ckpt"
    torch.save({"state_dict": base.state_dict(), "hyper_parameters": dict(base.hparams)}, checkpoint)
    plain, mining = float("inf"), float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        plain = min(plain, lightning_seconds(BaselineUNet(lr=1e-3, scheduler="none"), batches, warmup))
        mining = min(mining, lightning_seconds(MaskMining(base_checkpoint=str(checkpoint), lr=1e-3, scheduler="none"), batches, warmup))
    return {"steps": steps, "batch": f"{batch_size}x1x{size}x{size}", "baseline_s": plain, "mining_s": mining, "ratio": mining / plain}


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (a smoke run, noisier)")
    parser.add_argument("--device", default="cpu", help="cpu (default: the suite's CPU hot paths) or an accelerator, e.g. cuda")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds the --device training matrix (with --volumetric: the 3D train step's) may take before it skips the rest")
    parser.add_argument("--scale", choices=("suite", "lits"), default="suite",
                        help="suite: the hot paths above; lits: the epoch's parts at LiTS scale (benchmarks/lits_scale.py)")
    parser.add_argument("--ranks", type=int, default=1, help="--scale lits: processes sharing the LiTS epoch (DDP ranks)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="--scale lits: the validation's batch (default 6 on the CPU, 32 on a device, 16 with --quick)")
    parser.add_argument("--volumetric", action="store_true",
                        help="the 3D path instead: train step, sliding-window prediction, crop loading (benchmarks/volumetric.py)")
    return parser


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    if args.volumetric:
        if args.scale != "suite":
            parser.error("--volumetric and --scale lits are separate benchmarks: run one at a time")
        return volumetric_main(args)
    if args.scale == "lits":
        return lits_scale_main(args)
    if args.device != "cpu":
        return device_main(args)
    return suite_main(args)


def suite_main(args) -> None:
    """(a)-(f), the suite's CPU hot paths, as one table and one JSON line."""
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shape = (256, 256, 16) if args.quick else (512, 512, 48)
        write_phantom_dataset(work / "data", volumes=2 if args.quick else 4, seed=0, shape=shape, spacing=(0.8, 0.8, 2.5))
        pre = bench_preprocess(work / "data", work, repeats=1 if args.quick else 3)
        load = bench_loading(work, samples=2000 if args.quick else 20000)
        size, steps, repeats = (128, 3, 1) if args.quick else (256, 12, 3)
        mining = bench_mining_step(work, steps=steps, warmup=2, batch_size=6, size=size, repeats=repeats)
        if args.quick:  # (a)'s volumes are smaller than LiTS' 512x512 slices: 2 volumes of 512x512x20 for (e)
            write_phantom_dataset(work / "lits_size", volumes=2, seed=0, shape=(512, 512, 20), spacing=(0.8, 0.8, 2.5))
            entries = build_cache(discover(work / "lits_size"), work / "lits_size_cache", PreprocessSettings(image_size=256), progress=False)
        else:  # (a)'s cache: 4 volumes of 512x512x48
            entries = sorted(entry for entry in (work / "cache").iterdir() if not entry.name.startswith("."))
        crops = bench_lesion_crops(entries, samples=2000 if args.quick else 20000)
        write_phantom_dataset(work / "volume", volumes=1, seed=1, shape=(512, 512, 8 if args.quick else 100), spacing=(0.8, 0.8, 2.5))
        cascade = bench_cascade(work / "volume", work / "cascade")
    step = bench_train_step(steps=steps, warmup=2, batch_size=6, size=size, repeats=repeats)

    rows = [
        ("(a) preprocess vs plain decode", f"{pre['volumes']} vols {shape[0]}x{shape[1]}x{shape[2]}, {pre['workers']} procs", f"{pre['preprocess_s']:.2f} s vs {pre['decode_s']:.2f} s", f"{pre['ratio']:.2f}x", "<= 1.3x"),
        ("    same, preprocess in 1 process", "", f"{pre['single_s']:.2f} s vs {pre['decode_s']:.2f} s", f"{pre['single_ratio']:.2f}x", ""),
        ("(b) cached random slices", f"{load['samples']} samples, 1 worker", f"{load['slices_per_s']:,.0f} slices/s", "", ">= 10,000/s"),
        ("(c) Lightning step vs plain loop", f"{step['steps']} steps of {step['batch']}", f"{step['lightning_s']:.2f} s vs {step['plain_s']:.2f} s", f"{step['ratio']:.3f}x", "<= 1.05x"),
        ("(d) mask-mining step vs baseline", f"{mining['steps']} steps of {mining['batch']}", f"{mining['mining_s']:.2f} s vs {mining['baseline_s']:.2f} s", f"{mining['ratio']:.3f}x", ""),
        ("(e) cached lesion crops, 1 worker", f"{crops['samples']} from {crops['volumes']} vols {crops['shape'][1]}x{crops['shape'][2]}x{crops['shape'][0]}", f"{crops['crops_per_s']:,.0f} crops/s", "", ">= 5,000/s"),
        ("(f) lits predict, 2D cascade, CPU", f"1 vol {cascade['shape']}, {torch.get_num_threads()} threads", f"{cascade['predict_s']:.2f} s/volume", "", ""),
        *((f"      {part}", "", f"{seconds:.2f} s", f"{seconds / cascade['predict_s']:.1%}", "") for part, seconds in cascade["parts"].items()),
        ("    lits test pass, same volume", "cascade + LiTS metrics", f"{cascade['test_s']:.2f} s/volume", "", ""),
        ("      LiTS metrics", "", f"{cascade['metrics_s']:.2f} s", f"{cascade['metrics_s'] / cascade['test_s']:.1%}", ""),
    ]
    print(f"\n{'benchmark':34s} {'workload':30s} {'measured':24s} {'ratio':8s} target")
    for row in rows:
        print(f"{row[0]:34s} {row[1]:30s} {row[2]:24s} {row[3]:8s} {row[4]}")
    print(json.dumps({
        "preprocess_vs_decode": round(pre["ratio"], 3),
        "preprocess_vs_decode_1proc": round(pre["single_ratio"], 3),
        "cached_slices_per_s": round(load["slices_per_s"], 1),
        "step_vs_plain_loop": round(step["ratio"], 3),
        "mining_step_vs_baseline_step": round(mining["ratio"], 3),
        "lesion_crops_per_s": round(crops["crops_per_s"], 1),
        "predict_s_per_volume": round(cascade["predict_s"], 3),
        "test_pass_s_per_volume": round(cascade["test_s"], 3),
    }))


def lits_scale_main(args) -> None:
    from experiments.commands.console import quiet_library_noise

    quiet_library_noise()
    with tempfile.TemporaryDirectory() as folder:
        result = bench_lits_scale(Path(folder), args.quick, args.ranks, args.device, args.eval_batch_size)
    print_lits_report(result, args.device)
    print(json.dumps(lits_summary(result, args.device)))


def volumetric_main(args) -> None:
    from experiments.commands.console import quiet_library_noise

    quiet_library_noise()
    result = volumetric.run(args.quick, args.device, args.budget)
    if torch.device(args.device).type == "cuda":
        print(f"\ndevice: {torch.cuda.get_device_name(torch.device(args.device))}")
        print_table(result["train_step"]["rows"], unit="crops")
    volumetric.print_report(result)
    print(json.dumps(volumetric.summary(result)))


def device_main(args) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    steps, batch_sizes = (10, (10, 64)) if args.quick else (30, (10, 64))
    rows = bench_training(str(device), batch_sizes=batch_sizes, steps=steps, budget_s=args.budget)
    readback = progress_bar_readback(str(device), steps=steps)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_phantom_dataset(work / "volume", volumes=1, seed=1, shape=(512, 512, 8 if args.quick else 100), spacing=(0.8, 0.8, 2.5))
        cascade = bench_cascade(work / "volume", work / "cascade", device=str(device))
    print(f"\ndevice: {name}")
    print_table(rows)
    print(f"\n(f) lits predict, 2D cascade, 1 vol {cascade['shape']}: {cascade['predict_s']:.2f} s/volume")
    for part, seconds in cascade["parts"].items():
        print(f"      {part:32s} {seconds:.2f} s")
    print(f"    lits test pass (validation work per volume): {cascade['test_s']:.2f} s, of which LiTS metrics {cascade['metrics_s']:.2f} s")
    print(f"\nLightning step, batch {readback['batch']} {readback['precision']}: {readback['with_s']:.3f} s with the losses in the "
          f"progress bar (a host read-back per step), {readback['without_s']:.3f} s without: {readback['ratio']:.3f}x")
    lightning, plain = find(rows, "lightning", 64, "bf16-mixed"), find(rows, "plain", 64, "bf16-mixed")
    print(json.dumps({
        "device": name,
        "lightning_b64_bf16_slices_per_s": lightning.get("slices_per_s"),
        "lightning_vs_plain_b64_bf16": ratio(lightning, plain),
        "basicunet_vs_suite_b64_bf16": ratio(find(rows, "basicunet", 64, "bf16-mixed"), plain),
        "channels_last_vs_nchw_b64_bf16": ratio(find(rows, "plain", 64, "bf16-mixed", channels_last=True), plain),
        "compile_gain_b64_bf16": ratio(plain, find(rows, "plain", 64, "bf16-mixed", compiled=True)),
        "peak_memory_gib_b64_bf16": lightning.get("peak_memory_gib"),
        "progress_bar_readback_b10_bf16": readback["ratio"],
        "predict_s_per_volume": round(cascade["predict_s"], 3),
        "test_pass_s_per_volume": round(cascade["test_s"], 3),
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
