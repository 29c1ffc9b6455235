"""Synthetic, deterministic, LiTS-like abdominal CT phantom: the embedded default dataset.

Every command of the suite can run on a fresh machine without downloads: ``write_phantom_dataset``
writes ``volume-<i>.nii.gz`` / ``segmentation-<i>.nii.gz`` pairs that look like LiTS on disk.

Conventions
-----------
``make_phantom_volume`` returns arrays in nibabel's canonical RAS+ voxel frame: saved with a positive
diagonal affine, ``nib.as_closest_canonical`` leaves them unchanged. In RAS+ (nibabel's
``ornt2axcodes``: default labels ``(('L','R'), ('P','A'), ('I','S'))`` name the negative and positive
end of each axis) world +x points to the patient's Right, +y Anterior, +z Superior. Hence the liver
(patient's right) lies at HIGH axis-0 indices, the spleen at low ones, the spine at low axis-1 indices
and the top slices (high axis-2 index) are superior. The real LiTS-layout sample in tests/data agrees.
On disk the arrays are stored flipped along x and y with an LPS affine (``aff2axcodes`` == L, P, S),
as many LiTS files are; a loader that reorients with ``as_closest_canonical`` recovers them exactly.

Anatomy model
-------------
Anatomy is specified in mm for the reference field of view 384 x 384 x 240 mm (the default shape
times the default spacing) and scaled to the actual field of view, so small test volumes still show
the whole abdomen; spacing only enters the affine. Structures are analytic shapes on a coordinate
grid (elliptic cylinders, ellipsoids) whose boundaries are perturbed by smooth random fields, painted
in order: air, body (subcutaneous fat, muscle wall, bowel-like interior with fat and gas pockets),
paraspinal and psoas muscles, vertebra, ribs, aorta/IVC, kidneys in perirenal fat, stomach, spleen,
liver, hypodense lesions. Spleen, kidneys, vessels and muscle share the liver's HU range, so a HU
window alone cannot segment the liver (best window Dice ~0.55-0.82); position and shape can. Two things vary
per volume as they do across LiTS' scanners: the contrast phase (unenhanced or portal-venous, which moves
every organ's HU, the spleen from below the liver to above it) and the in-plane field of view
(``FOV_SCALE_RANGE``: the body fills more or less of the slice; the written spacing says by how much).
Finally CT-like noise is added and the image is slightly blurred in-plane (partial volume, noise
correlation). The label is exactly liver (1) and lesions (2), as in LiTS.
"""
from __future__ import annotations

import os
import pathlib
from concurrent.futures import ProcessPoolExecutor, as_completed

import nibabel as nib
import numpy as np
from scipy import ndimage

from datamodules.io.atomic import write_atomically

PHANTOM_VERSION = 4  # in the phantom's cache folder name: raise it whenever a generated voxel changes

_REF_FOV_MM = (384.0, 384.0, 240.0)
#: in-plane field of view of a volume, as a factor of the reference 384 mm: LiTS' 512 x 512 slices at
#: ~0.55-1.0 mm span ~280-510 mm, so the same body fills more or less of the slice
FOV_SCALE_RANGE = (0.9, 1.25)
#: lesion radius range (mm) and mean count per lesion-bearing volume (see ``lesion_statistics``)
LESION_RADIUS_MM = (3.0, 35.0)
AIR, FAT, GAS = -1000.0, -100.0, -900.0
_BLUR_SIGMA = (0.6, 0.6, 0.0)  # in-plane voxels; CT reconstruction kernels blur in-plane only


def field_of_view_scale(seed: int) -> float:
    """The volume's in-plane field of view over the reference one, from its own random stream, so that the
    writer (for the affine's spacing) and the painter (for the anatomy) agree without passing it around."""
    return float(np.random.default_rng((seed, 2)).uniform(*FOV_SCALE_RANGE))


def phantom_spacing(seed: int, spacing) -> tuple[float, float, float]:
    """The voxel spacing (mm) volume ``seed`` is written with: the nominal in-plane spacing times its
    field-of-view scale; slices keep the nominal thickness."""
    scale = field_of_view_scale(seed)
    return (float(spacing[0]) * scale, float(spacing[1]) * scale, float(spacing[2]))


