"""Segmentation metrics: per-slice and per-volume Dice and Hausdorff distance, DDP-safe slice collection.

Conventions (all figures the suite reports follow them):

* Masks are binary and channel-first, ``C`` target channels (``C=1`` liver or lesion, ``C=2`` liver+lesion).
  Every metric is computed per channel, then averaged over the channels (unweighted).
* Dice is MONAI's ``compute_dice`` (``include_background=True``, ``ignore_empty=False``):
  ``2|P & T| / (|P| + |T|)``; prediction and target both empty -> 1.0; exactly one empty -> 0.0.
  Per slice it is MONAI's function; per volume the same formula from exact integer voxel counts.
* Per-volume figures are computed on the joint bounding box of prediction and target grown by one
  voxel (the largest component on the prediction's box): exactly the whole volume's figures (see
  ``_channel_figures``) at the cost of the liver's box rather than the whole volume's.
* Hausdorff is MONAI's ``compute_hausdorff_distance`` with its defaults: euclidean distance between the
  mask edges (``mask XOR binary_erosion(mask)``, computed on the masks' cropped bounding box), symmetric
  (``directed=False``). The ``p``-th percentile variant (hd95) is MONAI's: the percentile of each
  direction's surface distances (``torch.quantile``, linear interpolation), then the max of both directions.
  A volume's surface distances are MONAI's to the last bit, computed by ``surface_distance.surface_distances``
  (at a fraction of MONAI's cost: see there).
  Empty masks, where MONAI returns NaN or inf, are handled here and never reach MONAI:
  both empty -> 0.0; exactly one empty -> the diagonal of the field of view, the worst distance possible
  inside the image: ``sqrt(H^2 + W^2)`` pixels for a slice (spacing 1), and
  ``sqrt((Z*sz)^2 + (H*sy)^2 + (W*sx)^2)`` mm for a (C, Z, H, W) volume of spacing ``(sz, sy, sx)``,
  where ``Z`` counts the slices compared. No NaN or inf ever reaches an aggregate.
* Slice metrics are taken at the training resolution on ``probs >= threshold``, per slice and channel: MONAI's
  ``compute_dice`` and the Hausdorff above (spacing 1), each averaged over the channels, float32. They are not
  computed in the evaluation loop: ``SliceRecords.update`` stores the two masks they are computed on, bit-packed
  (``pred_bits``: ``probs >= threshold`` of the float probabilities, so any threshold gives exactly the old masks,
  not the uint8-quantised ones; ``target_bits``: the training-resolution target, which no ``load_target`` holds).
  After the epoch, ``volume_scoring.volume_figures(..., with_slices=True)`` scores a volume's slices beside its volume figures, in
  the same worker, and ``split_slice_figures`` / ``summarize_slices`` average the gathered values in the records'
  (volume, slice) order; ``slice_figures`` computes them in-process. The values are MONAI's to the last bit
  (``tests/lightning_modules/metrics/test_slice_volume.py`` keeps MONAI's per-slice computation as the reference): the Dice is
  the same float32 expression of the same integer counts, and the Hausdorff the same KD-tree query of the same
  edge pixels (``_slice_hausdorff_px``), without MONAI's per-call overhead.
  For volumes, the slice
  probabilities are stored quantised to uint8 (``round(255 p)``, error <= 0.5/255; at threshold 0.5 it
  flips no training-resolution pixel: ``p >= 0.5`` <=> ``round(255 p) >= 128``), upsampled in-plane to
  the original resolution by bilinear interpolation (``align_corners=False``), thresholded (``>=``),
  reduced to their largest 3D connected component on chosen channels, and compared in mm with the
  evaluated slices of the ground truth.
  The evaluated slices are stacked as if adjacent: z-distances are exact only for contiguous slices
  (a warning is issued otherwise).
* Per-volume figures are computed (``volume_scoring``) in worker processes where a share of volumes is large
  enough (``metric_workers``): each worker runs exactly the in-process computation on one volume, so the
  figures are the same to the last bit whatever the number of workers.
* Largest connected component: 26-connectivity (MONAI's default for 3D, full connectivity) via
  ``scipy.ndimage.label``; MONAI's ``get_largest_connected_component_mask`` needs scikit-image, which is not
  a dependency of the suite. Ties between equally large components keep the first in raster order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import KDTree

from lightning_modules.metrics.surface_distance import joint_box, mask_edges, surface_distances
from lightning_modules.metrics.slice_records import check_mask_pair, unpack_bits

SLICE_KEYS = ("slice_dice", "slice_hd_px")  # a row's per-slice figures with ``volume_figures(..., with_slices=True)``
VOLUME_KEYS = ("dice_volume", "hd95_volume_mm", "hd_volume_mm")
COUNT_KEYS = ("tp_voxels", "fp_voxels", "fn_voxels")  # per volume, summed over channels


# -- helpers ---------------------------------------------------------------------------------------
def _as_bool_tensor(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CPU bool tensor; refuses label maps (values other than 0/1) rather than silently merging labels."""
    if isinstance(mask, np.ndarray):
        mask = np.ascontiguousarray(mask)  # torch refuses negative strides (e.g. flipped NIfTI arrays)
    tensor = torch.as_tensor(mask).detach().cpu()
    if tensor.dtype != torch.bool:
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError("binary masks must be bool or contain only 0 and 1")
        tensor = tensor != 0
    return tensor


