"""Exact surface distances between two masks: MONAI's values, at a cost that stays low at LiTS scale.

``surface_distances(pred, truth, spacing)`` returns what MONAI's
``get_edge_surface_distance(pred, truth, spacing=spacing, symmetric=True)`` returns as its distances (the
ones behind ``compute_hausdorff_distance`` and ``compute_average_surface_distance``), to the last bit and in
the same order:

* The surface (edge) of a mask is ``mask XOR binary_erosion(mask)``, scipy's default structure (the
  face-neighbour cross) with background outside the array: a voxel is on the surface when one of its
  ``2 * ndim`` face neighbours is background or outside (``mask_edges``).
* ``d(P->T)`` holds, for every edge voxel of ``P`` in C (raster) order, the euclidean distance in mm to the
  nearest edge voxel of ``T``, float32; ``d(T->P)`` the other way. Coordinates are ``index * spacing`` in
  float64, as in MONAI.

Why not call MONAI (``tests/lightning_modules/metrics/test_surface_distance.py`` keeps MONAI as the reference; the
timings are in docs/benchmarks.md):

* On a trained model's prediction most of MONAI's time goes to scipy's binary erosion, cropping and ``argwhere``.
  Here the edges come from numpy slicing on the masks' joint bounding box (grown by one voxel, as MONAI crops;
  every voxel outside it is background in both masks, so the edges are the whole volume's), edge voxels lying on
  the other mask's edge (distance 0) are not queried, and the KD-tree is built faster (``_TREE``).
* MONAI's KD-tree query slows down as the queried surface lies far from the other one: scipy's tree cells
  are the split planes' boxes, not the points' (a flat surface's cells reach into the empty space around it),
  so a far query visits many cells, and a liver predicted in the whole volume is slow to score with MONAI.
  Each direction is first queried within a small radius (``_near_radius``);
  the voxels left beyond it are timed on a sample and then answered by the KD-tree, or by scipy's exact
  euclidean feature transform of the box (``_nearest_edge_voxels``, whose cost is the box's voxel count, not
  the distance) when that is cheaper. Both give the same float64 distance, rounded to the same float32
  (tested on both ways), so the choice, which may vary with the machine's load, changes only the time.
* The queries run on ``torch.get_num_threads()`` threads and the two directions' transforms in two threads
  (scipy releases the GIL), so a metric worker pinned to one thread stays on one.
* On a GPU this module still runs on the CPU (a GPU path is not built: MONAI's needs cuCIM, not a dependency).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import KDTree

_TRANSFORM_S_PER_VOXEL = 0.2e-6  # the cost model's estimate of scipy's exact feature transform, per voxel on one thread
_PROBE_QUERIES = 256  # far queries timed to choose between the KD-tree and the transform
# MONAI's leaf size (a larger leaf than scipy's default suits one batched query). Sliding-midpoint splits without
# shrinking the cells build several times faster and query as fast; the nearest distances do not depend on the tree's shape.
_TREE = {"leafsize": 32, "balanced_tree": False, "compact_nodes": False}


def _extent(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """Per axis ``(first, last + 1)`` of the mask's foreground, or None when it is empty.

    Each axis is found inside the slab the previous axes left, so only the first pass reads the whole
    volume (once); the others read the (small) slab.
    """
    extent: list[tuple[int, int]] = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        slab = mask[tuple(slice(*e) for e in extent)]  # the axes before `axis` cut to their extent
        hits = np.flatnonzero(slab.any(axis=others))
        if hits.size == 0:
            return None
        extent.append((int(hits[0]), int(hits[-1]) + 1))
    return extent


def joint_box(pred: np.ndarray, truth: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``pred | truth`` grown by ``margin`` voxels (clipped to the array);
    None when both are empty. Never forms ``pred | truth`` on the full volume."""
    extents = [e for e in (_extent(pred), _extent(truth)) if e is not None]
    if not extents:
        return None
    return tuple(
        slice(max(0, min(e[axis][0] for e in extents) - margin), min(size, max(e[axis][1] for e in extents) + margin))
        for axis, size in enumerate(pred.shape)
    )


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """The edge voxels of a bool N-D mask, ``mask XOR binary_erosion(mask)`` as MONAI's ``get_mask_edges``
    computes them (scipy's default cross structure, background outside the array), by slicing.

    Shapes: ``(H, W) -> (H, W)``, ``(Z, H, W) -> (Z, H, W)``; bool in, bool out.
    """
    inner = mask.copy()
    for axis in range(mask.ndim):
        def part(index):
            return tuple(index if a == axis else slice(None) for a in range(mask.ndim))

        inner[part(slice(1, None))] &= mask[part(slice(None, -1))]  # the neighbour before along `axis` is set
        inner[part(slice(None, -1))] &= mask[part(slice(1, None))]  # and the one after
        inner[part(0)] = False  # outside the array is background
        inner[part(-1)] = False
    return np.logical_xor(mask, inner, out=inner)  # inner is inside mask: the XOR is mask minus inner