def _axes(shape, scale: float = 1.0):
    """Voxel-centre coordinates (mm, FOV-centred) as broadcastable (X,1,1), (1,Y,1), (1,1,Z), for a field of
    view of the reference one times ``scale`` in-plane."""
    out = []
    fovs = (_REF_FOV_MM[0] * scale, _REF_FOV_MM[1] * scale, _REF_FOV_MM[2])
    for axis, (n, fov) in enumerate(zip(shape, fovs)):
        c = ((np.arange(n) + 0.5) / n - 0.5) * fov
        out.append(c.astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)]))
    return out


def _interp_matrix(n, c, width=0.7):
    """(n, c) Gaussian-kernel weights from c coarse nodes to n voxel centres, rows of unit L2 norm
    so that interpolated white noise keeps unit variance everywhere, borders included."""
    t = (np.arange(n) + 0.5) / n * c - 0.5
    w = np.exp(-0.5 * ((t[:, None] - np.arange(c)[None, :]) / width) ** 2)
    return (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)


def _smooth_field(rng, shape, cells):
    """Unit-variance smooth random field: white noise on a coarse grid of ``cells`` interpolated with
    separable Gaussian kernels. Three small matrix products, far cheaper than a full-size gaussian_filter."""
    wx, wy, wz = (_interp_matrix(n, c) for n, c in zip(shape, cells))
    field = np.tensordot(wx, rng.standard_normal(cells).astype(np.float32), axes=1)  # (X, cy, cz)
    field = np.matmul(wy, field)  # (X, Y, cz), batched over X
    return np.matmul(field, wz.T)  # (X, Y, Z), C-contiguous


def _ellipse(x, y, centre, radii, z=None):
    """Normalised radius (< 1 inside) of an ellipse / elliptic cylinder, or of an ellipsoid when z is given."""
    r2 = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    if z is not None:
        r2 = r2 + ((z - centre[2]) / radii[2]) ** 2
    return np.sqrt(r2)


def _noise_std_after_blur():
    """Factor by which the in-plane blur shrinks white noise's standard deviation."""
    delta = np.zeros(31)
    delta[15] = 1.0
    k = ndimage.gaussian_filter1d(delta, _BLUR_SIGMA[0])
    return float(np.sum(k**2))  # sqrt(sum k^2) per blurred axis, two blurred axes


