"""``lits synth``: write the synthetic LiTS-like phantom dataset (LiTS layout), without importing torch or Lightning."""

from __future__ import annotations

import argparse


def synth_main(argv: list[str]) -> None:
    from datamodules.io.phantom import write_phantom_dataset

    parser = argparse.ArgumentParser(prog="lits synth", description="Write the synthetic LiTS-like phantom dataset (LiTS layout).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--volumes", type=int, default=17, help="number of volumes (default 17, CMU-Net's 10/2/5 split)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(192, 192, 48), metavar=("X", "Y", "Z"), help="voxels per volume")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 5.0), metavar=("SX", "SY", "SZ"), help="voxel spacing in mm")
    args = parser.parse_args(argv)
    paths = write_phantom_dataset(args.out, args.volumes, args.seed, tuple(args.shape), tuple(args.spacing), progress=True)
    print(f"wrote {len(paths)} phantom volumes with masks to {args.out}")
