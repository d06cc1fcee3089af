"""The release: float perturbations quantized onto the uint8 grid, and the budget measured on the bytes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salm_fast.release import budget_levels, parse_eps, measure_budget, quantize_release

EPS_VALUES = (1 / 255, 0.03, 8 / 255, 16 / 255, 1.0)


def _valid_delta(images: torch.Tensor, raw: torch.Tensor, eps: float) -> torch.Tensor:
    """A delta as a method produces it: float32, |delta| <= eps, x + delta in [0, 1]."""
    x = images.float() / 255
    d = raw.clamp(-eps, eps)
    return torch.minimum(torch.maximum(d, -x), 1 - x)


def _levels(release: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return release.to(torch.int16) - images.to(torch.int16)


# ------------------------------------------------------------------------------ budget_levels / eps
@pytest.mark.parametrize(("eps", "levels"), [(1 / 255, 1), (0.03, 7), (8 / 255, 8), (0.5, 127), (1.0, 255)])
def test_budget_levels_is_the_floor_of_eps_in_levels(eps, levels):
    assert budget_levels(eps) == levels


@pytest.mark.parametrize("eps", [0.0, -8 / 255, 0.5 / 255, 1.0001, math.nan, math.inf])
def test_parse_eps_refuses_budgets_a_uint8_release_cannot_hold(eps):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(eps)


# ------------------------------------------------------------------------------ quantize_release
@settings(max_examples=40, deadline=None, derandomize=True)  # same examples every run
@given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from(EPS_VALUES), channels=st.sampled_from([1, 3]),
       density=st.sampled_from([0.0, 0.1, 1.0]), scale=st.sampled_from([1e-7, 0.3 / 255, 1.0, 4.0]))
def test_quantize_holds_the_budget_on_the_bytes(seed, eps, channels, density, scale):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (3, channels, 5, 6), generator=g, dtype=torch.uint8)
    images[0, :, 0, :] = 0  # the box edges, where clipping matters
    images[0, :, 1, :] = 255
    raw = (torch.rand(images.shape, generator=g) * 2 - 1) * eps * scale
    raw[torch.rand(images.shape, generator=g) >= density] = 0
    delta = _valid_delta(images, raw, eps)
    release = quantize_release(images, delta, eps)

    assert release.dtype == torch.uint8 and release.shape == images.shape
    step = _levels(release, images)
    levels = budget_levels(eps)
    assert int(step.abs().max()) <= levels  # L-inf on the stored bytes
    assert bool(((step != 0) <= (delta != 0)).all())  # L0 never grows
    assert bool((step[delta == 0] == 0).all())
    moved = delta != 0  # nonzero delta: at least one level, never more than the budget, in its direction
    expected = torch.sign(delta[moved]).to(torch.int16) * (delta[moved].double() * 255).abs().round().clamp(
        1, levels).to(torch.int16)
    assert torch.equal(step[moved], expected)


def test_quantize_edge_values():
    images = torch.full((1, 1, 1, 6), 100, dtype=torch.uint8)
    eps = 0.03  # 7.65 levels: not a whole number of levels
    delta = torch.tensor([1e-12, -1e-12, 0.03, -0.03, 0.49 / 255, 0.0], dtype=torch.float32).view(1, 1, 1, 6)
    step = _levels(quantize_release(images, delta, eps), images).flatten().tolist()
    assert step == [1, -1, 7, -7, 1, 0]  # tiny -> exactly 1 level; eps -> floor(eps * 255) levels, never 8

    eps = 8 / 255
    delta = torch.tensor([8 / 255, -8 / 255, 7.4 / 255, 2.6 / 255, -1.5 / 255, 0.0]).view(1, 1, 1, 6)
    step = _levels(quantize_release(images, delta, eps), images).flatten().tolist()
    assert step == [8, -8, 7, 3, -2, 0]


def test_quantize_zero_delta_gives_identical_bytes_and_never_leaves_the_range():
    images = torch.tensor([0, 1, 254, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    assert torch.equal(quantize_release(images, torch.zeros(images.shape), 8 / 255), images)
    # Out-of-box deltas (not what a method produces) are still clamped into [0, 255], not wrapped.
    out = quantize_release(images, torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 1, 2, 2), 8 / 255)
    assert out.flatten().tolist() == [0, 0, 255, 255]


def test_quantize_refuses_bad_inputs():
    images = torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    delta = torch.zeros((2, 1, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        quantize_release(images.float(), delta, 8 / 255)
    with pytest.raises(ValueError, match="shape"):
        quantize_release(images, delta[:, :, :3], 8 / 255)
    for bad in (math.nan, math.inf):
        d = delta.clone()
        d[1, 0, 2, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize_release(images, d, 8 / 255)
    for eps in (0.0, 0.5 / 255, 2.0, math.nan):  # an eps the release cannot hold must not silently erase delta
        with pytest.raises(ValueError, match="eps"):
            quantize_release(images, delta + 1e-3, eps)


# ------------------------------------------------------------------------------ measure_budget
def test_measure_budget_gray_hand_computed():
    clean = np.zeros((2, 2, 2), dtype=np.uint8)
    release = clean.copy()
    release[0, 0, 0], release[0, 1, 1] = 1, 3
    b = measure_budget(clean, release)
    assert (b.linf_levels, b.l0_max_per_image, b.changed_images, b.n_images) == (3, 2, 1, 2)
    assert b.linf == pytest.approx(3 / 255)
    assert b.l0_fraction == pytest.approx(2 / 8)
    assert b.as_dict()["linf_levels"] == 3


def test_measure_budget_rgb_counts_pixels_not_channels():
    clean = np.full((2, 2, 2, 3), 200, dtype=np.uint8)
    release = clean.copy()
    release[0, 0, 0] = (198, 205, 205)  # one pixel, three channels, down 2 and up 5
    release[1, 1, 1, 2] = 201  # one pixel, one channel
    b = measure_budget(torch.from_numpy(clean), torch.from_numpy(release))
    assert (b.linf_levels, b.l0_max_per_image, b.changed_images) == (5, 1, 2)
    assert b.l0_fraction == pytest.approx(2 / 8)
    same = measure_budget(clean, clean)
    assert (same.linf_levels, same.l0_fraction, same.changed_images) == (0, 0.0, 0)


def test_measure_budget_refuses_mismatched_or_non_uint8_arrays():
    a = np.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        measure_budget(a, a[:, :3])
    with pytest.raises(ValueError, match="N x H x W"):
        measure_budget(a[0], a[0])
    with pytest.raises(TypeError, match="uint8"):  # float [0, 1] images would truncate to 0 and hide the change
        measure_budget(a.astype(np.float32), a.astype(np.float32) + 0.5)
