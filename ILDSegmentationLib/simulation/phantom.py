"""A synthetic chest CT, made by code: the built-in default input of ``ildseg demo``.

No patient data may be shipped, so the demo needs a CT that a radiologist would
recognise as a chest without being one: a body with subcutaneous fat and chest-wall
muscle, two lungs that are rounded at the apex and wide at the base and wrap around
the heart and the spine, a mediastinum with fat, heart, aorta and great vessels, a
trachea that splits at the carina into main bronchi which branch on inside the
lungs, pulmonary arteries running beside the bronchi, pulmonary veins, ribs, sternum,
clavicles, a vertebral column with spinal canal, the liver and spleen below the
diaphragm, and correlated CT noise.

Conventions (those of :mod:`ILDSegmentationLib.imaging.geometry`):

* arrays are indexed **K, J, I**; the geometry has the identity direction, so
  I runs patient right -> left (+x), J anterior -> posterior (+y) and K inferior ->
  superior (+z) in LPS millimetres;
* the anatomy is defined in millimetres about the centre of the volume (which is
  the LPS origin of the model: physical position = model position), so the grid
  only samples it: a smaller ``size`` with a larger ``spacing`` gives the same chest
  at a coarser resolution, while a smaller ``size`` at 1.4 mm crops the chest.

Tubes (airways, vessels, ribs, great vessels) are drawn with partial-volume
coverage: the distance of each voxel of a tube's bounding box to the tube's axis,
evaluated for all tubes of a batch at once and at a few sub-samples through the
thickness of a slice, so thin vessels in 5 mm slices fade as they do in real CT.
The anatomy is simplified (e.g. no lobar fissures, no contrast, one vertebral
shape); it is meant to look right in a lung window, not to be an atlas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..imaging.geometry import Geometry
from .grids import VoxelGrid, unit, voxel_tube_coverage

# Attenuation of the tissues, in Hounsfield units (non-contrast CT).
HU_AIR = -1000.0
# Healthy parenchyma, measured on the six CC BY CTs of ../shared/data at 1.0 mm
# pixels (bench/lung_parenchyma.py; 2026-12, issue 24): median -811 to -880 HU (-871 on
# the five with a standard kernel), the posterior fifth of the lung's depth 17-42 HU
# denser than the anterior fifth (median 40). Before, the phantom's lung was 40 HU
# denser than that (median -829) and the bundled model called a third of it ground glass.
HU_LUNG = -915.0  # anterior (non-dependent) parenchyma at full inspiration
HU_LUNG_GRAVITY = 62.0  # the dependent (posterior) lung is denser by up to this much
#: Parenchymal texture (unresolved small vessels, secondary lobules): SD in HU and
#: correlation length (Gaussian sigma, pixels in-plane). Real lungs at 1.0 mm: local SD
#: 26-33 HU in 5 x 5 windows, 40-47 HU between neighbouring pixels (standard kernels).
LUNG_TEXTURE_SD = 24.0
LUNG_TEXTURE_SIGMA_PX = 1.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -90.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_HEART = 42.0
HU_LIVER = 60.0
HU_SPLEEN = 45.0
HU_AIRWAY_WALL = 30.0
HU_CORTEX = 750.0
HU_MARROW = 230.0
HU_VERTEBRA = 280.0  # cancellous bone of the vertebral body
HU_DISC = 85.0
HU_CSF = 15.0
HU_CARTILAGE = 110.0
NOISE_SD = 14.0  # quantum noise of a standard-dose chest CT

RIGHT_LUNG = 1
LEFT_LUNG = 2
HEALTHY = 1


@dataclass
class Phantom:
    """A synthetic chest CT and its ground truth.

    hu: int16 (K, J, I) Hounsfield units.
    geometry: spacing (mm per I, J, K step), LPS origin, identity direction.
    lung_labels: uint8 (K, J, I): 0 outside, 1 = patient's right lung, 2 = left lung.
        The lung fields, including the vessels and small airways inside them; the
        trachea and main bronchi are not lung.
    truth: uint8 (K, J, I): tissue class per voxel (0 outside the lungs, 1 healthy ...
        6 honeycombing, see :mod:`ILDSegmentationLib.classes`).
    """

    hu: np.ndarray
    geometry: Geometry
    lung_labels: np.ndarray
    truth: np.ndarray


# --------------------------------------------------------------------------- grid


def _polyline(points: Sequence[Sequence[float]], radii: Sequence[float]):
    """Segments (p0, p1, r0, r1) of a polyline through points with radii per point."""
    p = np.asarray(points, np.float64)
    r = np.asarray(radii, np.float64)
    return p[:-1], p[1:], r[:-1], r[1:]


def _concat(*parts):
    """Concatenate several (p0, p1, r0, r1) segment sets."""
    parts = [q for q in parts if len(q[0])]
    if not parts:
        e = np.zeros((0, 3))
        return e, e, np.zeros(0), np.zeros(0)
    return tuple(np.concatenate([q[i] for q in parts]) for i in range(4))


# ------------------------------------------------------------------- tree growth


def _perpendicular(u: np.ndarray, hint: np.ndarray) -> np.ndarray:
    """Unit vector perpendicular to u, as close as possible to hint."""
    w = hint - np.dot(hint, u) * u
    if np.linalg.norm(w) < 1e-3:
        w = np.cross(u, np.array([1.0, 0.0, 0.0]))
    return unit(w)


_Branch = Tuple[np.ndarray, np.ndarray, float, int]


def _grow_tree(points: np.ndarray, start: np.ndarray, radius: float, *, n_min: int = 6,
               step: float = 0.42, r_stop: float = 0.55, max_nodes: int = 50_000) -> List[_Branch]:
    """A space-filling branching tree (after Kitaoka et al. 1999) in a point cloud.

    points: (n, 3) sample positions (mm) of the organ the tree supplies; start: root
    position; radius: root radius (mm). Each branch heads for the centroid of its
    territory and goes ``step`` of the way there; the territory is then cut in two by
    a plane through the branch axis, across the territory's widest spread, and each
    half gets a daughter whose radius follows Murray's law (r^3 proportional to the
    flow, i.e. to the number of points it supplies). Returns branches as
    (start, end, radius, generation).
    """
    n_total = len(points)
    branches: List[_Branch] = []
    stack = [(np.asarray(start, np.float64), np.arange(n_total), 0)]
    while stack and len(branches) < max_nodes:
        s, idx, gen = stack.pop()
        pts = points[idx]
        r = radius * (len(idx) / n_total) ** (1.0 / 3.0)
        c = pts.sum(axis=0) / len(idx)
        v = c - s
        dist = math.sqrt(float(v @ v))
        if dist < 1.0:
            continue
        if len(idx) < n_min or r < r_stop:
            # A terminal twig reaching into its territory.
            branches.append((s, s + 0.7 * v, r, gen))
            continue
        e = s + step * v
        branches.append((s, e, r, gen))
        u = v / dist
        q = pts - c
        q -= np.outer(q @ u, u)
        _, vecs = np.linalg.eigh(q.T @ q)
        side = q @ vecs[:, -1] > 0  # across the widest spread of the territory
        for half in (idx[side], idx[~side]):
            if len(half):
                stack.append((e, half, gen + 1))
    return branches


# ------------------------------------------------------------------ the phantom

#: The thoracic cavity is centred a little in front of the body centre: the back
#: wall (ribs, scapulae, paraspinal muscles) is thicker than the front.
_CAV_Y0 = -6.0
#: x (mm) of the line where the two pleurae meet: left of the body's midline, as the
#: heart makes the left lung the smaller one.
_MIDLINE_X = 8.0
#: Squareness of the back of the cavity (2 = elliptic).
_CAV_P_POST = 2.3


@dataclass(frozen=True)
class _Body:
    """Per-seed anatomical dimensions (mm) of the model chest."""

    body_a: float  # half width of the body (left-right)
    body_b_ant: float  # anterior half depth
    body_b_post: float  # posterior half depth
    fat: float  # mean subcutaneous fat thickness
    fat_phase: Tuple[float, float]  # where the fat is thicker (random per patient)
    cav_a: float  # half width of the thoracic cavity at the base
    cav_b_ant: float  # half depths of the cavity, in front of and behind _CAV_Y0
    cav_b_post: float
    apex_z: Tuple[float, float]  # top of the right, left lung
    dome_z: Tuple[float, float]  # top of the right, left hemidiaphragm
    heart: Tuple[float, float, float]  # heart centre
    carina_z: float


def _draw_body(rng: np.random.Generator) -> _Body:
    s = float(rng.uniform(0.96, 1.04))  # overall size of this patient
    carina_z = float(32 + rng.uniform(-4, 4))
    # The heart hangs below the carina (the main bronchi run over the left atrium).
    heart = (float(20 + rng.uniform(-4, 4)), float(-24 + rng.uniform(-4, 4)), carina_z - 80.0 + float(rng.uniform(-3, 3)))
    return _Body(
        body_a=160.0 * s, body_b_ant=104.0 * s, body_b_post=116.0 * s,
        fat=float(rng.uniform(9.0, 16.0)),
        fat_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
        cav_a=137.0 * s, cav_b_ant=83.0 * s, cav_b_post=85.0 * s,
        apex_z=(float(123 + rng.uniform(-3, 3)), float(120 + rng.uniform(-3, 3))),
        dome_z=(float(-56 + rng.uniform(-6, 6)), float(-68 + rng.uniform(-6, 6))),
        heart=heart,
        carina_z=carina_z,
    )


def _superellipse_radius(x, y, a, b_ant, b_post, p_ant=2.0, p_post=2.8):
    """Normalised radius (1 on the outline) of a chest-like outline: round in front,
    flatter at the back (the patient lies on the table)."""
    post = y > 0
    b = np.where(post, b_post, b_ant)
    p = np.where(post, p_post, p_ant)
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


def _cavity_scale(z):
    """Width and depth factors of the thoracic cavity at height z (mm): the rib cage
    is narrow at the thoracic inlet and widest at the base."""
    h = np.clip((z + 20.0) / 140.0, 0.0, 1.0) ** 2
    return 1.0 - 0.45 * h, 1.0 - 0.25 * h


def _cavity_radius(x, y, z, body: _Body):
    sa, sb = _cavity_scale(z)
    return _superellipse_radius(x, y - _CAV_Y0, body.cav_a * sa, body.cav_b_ant * sb, body.cav_b_post * sb,
                                p_post=_CAV_P_POST)


def _in_spine_block(x, y):
    """Vertebra, rib heads and paraspinal muscles: the lungs stop here (mm, LPS)."""
    vb = (x / 21.0) ** 2 + ((y - 28.0) / 16.0) ** 2
    return (vb <= 1.5) | (((x / 50.0) ** 2 + ((y - 76.0) / 44.0) ** 2) <= 1.0)


def _rib_segments(body: _Body, n_ribs: int = 12):
    """Centre lines of the ribs and costal cartilages: from the vertebra along the
    transverse process, then round the cavity wall sloping down towards the front
    (so an axial slice cuts each rib obliquely into a short arc, several ribs per
    side)."""
    bone, cart = [], []
    for side in (-1.0, 1.0):
        for i in range(n_ribs):
            z_head = 126.0 - 21.5 * i
            drop = 55.0 + 5.0 * min(i, 6)  # the front of a rib lies some 3 levels lower
            # Upper ribs reach the sternum, lower ones end more laterally (false ribs).
            theta_end = 2.8 if i < 7 else 2.8 - 0.14 * (i - 6)
            theta = np.linspace(0.0, theta_end, 60)
            z = z_head - drop * theta / theta_end
            sa, sb = _cavity_scale(z)
            c, s_ = np.cos(theta), np.sin(theta)
            a = body.cav_a * sa + 6.0
            b = np.where(c > 0, body.cav_b_post, body.cav_b_ant) * sb + 6.0
            p = np.where(c > 0, _CAV_P_POST, 2.0)
            x = side * a * np.abs(s_) ** (2 / p)
            y = _CAV_Y0 + b * np.sign(c) * np.abs(c) ** (2 / p)
            # The rib leaves the spine block where the cavity wall does, so it never
            # crosses the paravertebral lung.
            first = int(np.argmax(~_in_spine_block(x, y)))
            keep = slice(max(first - 1, 0), None)
            pts = np.concatenate([[[side * 22.0, 38.0, z_head], [side * 40.0, 60.0, z_head]],
                                  np.stack([x[keep], y[keep], z[keep]], 1)])
            r = np.full(len(pts), 4.5 if i == 0 else 3.6)
            bone.append(_polyline(pts, r))
            if i < 7:  # costal cartilage to the sternum
                ce = np.array([pts[-1], [side * 14.0, _CAV_Y0 - body.cav_b_ant - 4.0, pts[-1, 2] - 6.0]])
                cart.append(_polyline(ce, [3.6, 3.6]))
    return _concat(*bone), _concat(*cart)


def _segments(lst) -> tuple:
    """(p0, p1, r, r) arrays from a list of (start, end, radius) branches."""
    if not lst:
        return _concat()
    p0 = np.array([b[0] for b in lst], np.float64)
    p1 = np.array([b[1] for b in lst], np.float64)
    r = np.array([b[2] for b in lst], np.float64)
    return p0, p1, r, r


def _paint(img: np.ndarray, cover, value: float) -> None:
    """Blend value into img (in place) where cover is true, or by the partial-volume
    fraction cover (0..1)."""
    c = np.asarray(cover, np.float32)
    img += c * (np.float32(value) - img)


def _full(a: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(a, shape)


def _outlines(grid: VoxelGrid, body: _Body):
    """Body, the muscle under the subcutaneous fat, and the thoracic cavity (bool)."""
    x, y, z = grid.x, grid.y, grid.z
    r_body = _superellipse_radius(x, y, body.body_a, body.body_b_ant, body.body_b_post)
    in_body = _full(r_body <= 1.0, grid.shape)
    # Fat thickness varies round the body (thicker at the sides and front).
    phi = np.arctan2(y, x)
    rho = 1.0 / np.sqrt((np.cos(phi) / body.body_a) ** 2 + (np.sin(phi) / body.body_b_ant) ** 2)
    t_fat = body.fat * (1.0 + 0.35 * np.cos(2 * phi + body.fat_phase[0]) + 0.2 * np.cos(3 * phi + body.fat_phase[1])
                        - 0.4 * np.clip(np.sin(phi), 0, 1))
    under_fat = _full(r_body <= 1.0 - t_fat / rho, grid.shape)
    cavity = _cavity_radius(x, y, z, body) <= 1.0
    return in_body, under_fat, cavity


@dataclass
class _Spine:
    """The vertebral column: one vertebra extruded, a disc every 30 mm."""

    vb: np.ndarray  # normalised radius of the vertebral body (<= 1 inside)
    canal: np.ndarray
    disc: np.ndarray
    vertebral_body: np.ndarray
    vb_cortex: np.ndarray
    posterior_elements: np.ndarray
    spine_block: np.ndarray


def _spine(grid: VoxelGrid) -> _Spine:
    x, y, z = grid.x, grid.y, grid.z
    full = lambda a: _full(a, grid.shape)  # noqa: E731
    vb = (x / 21.0) ** 2 + ((y - 28.0) / 16.0) ** 2  # vertebral body
    r_canal = np.sqrt(x ** 2 + (y - 56.0) ** 2)
    canal = r_canal <= 8.5
    arch = (r_canal <= 14.5) & ~canal & (y > 46.0)
    spinous = (np.abs(x) <= 4.0) & (y > 62.0) & (y < 88.0)
    transverse = (np.abs(y - 50.0 - 0.3 * (np.abs(x) - 12.0)) <= 4.5) & (np.abs(x) > 8.0) & (np.abs(x) < 34.0)
    level = np.mod(z + 7.0, 30.0)
    disc = full(level < 6.0)
    vertebral_body = full(vb <= 1.0)
    vb_cortex = vertebral_body & full(vb > 0.78)
    # The spinous processes slope down, so the gaps between them are not at the discs.
    posterior_elements = full(arch | spinous | transverse) & ~full((level > 14.0) & (level < 20.0))
    # The lungs wrap round the vertebral body into the paravertebral gutters and stop
    # at the rib heads and the paraspinal muscles behind them.
    spine_block = _in_spine_block(x, y)
    return _Spine(vb, canal, disc, vertebral_body, vb_cortex, posterior_elements, spine_block)


def _heart_diaphragm_apices(grid: VoxelGrid, body: _Body):
    """The heart's quadric (<= 1 inside), lung above the diaphragm, below the apices."""
    x, y, z = grid.x, grid.y, grid.z
    hx, hy, hz = body.heart
    ang = np.deg2rad(-38.0)  # the heart's long axis points left-anterior
    u = (x - hx) * np.cos(ang) + (y - hy) * np.sin(ang)
    v = -(x - hx) * np.sin(ang) + (y - hy) * np.cos(ang)
    ventricles = (u / 62.0) ** 2 + (v / 44.0) ** 2 + ((z - hz) / 46.0) ** 2
    atrium_r = ((x - hx + 44.0) / 26.0) ** 2 + ((y - hy - 8.0) / 27.0) ** 2 + ((z - hz - 8.0) / 36.0) ** 2
    atrium_l = ((x - hx + 10.0) / 36.0) ** 2 + ((y - hy - 30.0) / 22.0) ** 2 + ((z - hz - 14.0) / 26.0) ** 2
    heart_q = np.minimum(np.minimum(ventricles, atrium_r), atrium_l)  # <= 1 inside

    # Diaphragm: two domes, the right higher (liver), peaking a little in front of the
    # centre and sloping down towards the back, so the lung reaches lowest in the
    # posterior costophrenic recesses. The lowest lung is kept above the bottom of a
    # default scan, so the bases are complete.
    zr = body.dome_z[0] - ((x + 55.0) ** 2 / 140.0 + (y + 15.0) ** 2 / 140.0) - 0.2 * (y + 15.0)
    zl = body.dome_z[1] - ((x - 55.0) ** 2 / 140.0 + (y + 15.0) ** 2 / 140.0) - 0.2 * (y + 15.0)
    above_dia = z > np.maximum(np.maximum(zr, zl), -128.0)
    # Apices: broad domes; below them the rib cage sets the lung's width.
    z_top = np.where(x < 0,
                     body.apex_z[0] - ((x + 44.0) ** 2 + (y - 12.0) ** 2) / 120.0,
                     body.apex_z[1] - ((x - 44.0) ** 2 + (y - 12.0) ** 2) / 120.0)
    below_apex = z < z_top
    return heart_q, above_dia, below_apex


