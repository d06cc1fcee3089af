"""The built-in synthetic dataset: sparse, lesion-like images whose class is the lesion's shape.

Each image is a dark, faintly textured background (smooth low-frequency texture plus pixel
noise, like an ultrasound or a dermoscopy margin) with one bright lesion covering a small
fraction of the image (2.5-7 % of the pixels). The class is the lesion's morphology only:

====  ===========  =============================================
  0   round        smooth, nearly circular blob (benign-like)
  1   spiculated   star outline with 5-8 spikes (malignant-like)
  2   ring         annulus (a rim-enhancing lesion)
  3   foci         a cluster of 3-5 small round foci
  4   elongated    thin ellipse, aspect 3-5
  5   crescent     a disc with an off-centre bite
  6   pair         two separate round blobs
  7   cross        two perpendicular bars
  8   square       a (slightly rectangular) box
  9   triangle     an equilateral triangle
====  ===========  =============================================

Everything else is random and drawn from the same distribution for every class: position,
orientation, lesion area, peak intensity, edge softness, inner texture, background level,
texture and noise, and for RGB the tints of background and lesion. Lesion areas are matched
across shapes (each shape's size is solved from a common target area), so neither the mean
intensity nor the bright-pixel count gives the class away: a model has to see the shape.
A small CNN learns it (> 90 % test accuracy on 2 classes from ~1,500 images); a threshold
on the mean intensity stays near chance.

Deterministic: the same arguments give the same bytes. Each split has its own random stream
(``SeedSequence(seed).spawn``), so the test split does not change when ``n_train`` does.
Vectorized with NumPy over images (in chunks bounding memory); 10,000 images of 28 px take
a fraction of a second.
"""
from __future__ import annotations

import math

import numpy as np

from .dataset import Dataset, Split
from .errors import DataError

__all__ = ["MORPHOLOGIES", "make_synthetic"]

MORPHOLOGIES = ("round", "spiculated", "ring", "foci", "elongated", "crescent", "pair", "cross", "square", "triangle")

# Distributions, as fractions of the image (area) or of the full intensity range [0, 1].
_AREA_FRAC = (0.025, 0.07)       # lesion area / image area
_PEAK = (0.12, 0.3)              # lesion intensity above the background (low contrast, like ultrasound)
_EDGE_PX28 = (0.8, 1.4)          # soft-edge half-width in pixels at 28 px (scaled with size)
_BG_LEVEL = (0.03, 0.10)         # mean background intensity
_BG_TEXTURE = (0.015, 0.05)      # amplitude of the smooth background texture
_PIXEL_NOISE = (0.01, 0.03)      # std of per-pixel noise
_LESION_TEXTURE = 0.12           # relative std of the lesion's inner texture
_SPIKE_DEPTH = (0.1, 0.3)        # spiculated: spike amplitude relative to the radius (subtle margins)
_N_UNIFORMS = 6                  # shape parameters per image (each shape uses what it needs)
_MAX_FOCI = 5
_CHUNK_ELEMS = 1 << 22           # floats per temporary array when rendering a chunk of images