def _near_radius(spacing: np.ndarray) -> float:
    """The first query's bound (mm): two of the coarsest voxel steps. Small, because a far query's cost grows
    with the bound even when nothing lies within it."""
    return 2.0 * float(spacing.max())


def _query(query: np.ndarray, target: np.ndarray, target_edges: np.ndarray, scale: np.ndarray, threads: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances (mm) from the ``query`` voxel indices (n, ndim) to the nearest of the ``target`` indices
    (whose mask is ``target_edges``), and the positions among ``query`` still to be read off the box's distance
    transform (empty when the KD-tree answered them all, the cheaper way)."""
    distances = np.zeros(len(query), dtype=np.float64)
    todo = np.flatnonzero(~target_edges[tuple(query.T)])  # a voxel on the other edge is at distance 0
    if todo.size == 0:
        return distances, todo
    tree = KDTree(target * scale, **_TREE)
    points = query[todo] * scale
    found = tree.query(points, k=1, distance_upper_bound=_near_radius(scale), workers=threads)[0]
    far = np.flatnonzero(np.isinf(found))
    if far.size:
        # A far query's cost varies a hundredfold with the surfaces' shapes, so it is timed on an
        # evenly spread sample; the rest goes to the KD-tree or the transform, whichever is cheaper. Both give the
        # same values, so the choice (which may vary with the machine's load) changes only the time.
        probe = far[:: max(1, far.size // _PROBE_QUERIES)]
        start = time.perf_counter()
        found[probe] = tree.query(points[probe], k=1, workers=threads)[0]
        per_query = (time.perf_counter() - start) / probe.size
        far = far[np.isinf(found[far])]
        if far.size * per_query <= target_edges.size * _TRANSFORM_S_PER_VOXEL:
            found[far] = tree.query(points[far], k=1, workers=threads)[0]
            far = far[:0]
    distances[todo] = found
    return distances, todo[far]


def _nearest_edge_voxels(edges: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """scipy's exact euclidean feature transform of the box: for every voxel the index of its nearest edge voxel,
    int32 (ndim, *box): less memory and time than the distance transform, since the distances are then formed at
    the queried voxels only (``_distances_to``)."""
    return ndimage.distance_transform_edt(~edges, sampling=scale, return_distances=False, return_indices=True)


def _distances_to(nearest: np.ndarray, points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Float64 distances from the voxel indices ``points`` (n, ndim) to their nearest edge voxels in the feature
    transform ``nearest``: scipy's own distance formula, operation for operation, so its values to the bit."""
    offsets = (nearest[(slice(None), *points.T)] - points.T.astype(np.int32)).astype(np.float64)
    offsets *= scale[:, None]
    offsets *= offsets
    return np.sqrt(np.add.reduce(offsets, axis=0))


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d(P->T), d(T->P))``: MONAI's symmetric edge surface distances (mm) of two bool masks of one shape.

    Args:
        pred, truth: bool N-D arrays of one shape, both with some foreground.
        spacing: one positive size (mm) per axis.
    Returns:
        Two float32 CPU tensors: the distances from every edge voxel of ``pred`` (C order) to ``truth``'s
        edge, and from ``truth``'s to ``pred``'s; MONAI's values to the last bit.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.dtype != bool or truth.dtype != bool or pred.shape != truth.shape or len(spacing) != pred.ndim:
        raise ValueError(f"surface distances need two bool masks of one shape and one spacing per axis, got "
                         f"{pred.dtype} {pred.shape}, {truth.dtype} {truth.shape} and spacing {tuple(spacing)}")
    box = joint_box(pred, truth, margin=1)
    if box is None or not pred[box].any() or not truth[box].any():
        raise ValueError("surface distances need two masks with some foreground each")
    edges = mask_edges(pred[box]), mask_edges(truth[box])
    points = [np.argwhere(e) for e in edges]  # C order, as MONAI's
    scale = np.asarray(spacing, dtype=np.float64)
    threads = max(1, torch.get_num_threads())
    directions = [(0, 1), (1, 0)]  # (query, target): P->T, T->P
    answers = [_query(points[q], points[t], edges[t], scale, threads) for q, t in directions]
    pending = [i for i, (_, far) in enumerate(answers) if far.size]
    if pending:  # both directions' transforms at once: scipy releases the GIL
        with ThreadPoolExecutor(min(threads, len(pending))) as pool:
            transforms = pool.map(_nearest_edge_voxels, [edges[directions[i][1]] for i in pending], [scale] * len(pending))
            for i, nearest in zip(pending, transforms):
                distances, far = answers[i]
                distances[far] = _distances_to(nearest, points[directions[i][0]][far], scale)
    return tuple(torch.from_numpy(distances.astype(np.float32)) for distances, _ in answers)