def as_bool_array(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """``_as_bool_tensor`` for numpy work: a bool array (no copy of a bool array or CPU tensor)."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        return mask
    return _as_bool_tensor(mask).numpy()


def _hausdorff(
    pred: np.ndarray, target: np.ndarray, diagonal: float, spacing: list[float], percentiles: Sequence[float | None]
) -> list[float]:
    """Hausdorff distances between two bool spatial masks (one channel), one per percentile (None: the maximum).

    MONAI's ``compute_hausdorff_distance`` (symmetric: the larger of the two directed distances),
    with the surface distances computed once for all percentiles; the empty-mask convention of the module.
    """
    pred_any, target_any = bool(pred.any()), bool(target.any())
    if not pred_any and not target_any:
        return [0.0] * len(percentiles)
    if pred_any != target_any:
        return [diagonal] * len(percentiles)
    distances = surface_distances(pred, target, spacing)
    return [
        float(max(d.max() if p is None else torch.quantile(d.float(), p / 100) for d in distances))
        for p in percentiles
    ]


def _slice_hausdorff_px(pred: np.ndarray, target: np.ndarray) -> float:
    """The Hausdorff distance (px) of two non-empty bool (H, W) masks: MONAI's ``get_edge_surface_distance``
    (``symmetric=True``, spacing 1) to the last bit, without its per-call overhead.

    The same computation: the edges of both masks on their joint bounding box grown by one pixel (MONAI's crop), then
    for each direction the same ``scipy.spatial.KDTree(leafsize=32).query`` of one edge's pixels against the other's
    in float64 coordinates (integers: every squared distance is exact, whatever the origin), the distances rounded to
    float32 as MONAI returns them. Edge pixels on the other edge (distance 0) are not queried: they cannot raise the
    maximum, which is 0.0 when no pixel is left.
    """
    box = joint_box(pred, target, margin=1)
    edges = mask_edges(pred[box]), mask_edges(target[box])
    distance = 0.0
    for a, b in (edges, edges[::-1]):
        query = np.argwhere(a & ~b)
        if len(query):
            tree = KDTree(np.argwhere(b).astype(np.float64), leafsize=32)
            distance = max(distance, float(tree.query(query.astype(np.float64), k=1)[0].max()))
    return float(np.float32(distance))


def slice_mask_figures(pred: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice Dice and Hausdorff (px) of bool (N, C, H, W) arrays, each averaged over channels: float32 (N,) CPU
    tensors, MONAI's values to the last bit (see the module docstring)."""
    n, channels, height, width = pred.shape
    n_pred = torch.from_numpy(pred.sum(axis=(2, 3), dtype=np.int64))
    n_target = torch.from_numpy(target.sum(axis=(2, 3), dtype=np.int64))
    tp = torch.from_numpy((pred & target).sum(axis=(2, 3), dtype=np.int64))
    # MONAI's DiceHelper.compute_channel, elementwise on the same int64 sums: (2.0 * |P & T|) / (|T| + |P|) (float32);
    # |T| = 0: 1.0 if |P| = 0 else 0.0 (ignore_empty=False)
    dice = torch.where(n_target > 0, (2.0 * tp) / (n_target + n_pred), (n_pred == 0).float())
    diagonal = math.hypot(height, width)
    hd = [
        0.0 if not (p_any or t_any) else diagonal if p_any != t_any else _slice_hausdorff_px(pred[i, c], target[i, c])
        for i in range(n)
        for c, (p_any, t_any) in enumerate(zip((n_pred[i] > 0).tolist(), (n_target[i] > 0).tolist()))
    ]
    hd = torch.tensor(hd, dtype=torch.float32).reshape(n, channels)
    return dice.float().mean(dim=1), hd.mean(dim=1)


# -- public functions ------------------------------------------------------------------------------
def slice_dice_hausdorff(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice Dice and Hausdorff (100th percentile, pixels), each averaged over channels: MONAI's ``compute_dice``
    and ``get_edge_surface_distance`` values with the module's empty-mask conventions.

    Args:
        pred, target: bool (B, C, H, W).
    Returns:
        ``(dice, hausdorff_px)``, float32 (B,) on ``pred``'s device.
    """
    device = pred.device
    pred, target = _as_bool_tensor(pred), _as_bool_tensor(target)
    check_mask_pair(pred, target, 4)
    dice, hd = slice_mask_figures(pred.numpy(), target.numpy())
    return dice.to(device), hd.to(device)


def _channel_figures(pred: np.ndarray, target: np.ndarray, spacing: list[float], diagonal: float) -> dict[str, float]:
    """Dice, hd95, Hausdorff and TP/FP/FN voxels of two bool (Z, H, W) masks, computed on their joint bounding
    box grown by one voxel: every voxel outside it is background in both, so the counts and the Dice are those
    of the whole volume, and the one-voxel rim gives the erosion at the box's border the background it would
    see in the whole volume, so MONAI's edges, and every distance, are too (distances do not depend on the
    origin). ``diagonal`` is the whole volume's, for the empty-mask convention."""
    box = joint_box(pred, target, margin=1)
    if box is None:  # both empty: a perfect answer
        return {"dice": 1.0, "hd95": 0.0, "hd": 0.0, "tp_voxels": 0, "fp_voxels": 0, "fn_voxels": 0}
    p, t = pred[box], target[box]  # views: nothing of the volume is copied
    hd95, hd = _hausdorff(p, t, diagonal, spacing, [95, None])
    tp, n_pred, n_target = int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))
    # MONAI's compute_dice, 2|P & T| / (|P| + |T|), from exact integer counts (one of P, T is not empty here)
    return {"dice": 2 * tp / (n_pred + n_target), "hd95": hd95, "hd": hd,
            "tp_voxels": tp, "fp_voxels": n_pred - tp, "fn_voxels": n_target - tp}


