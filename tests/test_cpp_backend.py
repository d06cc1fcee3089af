"""C++ backend specifics: threads, large images, top-k edge cases, NaN handling, argument checks.

The parity of every op with the reference on ordinary inputs is tests/test_ops.py; this
file covers what only the compiled module has (its own checks, its threading, the paths
of its radix select) and compares against the reference bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from salm_fast import _C
from salm_fast.ops import _cpp
from salm_fast.ops import _reference as ref

from .conftest import assert_close_report

EPS = 8 / 255
DTYPES = [torch.float32, torch.float64]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    out = s.new_empty((s.shape[0], 1, s.shape[1], s.shape[2]))
    assert ref.topk_mask(s, k, out)
    return out


def _cpp_mask(s: torch.Tensor, k: int, nthreads: int = 0) -> torch.Tensor:
    out = torch.full((s.shape[0], 1, s.shape[1], s.shape[2]), 7.0, dtype=s.dtype)  # 7: never a valid bit
    assert _C.topk_mask(s.numpy(), k, out.numpy(), nthreads)
    return out


def _ks(hw: int) -> list[int]:
    return sorted({1, min(2, hw), max(1, hw // 10), max(1, hw // 2), max(1, hw - 1), hw})


# ------------------------------------------------------------------ top-k select paths
def _saliencies(dtype: torch.dtype, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Distributions that exercise each path: wide/narrow key spread, ties, signs, extremes."""
    gen = _gen(42)
    n, h, w = shape
    rnd = torch.rand(shape, generator=gen, dtype=torch.float64)
    fin = torch.finfo(dtype)
    return {
        "abs_normal": torch.randn(shape, generator=gen, dtype=dtype).abs(),
        "signed_normal": torch.randn(shape, generator=gen, dtype=dtype),
        # Mostly one value: more than 4096 keys share the threshold's bin (radix select path).
        "heavy_ties": torch.where(rnd < 0.9, 1.5, rnd).to(dtype),
        "signed_zeros": torch.where(rnd < 0.5, -0.0, 0.0).to(dtype) + (rnd > 0.99).to(dtype),
        "ulp_apart": (1.0 + torch.randint(0, 5, shape, generator=gen) * fin.eps).to(dtype),
        "wide_exponents": (torch.randn(shape, generator=gen, dtype=torch.float64)
                           * 10.0 ** torch.randint(-30, 30, shape, generator=gen)).to(dtype),
        "subnormal": (rnd * fin.tiny).to(dtype),
        "extremes": torch.where(rnd < 0.3, rnd * 0 + fin.max,
                                torch.where(rnd < 0.6, rnd * 0 - fin.max, rnd * 0 - fin.tiny)).to(dtype),
        "one_value": torch.full(shape, -2.5, dtype=dtype),
    }


def _ref_masks(s: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
    """The reference's rule (stable descending sort) for several k from one sort."""
    n, h, w = s.shape
    order = torch.sort(s.reshape(n, h * w), dim=1, descending=True, stable=True).indices
    masks = {}
    for k in ks:
        m = torch.zeros((n, h * w), dtype=s.dtype)
        masks[k] = m.scatter_(1, order[:, :k], 1.0).reshape(n, 1, h, w)
    return masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [(3, 5), (28, 28), (224, 224)])  # 224 px: > 4096 ties reach the radix select
def test_topk_mask_matches_reference_on_hard_distributions(dtype, hw):
    ks = _ks(hw[0] * hw[1])
    for name, s in _saliencies(dtype, (2, *hw)).items():
        for k, expected in _ref_masks(s, ks).items():
            assert_close_report(_cpp_mask(s, k), expected, exact=True, what=f"{name} k={k}")