def _lerp(u: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


# --- shapes ------------------------------------------------------------------------------
# Each shape gets the rotated coordinates (u, v) relative to the lesion centre (n x S x S, px),
# r0 = sqrt(area / pi) (n x 1 x 1, px), and its uniforms p (n x _N_UNIFORMS, in [0, 1)),
# and returns an approximate signed distance (negative inside, px). Sizes are solved so that
# the shape's area is pi * r0^2 whatever the class. _extent gives the farthest point (in r0).

def _col(p: np.ndarray, j: int) -> np.ndarray:
    return p[:, j, None, None]


def _ellipse(u, v, a, b):
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (rho - 1.0) * np.sqrt(a * b)


def _round(u, v, r0, p):
    q = 1.0 + 0.3 * _col(p, 0)  # aspect 1-1.3
    return _ellipse(u, v, r0 * np.sqrt(q), r0 / np.sqrt(q))


def _spiculated(u, v, r0, p):
    k = np.floor(5 + 4 * _col(p, 0))  # 5-8 spikes
    beta = _SPIKE_DEPTH[0] + (_SPIKE_DEPTH[1] - _SPIKE_DEPTH[0]) * _col(p, 1)
    radius = r0 / np.sqrt(1 + beta ** 2 / 2)  # area of r(phi) = R (1 + beta cos k phi)
    phi = np.arctan2(v, u)
    return np.sqrt(u * u + v * v) - radius * (1 + beta * np.cos(k * phi + 2 * np.pi * _col(p, 2)))


def _ring(u, v, r0, p):
    tau = 0.45 + 0.2 * _col(p, 0)  # inner / outer radius
    outer = r0 / np.sqrt(1 - tau ** 2)
    half = 0.5 * outer * (1 - tau)
    return np.abs(np.sqrt(u * u + v * v) - (outer - half)) - half


def _foci(u, v, r0, p):
    k = np.floor(3 + 3 * p[:, 0])  # 3-5 foci, on a jittered circle so they stay apart
    rf = r0[:, 0, 0] / np.sqrt(k)
    d = np.full(u.shape, np.inf, dtype=u.dtype)
    for j in range(_MAX_FOCI):
        ang = 2 * np.pi * (j / k + 0.12 * (p[:, 1 + j % 4] - 0.5))
        rad = r0[:, 0, 0] * (1.25 + 0.35 * p[:, 1 + (j + 2) % 4])
        cu, cv = (rad * np.cos(ang))[:, None, None], (rad * np.sin(ang))[:, None, None]
        dj = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) - rf[:, None, None]
        active = (j < k)[:, None, None]
        d = np.where(active, np.minimum(d, dj), d)
    return d


def _elongated(u, v, r0, p):
    q = 3.0 + 2.0 * _col(p, 0)  # aspect 3-5
    return _ellipse(u, v, r0 * np.sqrt(q), r0 / np.sqrt(q))


_CRESCENT_AREA = 0.4431  # area of disc(1) minus disc(0.85) offset by 0.5, over pi (numerically)


def _crescent(u, v, r0, p):
    radius = r0 / math.sqrt(_CRESCENT_AREA)
    outer = np.sqrt(u * u + v * v) - radius
    bite = np.sqrt((u - 0.5 * radius) ** 2 + v * v) - 0.85 * radius
    return np.maximum(outer, -bite)


def _pair(u, v, r0, p):
    rp = r0 / np.sqrt(2.0)
    half_gap = rp * (1.2 + 0.4 * _col(p, 0))  # centres 2.4-3.2 radii apart
    return np.minimum(np.sqrt((u - half_gap) ** 2 + v * v), np.sqrt((u + half_gap) ** 2 + v * v)) - rp


def _box(u, v, hu, hv):
    du, dv = np.abs(u) - hu, np.abs(v) - hv
    return np.sqrt(np.maximum(du, 0) ** 2 + np.maximum(dv, 0) ** 2) + np.minimum(np.maximum(du, dv), 0)


def _cross(u, v, r0, p):
    t = r0 * (0.5 + 0.15 * _col(p, 0))  # bar width
    length = (np.pi * r0 ** 2 + t ** 2) / (2 * t)  # two bars overlapping in a t x t square
    return np.minimum(_box(u, v, length / 2, t / 2), _box(u, v, t / 2, length / 2))


def _square(u, v, r0, p):
    q = 1.0 + 0.3 * _col(p, 0)
    side = np.sqrt(np.pi) * r0
    return _box(u, v, side * np.sqrt(q) / 2, side / np.sqrt(q) / 2)


def _triangle(u, v, r0, p):
    inr = r0 * np.sqrt(np.pi / (3 * np.sqrt(3)))  # area 3 sqrt(3) r_in^2
    d = None
    for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        dj = u * np.cos(ang) + v * np.sin(ang) - inr
        d = dj if d is None else np.maximum(d, dj)
    return d