@dataclass
class _Mediastinum:
    """Central airways and great vessels, and where the lungs' trees start."""

    central_air_wall: np.ndarray
    central_air_lumen: np.ndarray
    great: np.ndarray
    envelope: np.ndarray  # mediastinal fat round the vessels and airways
    roots: Tuple[Tuple[int, np.ndarray, np.ndarray, np.ndarray], ...]  # (lung, bronchus, artery, vein)


def _mediastinum(grid: VoxelGrid, body: _Body) -> _Mediastinum:
    hx, hy, hz = body.heart
    cz = body.carina_z
    carina = np.array([0.0, -10.0, cz])
    # The main bronchi run above the left atrium: the right short and steep, the
    # left longer and more horizontal.
    r_hilum_r = carina + np.array([-30.0, 2.0, -20.0])
    r_hilum_l = carina + np.array([42.0, 8.0, -24.0])
    airway_big = _concat(
        _polyline([[0.0, -36.0, 170.0], [0.0, -32.0, 110.0], [0.0, -20.0, 60.0], carina], [9.0, 9.0, 9.0, 8.0]),
        _polyline([carina, r_hilum_r], [7.0, 6.5]),
        _polyline([carina, r_hilum_l], [6.5, 6.0]),
    )
    wall = 1.8
    central_air_wall = voxel_tube_coverage(grid, airway_big[0], airway_big[1], airway_big[2] + wall,
                                           airway_big[3] + wall)
    central_air_lumen = voxel_tube_coverage(grid, *airway_big)

    pa_bif = np.array([10.0, -30.0, cz - 8.0])
    pa_r_end = np.array([-42.0, -14.0, cz - 14.0])
    pa_l_end = np.array([46.0, 6.0, cz - 4.0])
    vein_r = np.array([-46.0, 2.0, hz + 22.0])
    vein_l = np.array([46.0, 12.0, hz + 24.0])
    vessels_big = _concat(
        # Aorta: root, ascending, arch, descending.
        _polyline([[4.0, -22.0, hz + 28.0], [-10.0, -34.0, 45.0], [-6.0, -28.0, 58.0], [10.0, -8.0, 64.0],
                   [22.0, 10.0, 58.0], [24.0, 16.0, 44.0], [22.0, 18.0, -60.0], [10.0, 20.0, -170.0]],
                  [14.0, 15.0, 14.0, 13.0, 12.0, 12.0, 11.0, 10.0]),
        # Arch branches and superior vena cava.
        _polyline([[-6.0, -28.0, 60.0], [-16.0, -30.0, 92.0], [-22.0, -34.0, 170.0]], [7.0, 6.0, 5.0]),
        _polyline([[4.0, -20.0, 64.0], [8.0, -20.0, 100.0], [12.0, -24.0, 170.0]], [5.0, 4.5, 4.5]),
        _polyline([[16.0, -6.0, 64.0], [26.0, -2.0, 100.0], [34.0, -6.0, 170.0]], [6.0, 5.5, 5.0]),
        _polyline([[-30.0, -30.0, 170.0], [-30.0, -26.0, 90.0], [-30.0, -22.0, hz + 30.0]], [8.0, 10.0, 11.0]),
        _polyline([[20.0, -38.0, 170.0], [4.0, -40.0, 100.0], [-22.0, -32.0, 86.0]], [7.0, 7.0, 8.0]),
        # Pulmonary trunk and arteries to the hila.
        _polyline([[10.0, -52.0, hz + 32.0], pa_bif], [14.0, 13.0]),
        _polyline([pa_bif, [-14.0, -26.0, cz - 12.0], pa_r_end], [11.0, 10.0, 7.0]),
        _polyline([pa_bif, [30.0, -10.0, cz + 2.0], pa_l_end], [11.0, 10.0, 7.0]),
        # Pulmonary veins into the left atrium.
        _polyline([vein_r, [hx - 20.0, hy + 28.0, hz + 20.0]], [6.0, 8.0]),
        _polyline([vein_l, [hx + 4.0, hy + 30.0, hz + 22.0]], [6.0, 8.0]),
        # Esophagus, behind the trachea, left of the midline.
        _polyline([[4.0, -8.0, 170.0], [6.0, 2.0, 40.0], [10.0, 4.0, -40.0], [24.0, -6.0, -170.0]],
                  [7.5, 8.0, 8.0, 9.0]),
    )
    great = voxel_tube_coverage(grid, *vessels_big)
    # Mediastinal fat round the vessels: the lungs stop a few mm short of them.
    env = vessels_big[:2] + (vessels_big[2] + 4.0, vessels_big[3] + 4.0)
    envelope = voxel_tube_coverage(grid, *env) > 0
    envelope |= voxel_tube_coverage(grid, airway_big[0], airway_big[1], airway_big[2] + 4.0, airway_big[3] + 4.0) > 0
    roots = ((RIGHT_LUNG, r_hilum_r, pa_r_end, vein_r), (LEFT_LUNG, r_hilum_l, pa_l_end, vein_l))
    return _Mediastinum(central_air_wall, central_air_lumen, great, envelope, roots)