def test_topk_mask_images_differ_within_a_batch():
    # Each image its own distribution: per-image state must not leak across images or threads.
    parts = list(_saliencies(torch.float32, (1, 40, 37)).values())
    s = torch.cat(parts * 2)
    for k in (1, 148, 1479):
        expected = _ref_mask(s, k)
        for nthreads in (1, 2, 3):
            assert_close_report(_cpp_mask(s, k, nthreads), expected, exact=True, what=f"k={k} threads={nthreads}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
def test_fused_mask_on_a_512px_image_equals_unfused(dtype, p):
    g = torch.randn((1, 3, 512, 512), generator=_gen(3), dtype=dtype)
    g[:, :, :100] = 0.0  # a flat region: many exact ties at zero
    hw = 512 * 512
    s = torch.empty((1, 512, 512), dtype=dtype)
    _C.grad_magnitude(g.numpy(), p, s.numpy())
    for k in (1, hw // 10, hw - 100 * 512 + 1, hw):
        out = torch.empty((1, 1, 512, 512), dtype=dtype)
        assert _C.saliency_topk_mask(g.numpy(), k, p, out.numpy())
        assert_close_report(out, _ref_mask(s, k), exact=True, what=f"512 px k={k} p={p}")


# ------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_make_the_masks_fail(dtype, bad):
    s = torch.rand((5, 9, 11), generator=_gen(4), dtype=dtype)
    s[3, 8, 10] = bad  # the very last pixel of one image in the middle of the batch
    out = torch.empty((5, 1, 9, 11), dtype=dtype)
    assert not _C.topk_mask(s.numpy(), 3, out.numpy())
    g = torch.rand((5, 3, 9, 11), generator=_gen(5), dtype=dtype)
    g[3, 2, 0, 0] = bad
    for p in (1, 2):
        assert not _C.saliency_topk_mask(g.numpy(), 3, p, out.numpy())


def test_p2_overflow_to_inf_makes_the_fused_mask_fail():
    g = torch.ones((1, 2, 8, 8))
    g[0, 1, 4, 4] = 1e20  # finite, but its square overflows float32
    out = torch.empty((1, 1, 8, 8))
    assert _C.saliency_topk_mask(g.numpy(), 3, 1, out.numpy())
    assert not _C.saliency_topk_mask(g.numpy(), 3, 2, out.numpy())


# ------------------------------------------------------------------ elementwise semantics
@pytest.mark.parametrize("dtype", DTYPES)
def test_p2_magnitude_is_the_correctly_rounded_sqrt(dtype):
    g = torch.randn((2, 3, 31, 33), generator=_gen(6), dtype=dtype)
    acc = g[:, 0] * g[:, 0]
    for c in (1, 2):
        acc = acc + g[:, c] * g[:, c]
    expected = torch.from_numpy(np.sqrt(acc.numpy()))  # IEEE sqrt (sqrtps/sqrtpd)
    out = torch.empty_like(acc)
    _C.grad_magnitude(g.numpy(), 2, out.numpy())
    assert_close_report(out, expected, exact=True, what="p=2")


@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_propagates_nan_like_pytorch(dtype):
    x = torch.rand((2, 3, 6, 7), generator=_gen(7), dtype=dtype)
    delta = (torch.rand(x.shape, generator=_gen(8), dtype=dtype) - 0.5) * 0.2
    mask = (torch.rand((2, 1, 6, 7), generator=_gen(9)) < 0.5).to(dtype)
    delta[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    mask[0, 0, 0, :3] = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)  # inf * 0 = nan
    x[1, 2, 5, 6] = float("nan")
    g = torch.randn(x.shape, generator=_gen(10), dtype=dtype)
    g[1, 0, 0, 0] = float("nan")  # sign(nan) = 0
    for eps in (0.0, EPS):
        expected = torch.empty_like(x)
        ref.masked_linf_project(x, delta, mask, eps, expected)
        out = torch.empty_like(x)
        _cpp.masked_linf_project(x, delta, mask, eps, out)
        assert_close_report(out, expected, exact=True, what=f"project eps={eps}")
        ref.pgd_step(x, delta, g, mask, eps, -EPS / 4, expected)
        _cpp.pgd_step(x, delta, g, mask, eps, -EPS / 4, out)
        assert_close_report(out, expected, exact=True, what=f"pgd eps={eps}")
        grads = [torch.empty_like(x) for _ in range(4)]
        upstream = torch.randn(x.shape, generator=_gen(11), dtype=dtype)
        ref.masked_linf_project_backward(x, delta, mask, eps, upstream, grads[0], grads[1])
        _cpp.masked_linf_project_backward(x, delta, mask, eps, upstream, grads[2], grads[3])
        assert_close_report(grads[2], grads[0], exact=True, what="grad delta")
        assert_close_report(grads[3], grads[1], exact=True, what="grad x")


def test_backward_without_grad_x_gives_the_same_grad_delta():
    x = torch.rand((2, 3, 40, 41), generator=_gen(12))
    delta = (torch.rand(x.shape, generator=_gen(13)) - 0.5) * 0.2
    mask = (torch.rand((2, 1, 40, 41), generator=_gen(14)) < 0.5).float()
    upstream = torch.randn(x.shape, generator=_gen(15))
    with_x, grad_x, without_x = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    _cpp.masked_linf_project_backward(x, delta, mask, EPS, upstream, with_x, grad_x)
    _cpp.masked_linf_project_backward(x, delta, mask, EPS, upstream, without_x, None)
    assert_close_report(without_x, with_x, exact=True, what="grad delta")
    assert bool((grad_x != 0).any()) and bool((with_x != 0).any())  # both paths did real work


# ------------------------------------------------------------------ threads
def test_num_threads_follows_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _cpp.num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert _cpp.num_threads() == before
    assert _C.num_threads() >= 1


def test_results_do_not_depend_on_the_thread_count():
    # N = 1 with a large image: the elementwise ops split inside the image.
    gen = _gen(16)
    x = torch.rand((1, 3, 300, 301), generator=gen)
    delta = (torch.rand(x.shape, generator=gen) - 0.5) * 0.2
    g = torch.randn(x.shape, generator=gen)
    mask = (torch.rand((1, 1, 300, 301), generator=gen) < 0.2).float()
    results = []
    for nthreads in (1, 2, 5):
        out, s = torch.empty_like(x), torch.empty((1, 300, 301))
        _C.pgd_step(x.numpy(), delta.numpy(), g.numpy(), mask.numpy(), EPS, -EPS / 4, out.numpy(), nthreads)
        _C.grad_magnitude(g.numpy(), 2, s.numpy(), nthreads)
        results.append((out, s))
    for out, s in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(s, results[0][1])
    expected = torch.empty_like(x)
    ref.pgd_step(x, delta, g, mask, EPS, -EPS / 4, expected)
    assert_close_report(results[0][0], expected, exact=True, what="pgd_step")


def test_in_place_pgd_step_on_a_large_batch():
    gen = _gen(17)
    x = torch.rand((8, 3, 64, 64), generator=gen)
    delta = (torch.rand(x.shape, generator=gen) - 0.5) * 0.2
    g = torch.randn(x.shape, generator=gen)
    mask = (torch.rand((8, 1, 64, 64), generator=gen) < 0.3).float()
    expected = torch.empty_like(x)
    ref.pgd_step(x, delta, g, mask, EPS, EPS / 4, expected)
    _C.pgd_step(x.numpy(), delta.numpy(), g.numpy(), mask.numpy(), EPS, EPS / 4, delta.numpy())
    assert_close_report(delta, expected, exact=True, what="in-place pgd_step")


# ------------------------------------------------------------------ argument checks
def _arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 8, 8)).astype(dtype)
    return x, x.copy(), rng.standard_normal((2, 3, 8, 8)).astype(dtype), np.ones((2, 1, 8, 8), dtype), \
        np.empty((2, 3, 8, 8), dtype)