_SHAPES = (_round, _spiculated, _ring, _foci, _elongated, _crescent, _pair, _cross, _square, _triangle)
# Farthest lesion point from the centre, in units of r0 (upper bounds over the parameters).
_EXTENT = np.array([1.15, 1.6, 1.35, 2.25, 2.25, 1.55, 1.9, 1.8, 1.3, 1.6])


# --- rendering ---------------------------------------------------------------------------

def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """size x coarse bilinear interpolation weights (rows sum to 1)."""
    pos = (np.arange(size) + 0.5) / size * (coarse - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lo
    m = np.zeros((size, coarse))
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m.astype(np.float32)


def _render_split(rng: np.random.Generator, n: int, size: int, channels: int, n_classes: int) -> Split:
    # Every random number is drawn in one fixed order, so the output does not depend on how the
    # rendering below is chunked. The per-pixel noise (n x size x size x channels float32: four times
    # the uint8 images) is the one draw too large to hold: it is drawn chunk by chunk while rendering,
    # from a copy of the stream taken where it starts, and the main stream skips past it (the same
    # numbers drawn into one small buffer) to draw the tints that follow it.
    labels = rng.permutation(np.arange(n) % n_classes)
    area = _lerp(rng.random(n), _AREA_FRAC) * size * size
    r0 = np.sqrt(area / np.pi)
    shape_u = rng.random((n, _N_UNIFORMS))
    theta = rng.random(n) * 2 * np.pi
    centre_u = rng.random((n, 2))
    peak = _lerp(rng.random(n), _PEAK)
    edge = _lerp(rng.random(n), _EDGE_PX28) * size / 28
    bg_level = _lerp(rng.random(n), _BG_LEVEL)
    bg_texture = _lerp(rng.random(n), _BG_TEXTURE)
    pixel_noise = _lerp(rng.random(n), _PIXEL_NOISE)
    coarse = max(3, size // 7)
    bg_coarse = rng.standard_normal((n, coarse, coarse), dtype=np.float32)
    lesion_coarse = rng.standard_normal((n, coarse, coarse), dtype=np.float32)
    noise_rng = np.random.Generator(type(rng.bit_generator)())
    noise_rng.bit_generator.state = rng.bit_generator.state
    chunk = max(1, _CHUNK_ELEMS // (size * size * _MAX_FOCI))
    noise = np.empty((min(n, chunk), size, size, channels), dtype=np.float32)
    if channels == 3:
        for start in range(0, n, chunk):  # sequential draws: the same numbers as one draw of all n
            rng.standard_normal(dtype=np.float32, out=noise[:min(n, start + chunk) - start])
        # Tints from one class-independent distribution: each channel 0.45-1 of the brightest.
        tint_bg = rng.uniform(0.45, 1.0, (n, 3))
        tint_lesion = rng.uniform(0.45, 1.0, (n, 3))
        tint_bg /= tint_bg.max(1, keepdims=True)
        tint_lesion /= tint_lesion.max(1, keepdims=True)

    f32 = np.float32
    peak, edge, bg_level, bg_texture, pixel_noise = (a.astype(f32) for a in (peak, edge, bg_level, bg_texture,
                                                                             pixel_noise))
    if channels == 3:
        tint_bg, tint_lesion = tint_bg.astype(f32), tint_lesion.astype(f32)

    # Centre so the whole lesion (plus its soft edge) stays inside the image.
    margin = _EXTENT[labels] * r0 + edge + 0.5
    margin = np.minimum(margin, size / 2)
    centre = margin[:, None] + centre_u * (size - 2 * margin)[:, None]

    up = _upsample_matrix(size, coarse)
    grid = np.arange(size, dtype=np.float32) + 0.5
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        noise_rng.standard_normal(dtype=np.float32, out=noise[:m])
        mask = np.empty((m, size, size), dtype=np.float32)
        for c in range(n_classes):
            idx = np.nonzero(labels[sl] == c)[0]
            if idx.size == 0:
                continue
            g = idx + start
            cx = centre[g, 0, None, None].astype(np.float32)
            cy = centre[g, 1, None, None].astype(np.float32)
            dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
            cos, sin = np.cos(theta[g])[:, None, None], np.sin(theta[g])[:, None, None]
            u = (dx * cos + dy * sin).astype(np.float32)
            v = (dy * cos - dx * sin).astype(np.float32)
            sdf = _SHAPES[c](u, v, r0[g, None, None].astype(np.float32), shape_u[g].astype(np.float32))
            # Linear ramp of half-width `edge` across the boundary: anti-aliased, area-preserving.
            mask[idx] = np.clip(0.5 - sdf / (2 * edge[g, None, None]), 0.0, 1.0)

        # Smooth textures: bilinear upsampling of coarse noise, up @ G @ up^T per image.
        smooth = up @ np.stack((bg_coarse[sl], lesion_coarse[sl])) @ up.T
        lesion = smooth[1]
        lesion *= _LESION_TEXTURE
        lesion += 1.0
        lesion *= peak[sl, None, None]
        lesion *= mask
        background = smooth[0]
        background *= bg_texture[sl, None, None]
        background += bg_level[sl, None, None]
        if channels == 1:
            img = (background + lesion)[..., None]
        else:
            img = background[..., None] * tint_bg[sl, None, None, :]
            img += lesion[..., None] * tint_lesion[sl, None, None, :]
        img += pixel_noise[sl, None, None, None] * noise[:m]
        img *= 255.0
        img += 0.5  # round half up, by truncation below
        np.clip(img, 0.0, 255.0, out=img)
        out[sl] = img.astype(np.uint8)
    images = out[..., 0] if channels == 1 else out
    return Split(images, labels.astype(np.int64))


def make_synthetic(n_train: int = 1000, n_val: int = 200, n_test: int = 400, *, size: int = 28,
                   channels: int = 1, n_classes: int = 2, seed: int = 0) -> Dataset:
    """The built-in synthetic lesion dataset (see the module docstring), MedMNIST-style.

    Args:
        n_train, n_val, n_test: images per split (>= 1 each; classes balanced within a split).
        size: image side in pixels (>= 16); 28 like MedMNIST, 64/128/224 like MedMNIST+.
        channels: 1 (grayscale, ``N x H x W``) or 3 (RGB, ``N x H x W x 3``).
        n_classes: 2-10; class c is the lesion shape ``MORPHOLOGIES[c]``.
        seed: any int >= 0; same arguments, same bytes.

    Returns a :class:`Dataset` named ``"synthetic"`` with uint8 labels on save.

    Example::

        ds = make_synthetic(n_train=2000, channels=3, n_classes=4, seed=1)
        x, y = ds["train"].to_tensors()   # float32 2000 x 3 x 28 x 28, int64 2000
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"make_synthetic: {name} must be an int >= 1, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise DataError(f"make_synthetic: size must be an int in [16, 1024], got {size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"make_synthetic: channels must be 1 or 3, got {channels!r}")
    if (isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer))
            or not 2 <= n_classes <= len(_SHAPES)):
        raise DataError(f"make_synthetic: n_classes must be an int in [2, {len(_SHAPES)}], got {n_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"make_synthetic: seed must be an int >= 0, got {seed!r}")
    streams = np.random.SeedSequence(int(seed)).spawn(3)
    splits = {name: _render_split(np.random.default_rng(ss), int(n), int(size), int(channels), int(n_classes))
              for name, n, ss in zip(("train", "val", "test"), (n_train, n_val, n_test), streams)}
    spec = f"synthetic:n_train={n_train},n_val={n_val},n_test={n_test},size={size},channels={channels}," \
           f"classes={n_classes},seed={seed}"
    return Dataset("synthetic", splits, int(n_classes), source=spec,
                   label_names=MORPHOLOGIES[:n_classes], label_dtype="uint8")
