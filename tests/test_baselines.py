"""The comparison baselines TAP, OPS and LSP: each one's budget on the float perturbation and on the
stored release (reloaded from disk), what makes each the attack it claims to be, bad options, and
determinism. Tiny synthetic data; one thread."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import salm_fast.surrogate as S
from salm_fast import protect
from salm_fast.cli import main
from salm_fast.data import storage_to_nchw, load_medmnist, make_synthetic
from salm_fast.experiment import MethodSpec
from salm_fast.methods import METHODS, TAP, LinearSeparablePerturbation, OnePixelShortcut, make_method
from salm_fast.release import budget_levels, quantize_release

EPS = 8 / 255
F32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731  the bound a float32 delta can hold
FAST_TAP = dict(surrogate_epochs=3, steps=5)




@pytest.fixture(scope="module")
def gray():
    return make_synthetic(n_train=48, n_val=4, n_test=8, seed=3)


@pytest.fixture(scope="module")
def rgb():
    return make_synthetic(n_train=36, n_val=4, n_test=8, channels=3, n_classes=3, seed=4)


nchw = storage_to_nchw


def reload_change(ds, path) -> torch.Tensor:
    """Reload the release; check the other splits and the labels are untouched; return the stored
    change of the train split in levels, int16 N x C x H x W."""
    rel = load_medmnist(path)
    assert list(rel.splits) == list(ds.splits)
    for name in ds.splits:
        np.testing.assert_array_equal(rel[name].labels, ds[name].labels)
        if name != "train":
            np.testing.assert_array_equal(rel[name].images, ds[name].images)
    assert rel["train"].images.dtype == np.uint8
    return nchw(rel["train"].images).short() - nchw(ds["train"].images).short()


def pixels_changed(change: torch.Tensor) -> torch.Tensor:
    return (change != 0).any(dim=1).flatten(1).sum(1)


# ------------------------------------------------------------------------------ every baseline, via protect()
CASES = {
    "tap": ("tap", dict(FAST_TAP), EPS),
    "tap-untargeted": ("tap", dict(FAST_TAP, targeted=False), EPS),
    "ops": ("ops", {}, 1.0),
    "lsp-l2": ("lsp", {}, 1.0),
    "lsp-linf": ("lsp", dict(norm="linf"), EPS),
}


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
@pytest.mark.parametrize("case", list(CASES))
def test_baseline_holds_its_budget_in_float_and_in_the_stored_release(case, channels, gray, rgb, tmp_path):
    ds = gray if channels == 1 else rgb
    method, options, eps = CASES[case]
    res = protect(ds, method, out=tmp_path, seed=1, figure=case == "ops", splits="train",
                  **options)  # eps: the method's default
    assert res.summary["eps"] == eps and res.summary["budget_levels"] == budget_levels(eps)
    x, _ = ds["train"].to_tensors()
    d = res.delta
    # float perturbation: L-inf, the [0, 1] box, and it did something
    assert d.shape == x.shape and d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    assert float(d.abs().max()) <= F32(eps) and float(d.abs().max()) > 0
    assert float((x + d).min()) >= 0 and float((x + d).max()) <= 1
    # stored bytes: L-inf within the budget's levels, the release really changed
    change = reload_change(ds, res.release_path)
    assert 1 <= int(change.abs().max()) <= budget_levels(eps)
    assert res.summary["budget"]["linf_levels"] == int(change.abs().max())
    if method == "ops":
        assert int(pixels_changed(change).max()) == 1 and res.summary["budget"]["l0_max_per_image"] == 1
        assert res.summary["options"]["k"] == 1 and res.summary["norm"] == "L0"
        assert (tmp_path / "protection.png").exists()
    if method == "lsp":
        dim = x[0].numel()
        stored_l2 = (change.double() / 255).flatten(1).norm(dim=1)
        assert res.summary["budget"]["l2_max"] == pytest.approx(float(stored_l2.max()), rel=1e-9)
        assert torch.equal(change, (d.double() * 255).round().short())  # on the grid: stored == float, exactly
        if options.get("norm", "l2") == "l2":
            bound = EPS * math.sqrt(dim)  # the default: the L2 norm of a full-image 8/255 perturbation
            assert res.summary["norm"] == "L2" and res.summary["budget"]["l2_budget"] == pytest.approx(bound)
            assert float(d.double().flatten(1).norm(dim=1).max()) <= bound * (1 + 1e-6)  # float
            assert float(stored_l2.max()) <= bound * (1 + 1e-6)  # stored: the pattern is pre-rounded to levels
            assert float(stored_l2.max()) <= bound + 0.5 / 255 * math.sqrt(dim)  # the documented generic slack
            assert float(stored_l2.max()) > 0.8 * bound  # it uses its budget (box cuts shrink it a little)
            assert int(change.abs().max()) > budget_levels(EPS)  # and is not L-inf-clipped to 8/255
        else:
            assert res.summary["norm"] == "Linf" and res.summary["budget"]["l2_budget"] is None
            assert int(change.abs().max()) == budget_levels(EPS)  # each pattern is scaled to max |value| = eps
        assert (pixels_changed(change) > 0).all()  # a dense pattern: every image changes


def test_defaults_resolve_per_method_and_existing_methods_keep_8_of_255(gray, tmp_path):
    assert METHODS["ops"].default_eps == 1.0 and METHODS["lsp"].default_eps == 1.0
    assert METHODS["tap"].default_eps == EPS and METHODS["random"].default_eps == EPS
    assert make_method("lsp", norm="linf").eps == EPS and make_method("lsp").eps == 1.0
    res = protect(gray, "random", out=tmp_path, figure=False)
    assert res.summary["eps"] == EPS and res.summary["budget"]["linf_levels"] <= 8
    assert "l2_max" not in res.summary["budget"]  # only methods with an extra check add fields


# ------------------------------------------------------------------------------ OPS
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_ops_one_pixel_per_class_with_one_colour_and_classes_differ(channels, gray, rgb, tmp_path):
    ds = gray if channels == 1 else rgb
    res = protect(ds, "ops", out=tmp_path, figure=False, splits="train")
    change = reload_change(ds, res.release_path)
    stored = nchw(load_medmnist(res.release_path)["train"].images)
    y = torch.from_numpy(np.array(ds["train"].labels[:, 0])).long()
    info = res.summary["protection"]
    seen = set()
    for c in range(ds.n_classes):
        h, w = info["positions"][c]
        colour = torch.tensor(info["colours"][c], dtype=torch.uint8) * 255
        assert (h, w) not in seen
        seen.add((h, w))
        idx = (y == c).nonzero().flatten()
        # every image of the class holds exactly that colour at that pixel, changed or not
        assert bool((stored[idx][:, :, h, w] == colour).all())
        # nothing else changed; exactly one pixel unless it already had the colour
        off = change[idx].clone()
        off[:, :, h, w] = 0
        assert not bool(off.any())
        already = (nchw(ds["train"].images)[idx][:, :, h, w] == colour).all(dim=1)
        assert torch.equal(pixels_changed(change[idx]), (~already).long())
        # the mask is that one pixel
        assert bool((res.mask[idx, 0, h, w] == 1).all()) and torch.equal(res.mask[idx].flatten(1).sum(1),
                                                                         torch.ones(len(idx)))
    assert len(seen) == ds.n_classes
    assert info["unchanged_images"] == int((pixels_changed(change) == 0).sum())


def test_ops_search_finds_a_planted_stable_pixel_and_never_shares_positions():
    gen = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand((40, 3, 16, 16), generator=gen)  # mid values: no pixel is stable
    y = torch.arange(40) % 4
    x[y == 0, :, 3, 4] = 0.0  # black in class 0: white moves it by 1, the same in every image
    x[y == 1, :, 10, 2] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3)  # magenta in class 1: green is the opposite
    x[y == 2, :, 3, 4] = 0.0  # class 2 wants class 0's pixel too: it loses the tie (lower class first)
    x = (x * 255).round() / 255
    p = OnePixelShortcut().fit(x, y, 4)
    pos, col = p.info["positions"], p.info["colours"]
    assert pos[0] == [3, 4] and col[0] == [1, 1, 1] and p.info["scores"][0] == pytest.approx(1.0)
    assert pos[1] == [10, 2] and col[1] == [0, 1, 0] and p.info["scores"][1] == pytest.approx(1.0)
    assert pos[2] != [3, 4] and len({tuple(q) for q in pos}) == 4  # distinct positions
    # the criterion, recomputed by brute force for class 3 at its chosen pixel and colour
    score, _ = OnePixelShortcut.scores(x, y, 4)
    h, w = pos[3]
    v = torch.tensor(col[3], dtype=torch.float64).view(1, 3)
    dist = (x[y == 3, :, h, w].double() - v).abs().mean(1)
    brute = float(dist.mean() - dist.std(unbiased=False))
    assert p.info["scores"][3] == pytest.approx(brute, abs=1e-9)
    # ... and it is class 3's best among the positions the other classes left
    left = score[3].clone()
    for q in pos[:3]:
        left[:, q[0] * 16 + q[1]] = -math.inf
    assert p.info["scores"][3] == pytest.approx(float(left.max()), abs=1e-12)
    # x + delta is exactly the colour at the pixel, unchanged elsewhere
    assert bool(((x + p.delta)[y == 0][:, :, 3, 4] == 1).all())
    assert int((p.delta != 0).any(1).flatten(1).sum(1).max()) == 1


# ------------------------------------------------------------------------------ LSP
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lsp_one_patch_pattern_per_class_on_mid_grey_images(norm):
    x = torch.full((12, 3, 28, 28), 128 / 255)  # mid-grey: no pattern value reaches the box
    y = torch.arange(12) % 3
    m = LinearSeparablePerturbation(norm=norm, seed=5)
    p = m.fit(x, y, 3)
    d = p.delta
    assert p.info["box_cut_fraction"] == 0 and p.info["patch"] == 7 and p.info["grid"] == [4, 4]
    for c in range(3):
        ref = d[y == c][0]
        assert bool((d[y == c] == ref).all())  # every image of the class gets the same pattern
        blocks = ref.view(3, 4, 7, 4, 7)  # constant on each 7 x 7 patch, per channel
        assert bool((blocks == blocks[:, :, :1, :, :1]).all())
        assert bool(((ref * 255).round() == ref * 255).all())  # on the 1/255 grid
    assert not torch.equal(d[y == 0][0], d[y == 1][0]) and not torch.equal(d[y == 1][0], d[y == 2][0])
    norms = d.double().flatten(1).norm(dim=1)
    if norm == "l2":
        bound = EPS * math.sqrt(3 * 28 * 28)
        assert float(norms.max()) <= bound * (1 + 1e-6) and float(norms.min()) >= 0.98 * bound
    else:
        per_class_max = torch.stack([d[y == c].abs().max() for c in range(3)])
        assert torch.equal(per_class_max, torch.full((3,), F32(EPS)))  # scaled to eps exactly
    # the two modes use the same draws: the L-inf pattern is the L2 pattern rescaled (signs agree)
    other = LinearSeparablePerturbation(norm="linf" if norm == "l2" else "l2", seed=5).fit(x, y, 3).delta
    both = (d != 0) & (other != 0)
    assert bool(both.any()) and torch.equal(torch.sign(d[both]), torch.sign(other[both]))


def test_lsp_options_patch_and_l2_bound_and_the_box_cut(gray):
    x, y = gray["train"].to_tensors()
    m = LinearSeparablePerturbation(l2=2.0, patch=4, seed=0)
    p = m.fit(x, y, 2)
    assert m.options() == {"eps": 1.0, "k": None, "seed": 0, "norm": "l2", "l2": 2.0, "patch": 4}
    assert p.info["l2"] == 2.0 and p.info["grid"] == [7, 7]
    assert float(p.delta.double().flatten(1).norm(dim=1).max()) <= 2.0 * (1 + 1e-6)
    pattern = m.patterns(2, (1, 28, 28))
    assert pattern.double().flatten(1).norm(dim=1).max() <= 2.0 * (1 + 1e-6)
    # where the box did not cut, delta is exactly the class pattern; where it did, x + delta hits 0 or 1
    raw = pattern[y]
    inside = ((x + raw) >= 0) & ((x + raw) <= 1)
    assert torch.equal(p.delta[inside], raw[inside])
    assert bool(((x + p.delta)[~inside] == 0).logical_or((x + p.delta)[~inside] == 1).all())
    assert p.info["box_cut_fraction"] > 0  # dark synthetic images: negative values get cut


def test_lsp_check_release_refuses_a_release_over_its_l2_bound():
    m = LinearSeparablePerturbation(l2=0.1)
    x = torch.full((2, 1, 28, 28), 0.5)
    m.fit(x, torch.tensor([0, 1]), 2)
    clean = torch.full((2, 1, 28, 28), 128, dtype=torch.uint8)
    ok = clean.clone()
    ok[0, 0, 0, :6] += 4  # L2 = sqrt(6) * 4/255 = 0.0384
    assert m.check_release(clean, ok)["l2_max"] == pytest.approx(math.sqrt(6) * 4 / 255)
    bad = clean.clone()
    bad[0, 0, 0, :20] += 8  # L2 = sqrt(20) * 8/255 = 0.14 > 0.1
    with pytest.raises(RuntimeError, match="l2"):
        m.check_release(clean, bad)


def test_lsp_spec_from_the_experiment_grid_reaches_the_method(gray, tmp_path):
    spec = MethodSpec.parse("lsp:norm=linf")
    assert spec.options == (("norm", "linf"),)
    res = protect(gray, spec.name, out=tmp_path, figure=False, **dict(spec.options))
    assert res.summary["options"]["norm"] == "linf" and res.summary["eps"] == EPS


# ------------------------------------------------------------------------------ TAP
@pytest.fixture(scope="module")
def three_class():
    ds = make_synthetic(n_train=60, n_val=4, n_test=4, n_classes=3, seed=7)
    return ds["train"].to_tensors()


def _released(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """The float images of the uint8 release (what a victim sees)."""
    u8 = (x * 255).round().to(torch.uint8)
    return quantize_release(u8, delta, eps).float() / 255


@torch.no_grad()
def _rates(model, x, y, target):
    out = S.logits(model, x)
    return float((out.argmax(1) == target).float().mean()), float(F.cross_entropy(out, y))


def test_tap_targeted_moves_the_frozen_surrogate_to_the_next_class(three_class):
    x, y = three_class
    m = TAP(surrogate_epochs=20, steps=10, seed=0)
    p = m.fit(x, y, 3)
    t = (y + 1) % 3
    assert p.info["surrogate_accuracy_clean"] > 0.6  # a decent crafting model (eval mode, BN recalibrated)
    assert m.options()["step_size"] == pytest.approx(EPS / 8) and m.options()["targeted"] is True
    hit_clean, _ = _rates(m.surrogate, x, y, t)
    hit_release, _ = _rates(m.surrogate, _released(x, p.delta, EPS), y, t)
    assert hit_release >= hit_clean + 0.4 and hit_release >= 0.8, (hit_clean, hit_release)
    assert p.info["target_rate_perturbed"] >= p.info["target_rate_clean"] + 0.4
    assert all(not q.requires_grad for q in m.surrogate.parameters())  # frozen


def test_tap_untargeted_raises_the_surrogate_loss(three_class):
    x, y = three_class
    m = TAP(targeted=False, surrogate_epochs=20, steps=10, seed=0)
    p = m.fit(x, y, 3)
    acc_clean, loss_clean = _rates(m.surrogate, x, y, y)
    acc_release, loss_release = _rates(m.surrogate, _released(x, p.delta, EPS), y, y)
    assert loss_release > loss_clean + 0.2 and acc_release < acc_clean, (loss_clean, loss_release)
    assert "target_rate_clean" not in p.info and p.info["surrogate_loss_perturbed"] > p.info["surrogate_loss_clean"]


# ------------------------------------------------------------------------------ bad options
BAD = {
    "tap steps 0": ("tap", dict(steps=0), "steps"),
    "tap steps float": ("tap", dict(steps=2.5), "steps"),
    "tap targeted str": ("tap", dict(targeted="yes"), "targeted"),
    "tap step_size 0": ("tap", dict(step_size=0.0), "step_size"),
    "tap surrogate_epochs 0": ("tap", dict(surrogate_epochs=0), "surrogate_epochs"),
    "tap surrogate": ("tap", dict(surrogate="vgg99"), "surrogate"),
    "tap k": ("tap", dict(k=10), "k"),
    "ops k 5": ("ops", dict(k=5), "k"),
    "ops k fraction": ("ops", dict(k=0.1), "k"),
    "ops k 1.0": ("ops", dict(k=1.0), "k"),
    "ops eps": ("ops", dict(eps=EPS), "eps"),
    "lsp norm": ("lsp", dict(norm="l1"), "norm"),
    "lsp l2 with eps": ("lsp", dict(eps=EPS), "eps"),
    "lsp l2 negative": ("lsp", dict(l2=-1.0), "l2"),
    "lsp l2 with linf": ("lsp", dict(norm="linf", l2=1.0), "l2"),
    "lsp patch 0": ("lsp", dict(patch=0), "patch"),
    "lsp unknown option": ("lsp", dict(colour=3), "colour"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_raise_a_clear_value_error(case):
    method, options, needle = BAD[case]
    with pytest.raises(ValueError, match=needle):
        make_method(method, **options)


@pytest.mark.parametrize(("method", "options", "needle"), [("ops", dict(k=3), "k"), ("lsp", dict(patch=40), "patch"),
                                                           ("ops", dict(eps=EPS), "eps")])
def test_protect_refuses_bad_options_before_writing_anything(method, options, needle, gray, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=needle):
        protect(gray, method, out=out, figure=False, **options)
    assert not out.exists()


# ------------------------------------------------------------------------------ determinism, CLI
@pytest.mark.parametrize(("method", "options"), [("tap", dict(surrogate_epochs=1, steps=2)), ("lsp", {}),
                                                 ("lsp", dict(norm="linf")), ("ops", {})])
def test_same_seed_same_bytes(method, options, gray, tmp_path):
    def release(seed, name):
        res = protect(gray, method, out=tmp_path / name, seed=seed, figure=False, **options)
        return load_medmnist(res.release_path)["train"].images

    a, b, c = release(0, "a"), release(0, "b"), release(1, "c")
    np.testing.assert_array_equal(a, b)
    if method == "ops":  # model-free and search-based: the seed plays no part
        np.testing.assert_array_equal(a, c)
    else:
        assert not np.array_equal(a, c)


def test_cli_protect_with_ops_uses_its_own_defaults(tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(["protect", "--data", "synthetic:n=200", "--method", "ops", "--out", str(out), "--quiet",
               "--no-figure"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eps"] == 1.0 and summary["options"]["k"] == 1
    assert summary["budget"]["l0_max_per_image"] == 1 and summary["budget"]["linf_levels"] <= 255