@dataclass
class _Bones:
    """Coverage (0..1) or masks of the bones of the chest wall, cortex and marrow."""

    rib: np.ndarray
    rib_marrow: np.ndarray
    cartilage: np.ndarray
    clavicle: np.ndarray
    clavicle_marrow: np.ndarray
    scapula: np.ndarray
    sternum: np.ndarray
    sternum_marrow: np.ndarray


def _chest_wall_bones(grid: VoxelGrid, body: _Body) -> _Bones:
    x, y, z = grid.x, grid.y, grid.z
    ribs, cartilage = _rib_segments(body)
    rib_cov = voxel_tube_coverage(grid, *ribs)
    rib_marrow = voxel_tube_coverage(grid, ribs[0], ribs[1], ribs[2] - 1.8, ribs[3] - 1.8)
    cart_cov = voxel_tube_coverage(grid, *cartilage)
    y_front = _CAV_Y0 - body.cav_b_ant
    clav = _concat(*[
        _polyline([[s * 18.0, y_front - 12.0, 116.0], [s * 60.0, y_front - 14.0, 124.0],
                   [s * 110.0, -66.0, 130.0], [s * 140.0, -36.0, 126.0]], [7.0, 6.5, 6.0, 6.0])
        for s in (-1.0, 1.0)])
    clav_cov = voxel_tube_coverage(grid, *clav)
    clav_marrow = voxel_tube_coverage(grid, clav[0], clav[1], clav[2] - 2.5, clav[3] - 2.5)
    # Scapulae: thin blades behind the upper ribs, bowed round the chest wall.
    scap = []
    for s in (-1.0, 1.0):
        for zz in np.arange(10.0, 140.0, 4.0):
            w = min(1.0, (zz - 5.0) / 50.0)  # the blade narrows to its inferior angle
            m0 = np.array([s * (58.0 + 45.0 * (1.0 - w)), 100.0 - 16.0 * (1.0 - w), zz])
            m2 = np.array([s * 130.0, 50.0, zz])
            m1 = 0.5 * (m0 + m2) + np.array([s * 6.0, 8.0, 0.0])
            scap.append(_polyline([m0, m1, m2], [1.6, 1.8, 3.0]))
    scap = _concat(*scap)
    scap_cov = voxel_tube_coverage(grid, *scap)
    st = (x / 14.0) ** 2 + ((y - y_front + 7.0) / 6.0) ** 2
    sternum_z = (z > -80.0) & (z < 120.0)
    sternum = (st <= 1.0) & sternum_z
    sternum_marrow = (st <= 0.5) & sternum_z
    return _Bones(rib_cov, rib_marrow, cart_cov, clav_cov, clav_marrow, scap_cov, sternum, sternum_marrow)