def make_phantom_volume(seed: int, shape: tuple[int, int, int] = (192, 192, 48),
                        spacing: tuple[float, float, float] = (2.0, 2.0, 5.0)) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(hu, label)`` in the canonical RAS+ voxel frame (axis 0 -> patient's Right, axis 1 ->
    Anterior, axis 2 -> Superior). ``hu`` is int16 Hounsfield units, ``label`` uint8 (0 background,
    1 liver, 2 lesion inside the liver). Deterministic per ``seed``. ``spacing`` does not change the
    anatomy (it is scaled to the field of view); it is accepted for API symmetry with the writer.

    One function on purpose, read top to bottom as the painting order (later structures overwrite
    earlier ones): every structure draws its random numbers in turn from one stream, and most of them
    place themselves against earlier ones (body outline, spine, liver height), so helpers would pass a
    dozen shared values around and make the order of the draws, which fixes every voxel, harder to see."""
    del spacing
    rng = np.random.default_rng(seed)
    u = rng.uniform
    shape = tuple(int(n) for n in shape)
    x, y, z = _axes(shape, field_of_view_scale(seed))
    # Contrast phase: LiTS is mostly portal-venous CT (the liver ~100-130 HU, the spleen as bright or
    # brighter, vessels and kidneys brighter still), with some unenhanced scans (the liver ~55-65 HU, the
    # spleen ~10 HU below it; the real sample in tests/data is one) and every timing and dose between.
    # 0 = unenhanced, 1 = full enhancement; continuous, so that a few training volumes cover the range.
    enhance = u()
    hu = np.full(shape, AIR, np.float32)
    paint = lambda mask, value: np.copyto(hu, value, where=mask)  # noqa: E731 - broadcasts both

    # Body: elliptic cylinder whose semi-axes vary slowly along z; fat rim, muscle wall, cavity.
    bx, by, ax0, ay0 = u(-8, 8), u(-15, 5), u(150, 170), u(110, 130)
    ax = ax0 * (1 + 0.04 * np.sin(z / u(50, 80) + u(0, 6.3)))
    ay = ay0 * (1 + 0.04 * np.sin(z / u(50, 80) + u(0, 6.3)))
    depth = (1 - _ellipse(x, y, (bx, by), (ax, ay))) * np.sqrt(ax * ay)  # ~ mm under the skin
    fat_mm, wall_mm = u(12, 28), u(8, 14)
    paint(depth > 0, FAT + u(-10, 10))
    paint(depth > fat_mm, u(40, 50) + 5 * enhance)
    cavity = depth > fat_mm + wall_mm

    # Interior: mottled soft tissue / bowel with mesenteric fat pockets and scattered gas.
    soft = u(15, 30) + enhance * u(10, 25) + 12 * _smooth_field(rng, shape, (20, 20, 10))
    np.copyto(soft, FAT, where=_smooth_field(rng, shape, (14, 14, 8)) > 1.0)
    np.copyto(soft, GAS, where=_smooth_field(rng, shape, (24, 24, 10)) > 2.3)
    paint(cavity, soft)
    del soft
    organ_shape = np.clip(_smooth_field(rng, shape, (8, 8, 6)), -2, 2)  # perturbs organ boundaries
    texture = np.clip(_smooth_field(rng, shape, (16, 16, 8)), -2.5, 2.5)  # organ parenchyma texture

    # Spine and back muscles (constant along z); vertebral body centre ~70 mm in front of the back skin.
    vx, vy, vrx, vry = bx, by - ay0 + u(65, 80), u(20, 24), u(16, 19)
    canal_y = vy - vry - 8
    for side in (-1, 1):
        paint((_ellipse(x, y, (vx + side * 35, canal_y - 15), (28, 22)) < 1) & (depth > fat_mm / 2), u(45, 55))
        psoas_r = 6 + 16 * np.clip(-z / 120 + 0.3, 0, 1)  # psoas thickens inferiorly
        paint(_ellipse(x, y, (vx + side * (vrx + psoas_r * 0.8), vy + 5), (psoas_r, psoas_r)) < 1, u(40, 50))
    body = _ellipse(x, y, (vx, vy), (vrx, vry))
    paint(body < 1, u(250, 350))  # cancellous bone
    paint((body < 1) & (body > 0.87), u(600, 700))  # cortical shell
    canal = _ellipse(x, y, (vx, canal_y), (8, 8))
    arch = (_ellipse(x, y, (vx, canal_y), (16, 14)) < 1) & (y < vy - vry)
    paint(arch | (_ellipse(x, y, (vx, canal_y - 25), (5, 14)) < 1), u(450, 600))
    paint(canal < 1, u(5, 20))

    # Ribs: intermittent bright arcs just inside the muscle wall over the upper abdomen.
    angle = np.arctan2(y - by, x - bx)
    liver_z = u(0, 20)
    ribs = (np.abs(depth - fat_mm - wall_mm * 0.5) < 3) & (np.sin(7 * angle + z / 12) > 0.7)
    paint(ribs & (np.abs(angle - np.pi / 2) > 0.6) & (z > liver_z - 40), u(400, 600))  # gap at the front midline

    # Great vessels in front of the spine: aorta (patient's left), IVC (right); ~40-60 HU unenhanced.
    paint(_ellipse(x, y, (vx - u(12, 20), vy + vry + 14), (12, 12)) < 1, u(40, 60) + enhance * u(90, 140))
    paint(_ellipse(x, y, (vx + u(18, 26), vy + vry + 12), (13, 10)) < 1, u(40, 55) + enhance * u(60, 100))

    # Kidneys in perirenal fat, posterior either side of the spine; the right one sits lower.
    kz_right = u(-65, -40)
    for side, kz in ((1, kz_right), (-1, kz_right + u(10, 25))):
        c, r = (vx + side * u(60, 72), vy + u(0, 10), kz), (u(26, 32), u(22, 27), u(50, 60))
        paint(_ellipse(x, y, c, [1.35 * v for v in r], z) < 1 + 0.1 * organ_shape, FAT)
        paint(_ellipse(x, y, c, r, z) < 1 + 0.05 * organ_shape, u(30, 50) + enhance * u(100, 150) + 5 * texture)
        sinus = (c[0] - side * 0.45 * r[0], c[1] + 3, kz)  # renal sinus opens medially
        paint(_ellipse(x, y, sinus, [0.4 * v for v in r], z) < 1, u(-80, -40))

    # Stomach (left, anterior, upper): fluid with a wall and an anterior gas cap (patient is supine).
    sc, sr = (bx - u(40, 60), by + u(25, 45), liver_z + u(10, 30)), (u(40, 55), u(30, 40), u(40, 55))
    stomach = _ellipse(x, y, sc, sr, z) / (1 + 0.1 * organ_shape)
    paint(stomach < 1, u(35, 45) + enhance * u(20, 40))
    paint(stomach < 0.88, u(10, 20))
    paint((stomach < 0.88) & (y > sc[1] + 0.45 * sr[1]), GAS)
    del stomach

    # Spleen: left posterolateral, overlapping the upper liver's z range.
    spc = (bx - ax0 + u(50, 65), by - u(15, 40), liver_z + u(20, 40))
    spleen = _ellipse(x, y, spc, (u(22, 30), u(45, 60), u(45, 60)), z) < 1 + 0.15 * organ_shape
    paint(spleen & cavity, u(45, 55) + enhance * u(60, 80) + 4 * texture)

    # Liver: big right lobe plus a thinner left lobe reaching across the midline anteriorly.
    right = _ellipse(x, y, (bx + u(0.35, 0.5) * ax0, by + u(0.0, 0.15) * ay0, liver_z), (u(80, 95), u(72, 85), u(60, 72)), z)
    left = _ellipse(x, y, (bx - u(0.0, 0.2) * ax0, by + u(0.35, 0.5) * ay0, liver_z + u(10, 25)), (u(55, 75), u(28, 38), u(35, 45)), z)
    score = np.minimum(right, left) - 0.15 * organ_shape  # < 1 inside
    del right, left
    keep_out = _ellipse(x, y, (vx, vy + 10), (50, 45)) > 1  # spine and aorta stay outside
    liver = (score < 1) & (depth > fat_mm + wall_mm + 2) & keep_out & (np.abs(z) < 100)
    liver_hu = u(55, 65) + enhance * u(40, 60)
    paint(liver, liver_hu + u(6, 10) * texture / 2)
    label = liver.astype(np.uint8)

    # Lesions, anchored in LiTS' training set (Bilic et al., Med. Image Anal. 2023): 0 to 75 lesions a volume,
    # from tens of mm3 to hundreds of cm3, mostly hypodense against the parenchyma, some volumes lesion-free.
    # Here: 1 volume in 8 lesion-free; otherwise a geometric count (mean 3, at most 12) of near-spherical
    # lesions with log-uniform radii of LESION_RADIUS_MM (0.1 to 180 cm3), lobulated by +-10 %, centred in
    # the liver and cut to it; 20-35 HU below the parenchyma unenhanced, up to 70 HU in portal-venous phase
    # (contrast-to-noise ~1.5-6 against the 10-15 HU noise below). ``lesion_statistics`` measures them.
    deep = np.flatnonzero(liver & (score < 0.8))
    count = 0 if u() < 1 / 8 else min(int(rng.geometric(1 / 3)), 12)
    contrast = u(20, 35) + enhance * u(15, 35)
    log_r = np.log(LESION_RADIUS_MM)
    for _ in range(count if deep.size else 0):
        i, j, k = np.unravel_index(rng.choice(deep), shape)
        radius = float(np.exp(u(*log_r)))
        radii = [radius * u(0.85, 1.15) for _ in range(3)]
        lesion = _ellipse(x, y, (x[i, 0, 0], y[0, j, 0], z[0, 0, k]), radii, z) < 1 + 0.04 * texture
        lesion &= liver
        paint(lesion, liver_hu - contrast + 3 * texture)
        label[lesion] = 2

    # CT noise (white, then correlated by the in-plane blur, which also mimics partial volume).
    sigma = u(10, 15) / _noise_std_after_blur()
    hu += sigma * rng.standard_normal(shape, dtype=np.float32)
    hu = ndimage.gaussian_filter(hu, _BLUR_SIGMA, mode="nearest")
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _lps_affine(seed, shape, spacing):
    """Affine of the LPS-stored arrays (x and y flipped) with a realistic scanner origin."""
    rng = np.random.default_rng((seed, 1))  # independent stream: the origin never alters the image
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    # Stored voxel (0, 0, 0) is the patient's right-posterior corner, as DICOM LPS origins imply.
    affine[:3, 3] = (sx * (shape[0] - 1) / 2 + rng.uniform(-20, 20),
                     sy * (shape[1] - 1) / 2 + rng.uniform(50, 200),
                     -rng.uniform(300, 700))
    return affine


def _save_atomic(data, affine, spacing, path: pathlib.Path):
    """Write a NIfTI whole or not at all (``datamodules.io.atomic``): a killed run leaves no half-written volume."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(tuple(float(s) for s in spacing))
    write_atomically(path, lambda tmp: nib.save(img, tmp))


