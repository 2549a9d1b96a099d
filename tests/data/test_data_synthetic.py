"""Synthetic tasks: determinism by seed, exact masks, distinct kinds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moleflow.data import SYNTHETIC_KINDS, DatasetError, make_synthetic_task, render_sample
from moleflow.data.synthetic import paint_defect, render_normal


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_same_seed_same_arrays_different_seed_differs(kind: str) -> None:
    a = make_synthetic_task(kind, n_train=3, n_test=4, size=64, seed=1)
    b = make_synthetic_task(kind, n_train=3, n_test=4, size=64, seed=1)
    c = make_synthetic_task(kind, n_train=3, n_test=4, size=64, seed=2)
    for x, y in zip((*a.train, *a.test), (*b.train, *b.test), strict=True):
        np.testing.assert_array_equal(x.load_image(), y.load_image())
        np.testing.assert_array_equal(x.load_mask(), y.load_mask())
    assert not np.array_equal(a.train[0].load_image(), c.train[0].load_image())
    assert not np.array_equal(a.test[1].load_mask(), c.test[1].load_mask())


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    for index in range(6):
        clean, clean_mask, clean_defect = render_sample(kind, "test", index, size=96, seed=3)
        image, mask, defect = render_sample(kind, "test", index, size=96, seed=3, defective=True)
        changed = (image != clean).any(axis=2)
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(changed, mask > 0)
        assert mask.any() and not clean_mask.any() and clean_defect == "good" and defect != "good"


def test_paint_defect_changes_every_masked_pixel_even_on_flat_images() -> None:
    rng = np.random.default_rng(0)
    for value in (0, 127, 128, 255):  # flat images make colour collisions likely
        flat = np.full((40, 40, 3), value, np.uint8)
        for _ in range(5):
            painted, region, _ = paint_defect(flat, rng)
            np.testing.assert_array_equal((painted != flat).any(axis=2), region)


class _NoNoise:
    """A generator whose ``normal`` returns its mean: makes the painted colour predictable."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def normal(self, loc: float, scale: float, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        return np.full(size if size is not None else (), loc, dtype=np.float64)

    def __getattr__(self, name: str) -> object:
        return getattr(self._rng, name)


def test_paint_defect_resolves_colour_collisions() -> None:
    # pixels of 127 and 128 average to 127.5, so the contrasting colour rounds to 128 and would leave
    # every 128-pixel unchanged; those pixels must still change for the mask to be exact
    checker = (np.indices((64, 64)).sum(axis=0) % 2 + 127).astype(np.uint8)
    image = np.repeat(checker[:, :, None], 3, axis=2)
    for seed in range(5):
        painted, region, _ = paint_defect(image, _NoNoise(seed))  # type: ignore[arg-type]
        np.testing.assert_array_equal((painted != image).any(axis=2), region)


def test_task_layout() -> None:
    task = make_synthetic_task("disc", n_train=5, n_test=6, size=48)
    assert task.name == "synthetic_disc" and task.has_masks
    assert len(task.train) == 5 and [s.label for s in task.test] == [0, 1, 0, 1, 0, 1]
    assert task.train[0].load_image().shape == (48, 48, 3)
    assert all(not s.load_mask().any() for s in (*task.train, *task.test) if s.label == 0)
    assert all(s.load_mask().any() for s in task.test if s.label == 1)


def test_sample_does_not_depend_on_task_size() -> None:
    small = make_synthetic_task("dots", n_train=2, n_test=2, size=48)
    large = make_synthetic_task("dots", n_train=7, n_test=9, size=48)
    np.testing.assert_array_equal(small.train[1].load_image(), large.train[1].load_image())
    np.testing.assert_array_equal(small.test[1].load_image(), large.test[1].load_image())


def test_normals_vary_within_a_kind() -> None:
    task = make_synthetic_task("grid", n_train=3, n_test=1, size=48)
    images = [s.load_image() for s in task.train]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_kinds_look_different() -> None:
    # mean colour and horizontal-gradient energy tell every pair of kinds apart by a wide margin
    def signature(kind: str) -> np.ndarray:
        image = render_normal(kind, np.random.default_rng(0), 64).astype(np.float64)
        gradient = np.abs(np.diff(image, axis=1)).mean()
        return np.concatenate([image.mean(axis=(0, 1)), [gradient]])

    signatures = {kind: signature(kind) for kind in SYNTHETIC_KINDS}
    for a, b in itertools.combinations(SYNTHETIC_KINDS, 2):
        assert np.abs(signatures[a] - signatures[b]).max() > 20, (a, b)


def test_invalid_arguments() -> None:
    with pytest.raises(DatasetError, match="unknown synthetic kind 'waves'"):
        make_synthetic_task("waves")
    with pytest.raises(DatasetError, match="n_train >= 1"):
        make_synthetic_task("disc", n_train=0)
    with pytest.raises(DatasetError, match="size >= 32"):
        render_sample("disc", "train", 0, size=8)