def _lung_labels(grid: VoxelGrid, lung: np.ndarray) -> np.ndarray:
    """1 right, 2 left lung: the largest piece of lung on each side of the junction."""
    x = grid.x
    lung_labels = np.zeros(grid.shape, np.uint8)
    for lab, side in ((RIGHT_LUNG, x < _MIDLINE_X), (LEFT_LUNG, x >= _MIDLINE_X)):
        comps, n = ndimage.label(lung & side)
        if n:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            # Keep the lung itself, not slivers cut off between mediastinal structures.
            lung_labels[comps == int(np.argmax(sizes))] = lab
    return lung_labels


def _bronchovascular(grid: VoxelGrid, lung_labels: np.ndarray, roots, rng: np.random.Generator):
    """Coverage of the lungs' vessels, airway walls and airway lumens (bronchi and
    arteries together in bundles, veins on their own trees)."""
    sx, sy, sz = grid.spacing
    origin = grid.origin
    in_lung = lung_labels > 0
    kk, jj, ii = np.nonzero(lung_labels)
    pos = np.stack([origin[0] + ii * sx, origin[1] + jj * sy, origin[2] + kk * sz], 1).astype(np.float64)
    side_of = lung_labels[kk, jj, ii]
    airways: list = []
    walls: list = []
    arteries: list = []
    veins: list = []
    jitter = np.array([sx, sy, sz]) * 0.5  # spread the samples within their voxels
    n_pts = 5000
    for lab, root_air, root_art, root_vein in roots:
        cloud = pos[side_of == lab]
        if len(cloud) < 50:
            continue
        m = min(n_pts, len(cloud))
        pts_a = cloud[rng.choice(len(cloud), m, replace=False)] + rng.uniform(-1, 1, (m, 3)) * jitter
        pts_v = cloud[rng.choice(len(cloud), m, replace=False)] + rng.uniform(-1, 1, (m, 3)) * jitter
        # Bronchi and pulmonary arteries run together (bronchovascular bundles): one
        # tree, with the artery beside each bronchus. The artery's nodes are the
        # bronchus' nodes shifted sideways, so the artery stays a connected tree.
        hint = np.array([0.0, -0.6, 0.8])
        artery_node = {}
        for s0, e0, r, _gen in _grow_tree(pts_a, root_air, 6.0, n_min=4):
            off = _perpendicular(unit(e0 - s0), hint) * (2.25 * r + 0.6)
            a0 = artery_node.get(s0.tobytes(), np.asarray(root_art, np.float64))
            a1 = e0 + off
            artery_node[e0.tobytes()] = a1
            arteries.append((a0, a1, r))
            if r >= 0.9:  # smaller airways are below CT resolution
                airways.append((s0, e0, r))
                walls.append((s0, e0, r + max(0.22 * r, 0.6)))
        for s0, e0, r, _gen in _grow_tree(pts_v, root_vein, 6.0, n_min=4):
            veins.append((s0, e0, r))

    vessel_cov = np.maximum(voxel_tube_coverage(grid, *_segments(arteries)),
                            voxel_tube_coverage(grid, *_segments(veins)))
    vessel_cov *= in_lung
    air_wall = voxel_tube_coverage(grid, *_segments(walls)) * in_lung
    air_lumen = voxel_tube_coverage(grid, *_segments(airways)) * in_lung
    return vessel_cov, air_wall, air_lumen


