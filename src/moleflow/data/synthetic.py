"""Procedural synthetic tasks with painted defects and exact masks (numpy only, deterministic by seed).

For tests and the offline demo: no files, no downloads. Four kinds, chosen to look clearly different so a
task router can tell them apart:

- ``stripes``: oriented blue/cream sinusoidal stripes (a texture);
- ``dots``:    red dots on a regular lattice over light grey (a texture);
- ``grid``:    a green checkerboard (a texture);
- ``disc``:    a shaded orange disc centred on a dark background (an object).

Every image varies a little (phase, angle, size, colour, pixel noise). A defective image is its normal
render with one defect painted on: ``scratch`` (a thick line segment), ``blob`` (a rotated ellipse) or
``spots`` (a cluster of small discs), filled with a colour contrasting with what lies beneath. The mask is
exactly the set of changed pixels: every masked pixel differs from the normal render and nothing outside
the mask changes.

Determinism: sample ``index`` of ``split`` draws from ``np.random.default_rng([seed, kind, split, index,
stream])``, with separate streams for the render and the defect, so a sample does not depend on how many
others are generated, and the defect-free render of a defective sample is ``render_sample(...,
defective=False)`` with the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moleflow.data.base import NORMAL_DEFECT, ArraySample, TaskData, check_task_name
from moleflow.data.errors import DatasetError

SYNTHETIC_KINDS = ("stripes", "dots", "grid", "disc")
SYNTHETIC_DEFECTS = ("scratch", "blob", "spots")
SPLITS = ("train", "test")
DEFAULT_N_TRAIN = 40
DEFAULT_N_TEST = 20  # odd indices are defective: half the test set
DEFAULT_SIZE = 128
MIN_SIZE = 32
NOISE_STD = 4.0  # pixel noise (grey levels) so that no two normal images are identical
_RENDER_STREAM, _DEFECT_STREAM = 0, 1

Renderer = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _rgb(values: tuple[float, float, float], rng: np.random.Generator, jitter: float = 8.0) -> np.ndarray:
    """A colour ``(3,)`` with a small random jitter."""
    return np.asarray(values, dtype=np.float64) + rng.normal(0.0, jitter, 3)


def _blend(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """``(H, W)`` weights in [0, 1] -> ``(H, W, 3)`` mix of colours ``c0`` (t=0) and ``c1`` (t=1)."""
    return c0 + t[:, :, None] * (c1 - c0)


def _stripes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    size = yy.shape[0]
    angle = np.deg2rad(30.0 + rng.uniform(-6.0, 6.0))
    period = size / 10.0 * rng.uniform(0.9, 1.1)
    phase = rng.uniform(0.0, 2 * np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    return _blend(t, _rgb((40, 60, 140), rng), _rgb((220, 210, 170), rng))


def _dots(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    period = yy.shape[0] / 8.0
    oy, ox = rng.uniform(0.0, period, 2)
    radius = 0.28 * period * rng.uniform(0.9, 1.1)
    dy = np.mod(yy - oy, period) - period / 2
    dx = np.mod(xx - ox, period) - period / 2
    t = np.clip(radius - np.hypot(dy, dx) + 0.5, 0.0, 1.0)  # anti-aliased 1-pixel edge
    return _blend(t, _rgb((200, 200, 205), rng), _rgb((190, 40, 40), rng))


def _grid(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cell = yy.shape[0] / 8.0 * rng.uniform(0.9, 1.1)
    oy, ox = rng.uniform(0.0, cell, 2)
    t = (np.floor((yy - oy) / cell) + np.floor((xx - ox) / cell)) % 2
    return _blend(t, _rgb((40, 110, 50), rng), _rgb((150, 200, 90), rng))


def _disc(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    size = yy.shape[0]
    cy, cx = size / 2 + rng.uniform(-3.0, 3.0, 2)
    radius = 0.36 * size * rng.uniform(0.95, 1.05)
    dist = np.hypot(yy - cy, xx - cx)
    inside = np.clip(radius - dist + 0.5, 0.0, 1.0)
    shading = 1.0 - 0.35 * np.clip(dist / radius, 0.0, 1.0) ** 2  # a lit, domed look
    disc = _rgb((230, 150, 40), rng)[None, None, :] * shading[:, :, None]
    background = np.broadcast_to(_rgb((30, 35, 40), rng), disc.shape)
    return background * (1.0 - inside[:, :, None]) + disc * inside[:, :, None]


_RENDERERS: dict[str, Renderer] = {"stripes": _stripes, "dots": _dots, "grid": _grid, "disc": _disc}


def _grid_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def render_normal(kind: str, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A defect-free image of ``kind``: ``(size, size, 3)`` RGB ``uint8``."""
    if kind not in _RENDERERS:
        raise DatasetError(f"unknown synthetic kind {kind!r}; expected one of {SYNTHETIC_KINDS}")
    yy, xx = _grid_coords(size)
    image = _RENDERERS[kind](rng, yy, xx) + rng.normal(0.0, NOISE_STD, (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _defect_region(defect: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` region of one defect, centred in the middle 40 % of the image."""
    yy, xx = _grid_coords(size)
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    if defect == "scratch":
        angle = rng.uniform(0.0, np.pi)
        half_length = rng.uniform(0.1, 0.2) * size
        uy, ux = np.sin(angle), np.cos(angle)
        along = np.clip((yy - cy) * uy + (xx - cx) * ux, -half_length, half_length)
        distance = np.hypot(yy - (cy + along * uy), xx - (cx + along * ux))  # to the segment
        return distance <= rng.uniform(1.0, 2.0)
    if defect == "blob":
        a, b = rng.uniform(0.05, 0.1, 2) * size
        angle = rng.uniform(0.0, np.pi)
        u = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    region = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(3, 7))):
        sy, sx = np.array([cy, cx]) + rng.uniform(-0.1, 0.1, 2) * size
        region |= np.hypot(yy - sy, xx - sx) <= rng.uniform(0.02, 0.04) * size
    return region


def paint_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one random defect onto ``image`` ``(H, W, 3)`` uint8 (square).

    Returns ``(defective image, mask, defect type)``; the mask ``(H, W)`` bool is exactly the set of
    pixels that differ from ``image``.
    """
    size = image.shape[0]
    defect = SYNTHETIC_DEFECTS[int(rng.integers(len(SYNTHETIC_DEFECTS)))]
    region = _defect_region(defect, rng, size)
    if not region.any():  # cannot happen for size >= MIN_SIZE; keep the mask non-empty regardless
        region[size // 2, size // 2] = True
    under = image[region].astype(np.float64)
    colour = np.clip(255.0 - under.mean(axis=0) + rng.normal(0.0, 10.0, 3), 0, 255)
    painted = np.clip(np.rint(colour + rng.normal(0.0, 3.0, under.shape)), 0, 255).astype(np.uint8)
    unchanged = (painted == image[region]).all(axis=1)
    # 255 - v != v for every integer v, so these pixels change too and the mask stays exact
    painted[unchanged] = 255 - image[region][unchanged]
    defective = image.copy()
    defective[region] = painted
    return defective, region, defect


def render_sample(
    kind: str, split: str, index: int, size: int = DEFAULT_SIZE, seed: int = 0, defective: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """Sample ``index`` of ``split``: ``(image (H, W, 3) uint8, mask (H, W) float32, defect type)``.

    With ``defective=False`` the mask is all zero and the defect is ``"good"``; the defective render is
    this image with one defect painted on.
    """
    if kind not in SYNTHETIC_KINDS or split not in SPLITS:
        raise DatasetError(f"unknown synthetic kind/split {kind!r}/{split!r}; kinds: {SYNTHETIC_KINDS}")
    if size < MIN_SIZE or seed < 0 or index < 0:
        raise DatasetError(f"synthetic: need size >= {MIN_SIZE}, seed >= 0, index >= 0; got {size}, {seed}, {index}")
    key = [seed, SYNTHETIC_KINDS.index(kind), SPLITS.index(split), index]
    image = render_normal(kind, np.random.default_rng([*key, _RENDER_STREAM]), size)
    if not defective:
        return image, np.zeros((size, size), dtype=np.float32), NORMAL_DEFECT
    image, region, defect = paint_defect(image, np.random.default_rng([*key, _DEFECT_STREAM]))
    return image, region.astype(np.float32), defect


def _array_sample(kind: str, split: str, index: int, size: int, seed: int, defective: bool) -> ArraySample:
    image, mask, defect = render_sample(kind, split, index, size, seed, defective)
    return ArraySample(name=f"{split}/{defect}/{index:04d}", label=int(defective), defect=defect, image=image, mask=mask)


def make_synthetic_task(
    kind: str,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    name: str | None = None,
) -> TaskData:
    """An in-memory task of ``kind``: ``n_train`` normals; ``n_test`` test images, odd indices defective.

    ``name`` defaults to ``synthetic_KIND``. Images are ``(size, size, 3)`` uint8 with exact masks.
    """
    if kind not in SYNTHETIC_KINDS:
        raise DatasetError(f"unknown synthetic kind {kind!r}; expected one of {SYNTHETIC_KINDS}, e.g. synthetic:disc")
    if n_train < 1 or n_test < 1:
        raise DatasetError(f"synthetic:{kind} needs n_train >= 1 and n_test >= 1; got {n_train}, {n_test}")
    train = tuple(_array_sample(kind, "train", i, size, seed, False) for i in range(n_train))
    test = tuple(_array_sample(kind, "test", i, size, seed, i % 2 == 1) for i in range(n_test))
    return TaskData(
        name=check_task_name(name if name is not None else f"synthetic_{kind}"),
        train=train,
        test=test,
        has_masks=True,
        source=f"synthetic:{kind} (seed={seed}, {n_train} train / {n_test} test, {size}x{size})",
    )