def volume_mask_figures(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """``volume_dice_hausdorff`` plus the TP/FP/FN voxels summed over channels, of bool (C, Z, H, W) arrays."""
    check_mask_pair(pred, target, 4)
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (sz, sy, sx), got {spacing}")
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape[1:], spacing)))
    channels = [_channel_figures(pred[c], target[c], spacing, diagonal) for c in range(pred.shape[0])]
    return {
        "dice_volume": float(np.mean([c["dice"] for c in channels])),
        "hd95_volume_mm": float(np.mean([c["hd95"] for c in channels])),
        "hd_volume_mm": float(np.mean([c["hd"] for c in channels])),
    } | {key: sum(c[key] for c in channels) for key in COUNT_KEYS}


def volume_dice_hausdorff(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """Dice, hd95 and Hausdorff (mm) of bool (C, Z, H, W) masks of spacing ``(sz, sy, sx)`` mm.

    Returns ``{'dice_volume', 'hd95_volume_mm', 'hd_volume_mm'}``, each averaged over channels. Computed on
    the masks' joint bounding box (exact: see ``_channel_figures``), so a 512x512x450 volume costs what
    its liver's box does.
    """
    figures = volume_mask_figures(as_bool_array(pred), as_bool_array(target), spacing)
    return {key: figures[key] for key in VOLUME_KEYS}


def _largest_component_3d(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool (Z, H, W) mask; labelled inside the mask's bounding box
    (every component lies in it), so the cost is the box's, not the volume's."""
    box = joint_box(mask, mask)
    if box is None:
        return mask
    labels, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))  # 26-connectivity
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    out = np.zeros_like(mask)
    out[box] = labels == int(np.argmax(sizes))  # argmax: first (raster order) of equally large components
    return out


def largest_connected_component(mask: torch.Tensor | np.ndarray, channels: Sequence[int]) -> torch.Tensor | np.ndarray:
    """Keep only the largest 3D connected component of the listed channels of a bool (C, Z, H, W) mask.

    Other channels are untouched; an empty channel stays empty. Returns the input's type (and device).
    """
    is_tensor = isinstance(mask, torch.Tensor)
    array = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
    if array.ndim != 4:
        raise ValueError(f"expected a (C, Z, H, W) mask, got shape {array.shape}")
    out = array.astype(bool, copy=True)
    for c in channels:
        out[c] = _largest_component_3d(out[c])
    return torch.from_numpy(out).to(mask.device) if is_tensor else out


# -- epoch summaries -------------------------------------------------------------------------------
def slice_figures(records: dict[str, torch.Tensor], chunk: int = 256) -> dict[str, torch.Tensor]:
    """Every record's Dice and Hausdorff (px) at the training resolution, computed here (in this process, ``chunk``
    slices at a time): ``{'dice', 'hausdorff_px'}``, float32 (N,) CPU tensors in the records' order.

    The values ``SliceRecords.update`` computed in the evaluation loop before it deferred them, to the last bit;
    ``volume_figures(..., with_slices=True)`` computes the same per volume, in its workers."""
    width = records["probs_u8"].shape[-1]
    parts = [slice_mask_figures(unpack_bits(records["pred_bits"][start : start + chunk], width),
                            unpack_bits(records["target_bits"][start : start + chunk], width))
             for start in range(0, records["volume_index"].numel(), chunk)]  # numel: compute() squeezes one record
    if not parts:
        return {"dice": torch.zeros(0), "hausdorff_px": torch.zeros(0)}
    return {"dice": torch.cat([d for d, _ in parts]), "hausdorff_px": torch.cat([h for _, h in parts])}


def split_slice_figures(
    per_volume: dict[int, dict],
) -> tuple[dict[int, dict[str, float]], dict[str, torch.Tensor]]:
    """Rows of ``volume_figures(..., with_slices=True)`` (every volume's, gathered: ``gather_volume_rows``) ->
    ``(rows without the per-slice figures, {'dice', 'hausdorff_px'})``: the per-slice figures as ``slice_figures``
    gives them, float32 (N,) tensors in the records' (volume, slice) order, for ``summarize_slices``."""
    rows, dice, hd = {}, [], []
    for v, figures in per_volume.items():
        rows[v] = {key: value for key, value in figures.items() if key not in SLICE_KEYS}
    for v in sorted(per_volume):
        dice.extend(per_volume[v][SLICE_KEYS[0]])
        hd.extend(per_volume[v][SLICE_KEYS[1]])
    return rows, {"dice": torch.tensor(dice, dtype=torch.float32), "hausdorff_px": torch.tensor(hd, dtype=torch.float32)}


def summarize_slices(records: dict[str, torch.Tensor], figures: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Mean Dice and Hausdorff (px) over the slices of ``SliceRecords.compute()``.

    ``figures``: the records' per-slice figures from ``split_slice_figures`` (scored per volume in the workers);
    None: computed here (``slice_figures``). The means are taken on the records' device, as they were when the
    records held the figures, so they are the same floats to the last bit.
    """
    count = records["volume_index"].numel()  # compute() squeezes a single record's indices to 0-d
    if count == 0:
        raise ValueError("no slice records to summarise")
    figures = slice_figures(records) if figures is None else figures
    if not len(figures["dice"]) == len(figures["hausdorff_px"]) == count:
        raise ValueError(f"{len(figures['dice'])} per-slice figures for {count} slice records (score every volume)")
    device = records["volume_index"].device
    return {
        "dice_slice": float(figures["dice"].to(device).double().mean()),
        "hd_slice_px": float(figures["hausdorff_px"].to(device).double().mean()),
    }