def _bad_calls():
    x, d, g, m, out = _arrays()
    s, mo = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32), np.empty((2, 1, 8, 8), np.float32)
    readonly = out.copy()
    readonly.flags.writeable = False
    shifted = np.zeros(x.size + 1, np.float32)  # delta and out one element apart: a partial overlap
    return [
        (lambda: _C.grad_magnitude(torch.from_numpy(g), 1, s), TypeError,
         r"grad_magnitude: g must be a numpy.ndarray, got Tensor"),
        (lambda: _C.grad_magnitude(g.astype(np.float16), 1, s), TypeError, r"g must be float32 or float64"),
        (lambda: _C.grad_magnitude(g.astype(np.int32), 1, s), TypeError, r"g must be float32 or float64"),
        (lambda: _C.grad_magnitude(g, 1, s.astype(np.float64)), TypeError, r"out has dtype float64 but g has float32"),
        (lambda: _C.grad_magnitude(g.byteswap().view(g.dtype.newbyteorder()), 1, s), TypeError, r"native byte order"),
        (lambda: _C.grad_magnitude(g.transpose(0, 1, 3, 2), 1, s), ValueError, r"g must be C-contiguous"),
        (lambda: _C.grad_magnitude(g[:, :, ::2], 1, s[:, ::2]), ValueError, r"g must be C-contiguous"),
        (lambda: _C.grad_magnitude(g, 1, s[:1]), ValueError, r"out has shape \(1, 8, 8\), expected \(2, 8, 8\)"),
        (lambda: _C.grad_magnitude(g[0], 1, s), ValueError, r"g must have 4 dimensions, got shape \(3, 8, 8\)"),
        (lambda: _C.grad_magnitude(g, 3, s), ValueError, r"p must be 1 or 2, got 3"),
        (lambda: _C.grad_magnitude(g, 1, s, -1), ValueError, r"nthreads must be >= 0"),
        (lambda: _C.topk_mask(s, 0, mo), ValueError, r"topk_mask: k must be between 1 and H\*W=64, got 0"),
        (lambda: _C.topk_mask(s, 65, mo), ValueError, r"k must be between 1 and H\*W=64, got 65"),
        (lambda: _C.topk_mask(s, 3, mo[:, 0]), ValueError, r"out must have 4 dimensions"),
        (lambda: _C.saliency_topk_mask(g, 3, 1, mo.reshape(2, 1, 4, 16)), ValueError, r"out has shape \(2, 1, 4, 16\)"),
        (lambda: _C.masked_linf_project(x, d, m, -0.1, out), ValueError, r"eps must be a finite number >= 0"),
        (lambda: _C.masked_linf_project(x, d, m, float("nan"), out), ValueError, r"eps must be a finite number"),
        (lambda: _C.masked_linf_project(x, d, m[:, :, :4].copy(), 0.1, out), ValueError, r"mask has shape"),
        (lambda: _C.masked_linf_project(x, d, m, 0.1, readonly), ValueError, r"out must be writable"),
        (lambda: _C.masked_linf_project(x, d, m, 0.1, x), ValueError, r"out overlaps x"),
        (lambda: _C.masked_linf_project(x, shifted[:-1].reshape(x.shape), m, 0.1, shifted[1:].reshape(x.shape)),
         ValueError, r"out overlaps delta \(only out=delta exactly is allowed\)"),
        (lambda: _C.pgd_step(x, d, g, m, 0.1, float("inf"), out), ValueError, r"alpha must be a finite number"),
        (lambda: _C.pgd_step(x, d, g, m, 0.1, 0.01, g), ValueError, r"out overlaps g"),
        (lambda: _C.masked_linf_project_backward(x, d, m, 0.1, g, out, out), ValueError,
         r"grad_x overlaps grad_delta"),
        (lambda: _C.masked_linf_project_backward(x, d, m, 0.1, g, g, None), ValueError,
         r"grad_delta overlaps grad_out"),
        (lambda: _C.all_finite(g.astype(np.float16)), TypeError, r"all_finite: a must be float32 or float64"),
        (lambda: _C.all_binary(m[:, :, ::2]), ValueError, r"all_binary: a must be C-contiguous"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_get_a_clean_error(case):
    fn, exc, pattern = _bad_calls()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_checks_never_copy_the_output():
    # A float64 mask for float32 images would be converted by a lenient binding; here it is refused,
    # and a valid call writes through to the caller's array.
    x, d, g, m, out = _arrays()
    with pytest.raises(TypeError, match=r"mask has dtype float64 but x has float32"):
        _C.masked_linf_project(x, d, m.astype(np.float64), 0.1, out)
    out[...] = 5.0
    _C.masked_linf_project(x, d, m, 0.1, out)
    assert np.abs(out).max() <= np.float32(0.1)


# ------------------------------------------------------------------ value scans (the ops' input checks)
# Each scan, the values it must refuse, and which values it accepts.
SCANS = {"all_finite": (_C.all_finite, [np.nan, np.inf, -np.inf], np.isfinite),
         "none_nan": (_C.none_nan, [np.nan, np.inf], lambda v: not np.isnan(v)),
         "all_binary": (_C.all_binary, [np.nan, np.inf, 2.0, 0.5, -1.0, 1e-45], lambda v: v in (0.0, 1.0))}


@pytest.mark.parametrize("name", SCANS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_value_scans_find_one_bad_value_anywhere(name, dtype, nthreads):
    scan, values, accepts = SCANS[name]
    # 4 x 8192 + 13 values: enough for the parallel split (>= 2**15), four full blocks, a short one, and
    # a tail that the 8 accumulator lanes do not divide.
    n = 4 * 8192 + 13
    clean = (np.random.default_rng(2).random(n) < 0.5).astype(dtype)  # 0/1: clean for every rule
    clean[7] = -0.0  # -0.0 is 0
    assert scan(clean, nthreads)
    for value in values:
        for where in (0, 8191, 8192, n - 13, n - 1):
            a = clean.copy()
            a[where] = value
            shaped = a.reshape(1, -1) if where % 2 else a  # any shape
            assert scan(shaped, nthreads) is bool(accepts(a[where])), (value, where)
    if name != "all_binary":  # large finite values are fine
        wide = (np.random.default_rng(3).random(n) * 2 - 1).astype(dtype) * np.finfo(dtype).max
        assert scan(wide, nthreads)