def make_chest_phantom(seed: int = 0, size: int = 256, n_slices: int = 56,
                       spacing: Sequence[float] = (1.4, 1.4, 5.0)) -> Phantom:
    """Make a synthetic adult chest CT.

    seed: the same seed always gives the same phantom (``numpy.random.default_rng``).
    size: in-plane matrix (size x size voxels); n_slices: number of axial slices.
    spacing: mm per I, J, K step. The default, 256 x 256 x 56 at 1.4 x 1.4 x 5 mm,
    covers a 358 mm field and 280 mm from the upper abdomen to the neck.
    Returns a :class:`Phantom` with HU (int16), geometry, lung labels and truth
    (all lung voxels healthy).
    """
    rng = np.random.default_rng(seed)
    sx, sy, sz = (float(v) for v in spacing)
    shape = (int(n_slices), int(size), int(size))
    origin = (-(size - 1) / 2 * sx, -(size - 1) / 2 * sy, -(n_slices - 1) / 2 * sz)
    grid = VoxelGrid(shape, (sx, sy, sz), origin)
    geometry = Geometry((sx, sy, sz), origin)
    x, y = grid.x, grid.y
    body = _draw_body(rng)

    def full(a):
        return _full(a, shape)

    in_body, under_fat, cavity = _outlines(grid, body)
    spine = _spine(grid)
    heart_q, above_dia, below_apex = _heart_diaphragm_apices(grid, body)
    med = _mediastinum(grid, body)
    bones = _chest_wall_bones(grid, body)

    # ---- the lung fields -------------------------------------------------------------
    heart_region = (heart_q <= 1.3) & above_dia  # heart with its pericardial fat
    # A thin strip at the midline: the anterior and posterior junction lines where the
    # two pleurae meet, so the lungs never touch.
    junction = np.abs(x - _MIDLINE_X) < 2.0
    mediastinum = junction | heart_region | med.envelope | full(spine.spine_block)
    bone = ((bones.rib > 0) | (bones.cartilage > 0) | full(bones.sternum) | (bones.clavicle > 0)
            | (bones.scapula > 0))
    lung = cavity & above_dia & below_apex & ~mediastinum & ~bone
    lung_labels = _lung_labels(grid, lung)
    in_lung = lung_labels > 0
    vessel_cov, air_wall, air_lumen = _bronchovascular(grid, lung_labels, med.roots, rng)

    # ---- compose the HU image ---------------------------------------------------------
    hu = np.full(shape, HU_AIR, np.float32)
    _paint(hu, in_body, HU_FAT)
    _paint(hu, under_fat & in_body, HU_MUSCLE)
    _paint(hu, cavity & in_body, HU_MEDIASTINAL_FAT)
    # Thoracic inlet above the apices: muscles, vessels and thyroid round the
    # mediastinal fat.
    _paint(hu, cavity & ~below_apex & ~med.envelope, HU_MUSCLE)
    below = cavity & ~above_dia
    _paint(hu, below & (x < 30.0), HU_LIVER)
    _paint(hu, below & (x >= 30.0), HU_SPLEEN)
    _paint(hu, (heart_q <= 1.0) & above_dia, HU_HEART)
    _paint(hu, med.great, HU_BLOOD)
    _paint(hu, full(spine.spine_block & (spine.vb > 1.0)) & under_fat, HU_MUSCLE)  # paraspinal muscles
    # Lung parenchyma: denser in the dependent (posterior) part, with a mild texture
    # of unresolved small vessels and secondary lobules.
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                                      sigma=(0.5, LUNG_TEXTURE_SIGMA_PX, LUNG_TEXTURE_SIGMA_PX))
    texture *= np.float32(LUNG_TEXTURE_SD / max(float(texture.std()), 1e-6))
    gravity = HU_LUNG_GRAVITY * np.clip((y + 80.0) / 160.0, 0.0, 1.0).astype(np.float32)
    hu = np.where(in_lung, np.float32(HU_LUNG) + gravity + texture, hu).astype(np.float32)
    _paint(hu, vessel_cov, HU_BLOOD)
    _paint(hu, np.maximum(air_wall, med.central_air_wall), HU_AIRWAY_WALL)
    _paint(hu, np.maximum(air_lumen, med.central_air_lumen), HU_AIR)
    # Bones.
    _paint(hu, spine.vertebral_body & ~spine.disc, HU_VERTEBRA)
    _paint(hu, spine.vb_cortex & ~spine.disc, HU_CORTEX)
    _paint(hu, spine.vertebral_body & spine.disc, HU_DISC)
    _paint(hu, spine.posterior_elements, HU_CORTEX * 0.8)
    _paint(hu, full(spine.canal), HU_CSF)
    _paint(hu, bones.cartilage, HU_CARTILAGE)
    for cortex, marrow in ((bones.rib, bones.rib_marrow), (bones.clavicle, bones.clavicle_marrow),
                           (full(bones.sternum), full(bones.sternum_marrow))):
        _paint(hu, cortex, HU_CORTEX)
        _paint(hu, marrow, HU_MARROW)
    _paint(hu, bones.scapula, HU_CORTEX * 0.8)
    hu[~in_body] = HU_AIR
    # Scanner blur, then correlated quantum noise (the reconstruction kernel
    # correlates neighbouring pixels in plane).
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, 0.5, 0.5))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.0, 0.7, 0.7))
    noise *= np.float32(NOISE_SD / max(float(noise.std()), 1e-6))
    hu += noise
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    truth = np.where(in_lung, HEALTHY, 0).astype(np.uint8)
    return Phantom(hu=hu, geometry=geometry, lung_labels=lung_labels, truth=truth)