def _write_pair(vol_path: pathlib.Path, seg_path: pathlib.Path, vol_seed: int, shape, spacing) -> None:
    hu, label = make_phantom_volume(vol_seed, shape, spacing)
    spacing = phantom_spacing(vol_seed, spacing)
    affine = _lps_affine(vol_seed, shape, spacing)
    # Segmentation first: a pair counts as complete only once its volume exists.
    _save_atomic(label[::-1, ::-1, :].copy(), affine, spacing, seg_path)
    _save_atomic(hu[::-1, ::-1, :].copy(), affine, spacing, vol_path)


def lesion_statistics(seeds, shape=(192, 192, 48), spacing=(2.0, 2.0, 5.0)) -> dict[str, float]:
    """What the phantom draws, measured on the volumes of ``seeds`` (the table beside LiTS' in docs/data.md):
    the share of lesion-free volumes, lesions per volume, and lesion volumes (cm3, one lesion = one
    26-connected component of label 2; touching lesions count once, as a reader of the mask would see them)."""
    counts, sizes = [], []
    for seed in seeds:
        _, label = make_phantom_volume(seed, shape, spacing)
        voxel_cm3 = float(np.prod(phantom_spacing(seed, spacing))) / 1000.0
        components, n = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
        counts.append(n)
        sizes.extend(np.bincount(components.ravel())[1:] * voxel_cm3)
    counts, sizes = np.asarray(counts), np.asarray(sizes)
    return {"volumes": len(counts), "lesion_free_share": float(np.mean(counts == 0)),
            "lesions_median": float(np.median(counts)), "lesions_max": int(counts.max()),
            "lesion_cm3_min": float(sizes.min()), "lesion_cm3_median": float(np.median(sizes)),
            "lesion_cm3_max": float(sizes.max())}


