"""The training augmentation applied to a whole batch on its device: one resampling per sample.

``training_augmentation`` (``datamodules.augment.sample``) augments each sample on the CPU in the DataLoader workers,
with MONAI's ``RandFlipd`` (each in-plane axis), ``RandRotated`` and ``RandZoomd`` one after another.
``BatchAugmentation`` draws the same random parameters from the same distributions, composes the
four into one affine map per sample and resamples the batch once with ``grid_sample`` (on a grid in
``affine_grid``'s convention) wherever the batch is (a GPU keeps the workers free for loading).

Its random stream is a function of (seed, rank, batch number): each batch's parameters come from a
CPU ``torch.Generator`` seeded with a hash of the three. Its state is therefore just the seed and the
number of batches drawn, the same on every rank of a run, so the one checkpoint Lightning writes (rank
0's) restores every rank's stream exactly, and ranks still draw independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Keeps this stream apart from any other stream a hash of (seed, rank, counter) might seed.
_STREAM = 0x61756762  # "augb"


def stream_seed(seed: int, rank: int, batch: int) -> int:
    """The generator seed of batch number ``batch`` of rank ``rank`` in a run seeded with ``seed``.

    NumPy's ``SeedSequence`` hashes the three, so neighbouring seeds, ranks and batches give unrelated
    streams. (torch's CPU generator keeps 32 bits of the seed: among ~10^5 batches of a run a pair
    may share its parameters, which leaves the distribution unchanged.)
    """
    return int(np.random.SeedSequence([seed, rank, batch, _STREAM]).generate_state(1, np.uint64)[0])


class BatchAugmentation:
    """Random flips, rotation and zoom in the axial plane of a training batch, on the batch's device.

    The same parameter distributions as ``training_augmentation(flip_prob, rotate_degrees, zoom_range,
    prob)``, MONAI 1.x semantics, drawn independently for each sample:

    * flips: each in-plane axis (rows, then columns) is mirrored with probability ``flip_prob``
      (``RandFlipd(spatial_axis=0)``, ``RandFlipd(spatial_axis=1)``);
    * rotation: with probability ``prob``, by an angle uniform in
      ``[-radians(rotate_degrees), radians(rotate_degrees)]`` about the image centre, output
      pixel (row, col) reading input ``R(angle) @ (row, col)`` relative to the centre with
      ``R = [[cos, -sin], [sin, cos]]`` (``RandRotated(range_x=radians(rotate_degrees))``);
    * zoom: with probability ``prob``, by one factor uniform in ``zoom_range`` for both axes about the
      centre, a factor above 1 enlarging the content, the size kept (``RandZoomd(min_zoom, max_zoom,
      keep_size=True)``).

    MONAI applies them in that order, resampling after the rotation and again after the zoom; here
    the composed map (input = flip @ rotation @ zoom^-1 @ output, in centred pixel coordinates) is
    resampled once, which blurs the image less. Images are interpolated bilinearly, masks by nearest
    neighbour; outside the input, both read the nearest border pixel (MONAI's rotation pads with
    ``border``, its zoom with ``edge``: the same values). The difference from the MONAI pipeline that
    remains: MONAI's zoom rounds the zoomed size down to whole pixels (an effective factor off by
    up to 1 / size), which moves mask boundaries by at most a pixel.
    A sample with no transform drawn is resampled at its own pixel centres: unchanged up to float
    rounding of the image (masks exactly).

    Batch keys (B = batch size; every tensor on one device; the spatial size may differ from batch
    to batch but is shared by the keys of one batch):

    ==============  ============================  ==========================================
    key             value                         what happens to it
    ==============  ============================  ==========================================
    ``image``       floating (B, K, H, W)         resampled bilinearly (K: the slice and its
                                                  context channels, one map for all)
    ``mask``        (B, C, H, W), 0/1             resampled by nearest neighbour (C: 1 or 2
                                                  target channels); any dtype, kept
    ``label``       (B,)                          recomputed: 1 where the augmented ``mask``
                                                  has a pixel above 0.5, else 0 (dtype kept;
                                                  float32 if absent)
    anything else   any                           passed through unchanged (e.g.
                                                  ``crop_origin`` keeps the crop's position
                                                  before augmentation)
    ==============  ============================  ==========================================

    ``image_keys`` and ``mask_keys`` name the keys to resample each way; absent ones are skipped.

    The random stream: ``seed(seed, rank)`` starts it (the data module calls it at ``setup("fit")``
    with ``torch.initial_seed()``, which ``seed_everything`` sets, and the trainer's global rank);
    batch number n draws its parameters from a ``torch.Generator`` seeded with ``stream_seed(seed,
    rank, n)``, eight uniforms per sample. ``state_dict()`` (seed and batches drawn) and
    ``load_state_dict()`` save and restore it; the rank is not saved, each process keeps its own.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        rotate_degrees: float = 15.0,
        zoom_range: Sequence[float] = (0.9, 1.1),
        prob: float = 0.5,
        image_keys: Sequence[str] = ("image",),
        mask_keys: Sequence[str] = ("mask",),
        intensity_shift: float = 0.0,
        intensity_scale: float = 0.0,
    ):
        self.intensity_shift, self.intensity_scale = float(intensity_shift), float(intensity_scale)
        self.flip_prob = float(flip_prob)
        self.max_angle = math.radians(abs(rotate_degrees))
        self.zoom_range = (float(min(zoom_range)), float(max(zoom_range)))
        self.prob = float(prob)
        self.image_keys = tuple(image_keys)
        self.mask_keys = tuple(mask_keys)
        self.generator = torch.Generator()
        self.seed(0)
        # The sampling grid is reused from batch to batch: on a CPU a fresh one is mapped anew by the
        # allocator each time, and its page faults are a sizeable part of the augmentation.
        self._grid: torch.Tensor | None = None

    # -- the random stream ----------------------------------------------------------------------
    def seed(self, seed: int, rank: int = 0) -> None:
        """Start the stream of ``seed`` for process ``rank``, at batch 0."""
        self.seed_value, self.rank, self.batches = int(seed), int(rank), 0

    def state_dict(self) -> dict:
        return {"seed": self.seed_value, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by ``state_dict`` (of any rank) for this process's rank."""
        self.seed_value, self.batches = int(state["seed"]), int(state["batches"])

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """The next batch's parameters for ``n`` samples (CPU tensors), advancing the stream by one batch.

        ================  =================  ==============================================
        key               value              meaning
        ================  =================  ==============================================
        ``flip``          bool (n, 2)        mirror rows (column 0) / columns (column 1)
        ``rotated``       bool (n,)          the rotation is applied
        ``angle``         float64 (n,)       rotation in radians (0 where not rotated)
        ``zoomed``        bool (n,)          the zoom is applied
        ``zoom``          float64 (n,)       zoom factor (1 where not zoomed)
        ``scale``         float64 (n,)       image intensity factor, 1 + U(-intensity_scale, intensity_scale)
        ``shift``         float64 (n,)       image intensity offset, U(-intensity_shift, intensity_shift)
        ================  =================  ==============================================
        """
        self.generator.manual_seed(stream_seed(self.seed_value, self.rank, self.batches))
        self.batches += 1
        # all eight uniforms are drawn whatever is applied, so a batch's draws never depend on another's; the
        # intensity pair comes last, so the first six are those drawn before it existed
        u = torch.rand(8, n, dtype=torch.float64, generator=self.generator)
        rotated, zoomed = u[2] < self.prob, u[4] < self.prob
        low, high = self.zoom_range
        return {
            "flip": (u[:2] < self.flip_prob).T.contiguous(),
            "rotated": rotated,
            "angle": torch.where(rotated, (2 * u[3] - 1) * self.max_angle, 0.0),
            "zoomed": zoomed,
            "zoom": torch.where(zoomed, low + (high - low) * u[5], 1.0),
            "scale": 1 + (2 * u[6] - 1) * self.intensity_scale,
            "shift": (2 * u[7] - 1) * self.intensity_shift,
        }

    # -- resampling -----------------------------------------------------------------------------
    @staticmethod
    def theta(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """``affine_grid``'s (n, 2, 3) matrices for ``params`` on ``height`` x ``width`` images (float64, CPU).

        In centred pixel coordinates (row, col), input = F @ R(angle) @ (output / zoom), F = diag(+-1,
        +-1): MONAI's flip, then rotation, then zoom, each mapping its output back to its input.
        ``affine_grid`` wants (x, y) = (col, row) order and coordinates normalised by half the size
        (``align_corners=False``, where the image centre is 0, as MONAI's rotation and zoom use).
        """
        angle, zoom = params["angle"].double(), params["zoom"].double()
        sign = torch.where(params["flip"], -1.0, 1.0).double()
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # rows of F @ R @ zoom^-1 in (row, col) order
        row_row, row_col = sign[:, 0] * cos, -sign[:, 0] * sin
        col_row, col_col = sign[:, 1] * sin, sign[:, 1] * cos
        theta = torch.zeros(len(angle), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = col_col
        theta[:, 0, 1] = col_row * height / width
        theta[:, 1, 0] = row_col * width / height
        theta[:, 1, 1] = row_row
        return theta

    def apply(self, batch: dict, params: dict[str, torch.Tensor]) -> dict:
        """``batch`` with its image and mask keys resampled by ``params`` (see ``draw``) and ``label`` recomputed."""
        out = dict(batch)
        present = [k for k in self.image_keys + self.mask_keys if k in batch]
        if not present:
            return out
        reference = batch[present[0]]
        for key in present:
            if batch[key].ndim != 4 or batch[key].shape[-2:] != reference.shape[-2:]:
                raise ValueError(
                    f"batch augmentation needs (B, C, H, W) tensors of one spatial size; {key!r} is {tuple(batch[key].shape)}, "
                    f"{present[0]!r} {tuple(reference.shape)}"
                )
        n, (height, width) = reference.shape[0], reference.shape[-2:]
        theta = self.theta(params, height, width).to(reference.device, torch.float32)
        if self._grid is None or self._grid.shape != (n, height, width, 2) or self._grid.device != reference.device:
            self._grid = torch.empty(n, height, width, 2, device=reference.device, dtype=torch.float32)
        with torch.no_grad():
            grid = _affine_grid(theta, self._grid)
            for key in present:
                mode = "bilinear" if key in self.image_keys else "nearest"
                out[key] = _resample(batch[key], grid, mode)
                if key in self.image_keys and (self.intensity_scale or self.intensity_shift):
                    scale = params["scale"].to(out[key].device, out[key].dtype).view(-1, 1, 1, 1)
                    shift = params["shift"].to(out[key].device, out[key].dtype).view(-1, 1, 1, 1)
                    out[key] = out[key] * scale + shift
            if "mask" in out:
                label = batch.get("label")
                # the maximum above 0.5 is "any pixel above 0.5" in one pass, without a boolean copy of the masks
                any_foreground = out["mask"].flatten(1).amax(1) > 0.5
                out["label"] = any_foreground.to(label.dtype if isinstance(label, torch.Tensor) else torch.float32)
        return out

    def __call__(self, batch: dict) -> dict:
        """Augment ``batch`` with the next parameters of the stream."""
        n = next((batch[k].shape[0] for k in self.image_keys + self.mask_keys if k in batch), 0)
        return self.apply(batch, self.draw(n)) if n else dict(batch)


def _affine_grid(theta: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.affine_grid(theta, (n, 1, height, width), align_corners=False)`` written into ``grid`` (n, height, width, 2),
    for matrices without translation.

    Each coordinate of the grid is a sum of a row term and a column term; two broadcast additions are
    cheaper on a CPU than ``affine_grid``'s batched matrix product.
    """
    height, width = grid.shape[1:3]
    xs = (torch.arange(width, device=grid.device, dtype=grid.dtype) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(height, device=grid.device, dtype=grid.dtype) * 2 + 1) / height - 1
    for axis in range(2):
        torch.add((theta[:, axis, 0, None] * xs)[:, None, :], (theta[:, axis, 1, None] * ys)[:, :, None], out=grid[..., axis])
    return grid


def _resample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` sampled at ``grid`` (border padding), returned in ``x``'s dtype.

    Sampling runs in float32 (float64 for float64 input): in bfloat16 the grid positions of a
    256-pixel image would be off by up to half a pixel; integer and bool masks are sampled as floats.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    sampled = F.grid_sample(x.to(work), grid.to(work), mode=mode, padding_mode="border", align_corners=False)
    return sampled.to(x.dtype)