def write_phantom_dataset(out_dir: str | os.PathLike, volumes: int = 12, seed: int = 0,
                          shape=(192, 192, 48), spacing=(2.0, 2.0, 5.0), progress: bool = False,
                          workers: int | None = None) -> list[pathlib.Path]:
    """Write volumes as LiTS layout: out_dir/volume-<i>.nii.gz and out_dir/segmentation-<i>.nii.gz, i = 0..volumes-1.
    Volume i uses seed (seed * 100003 + i) so datasets are deterministic per seed. Returns the list of volume paths.
    Skips a pair that already exists completely (idempotent); writes each file to a temporary name in out_dir and
    os.replace()s it into place so a killed run never leaves a half-written .nii.gz under the final name.
    progress=True shows a tqdm bar. ``workers`` processes write the missing pairs (default: one per CPU, at most
    one per pair); every pair depends on its own seed only, so the files are the same whatever the count."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"volume-{i}.nii.gz" for i in range(int(volumes))]
    todo = [(path, out / f"segmentation-{i}.nii.gz", seed * 100003 + i) for i, path in enumerate(paths)]
    todo = [job for job in todo if not (job[0].is_file() and job[1].is_file())]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    from tqdm import tqdm

    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="phantom volumes", unit="vol", disable=not progress) as bar:
        if workers == 1:
            for job in todo:
                _write_pair(*job, shape, spacing)
                bar.update()
        else:
            # numpy and scipy only: no torch thread pool is forked
            with ProcessPoolExecutor(workers) as pool:
                for future in as_completed([pool.submit(_write_pair, *job, shape, spacing) for job in todo]):
                    future.result()
                    bar.update()
    return paths
