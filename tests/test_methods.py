"""Every protection method: the budget (|delta| <= eps, L0 <= k, [0, 1]) on the float perturbation
and on the stored release, plus SALM's options (classes, poison ratio, mask refresh, top-k mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import salm_fast.surrogate as S
from salm_fast import ops, protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import load_medmnist, make_synthetic
from salm_fast.methods import METHODS, SALM, make_method
from salm_fast.release import budget_levels

EPS = 8 / 255
EPS32 = float(torch.tensor(EPS, dtype=torch.float32))  # the bound a float32 perturbation can hold


def tiny_loop(rounds: int = 1, **kw) -> BiLevelConfig:
    return BiLevelConfig(**{"max_rounds": rounds, "surrogate_steps": 2, "batch_size": 32, "min_rounds": 1, **kw})


def fast_options(name: str) -> dict:
    """Tiny but complete settings for each method (name, or 'salm-pgd' / 'random-k')."""
    return {
        "salm": dict(k=0.1, mask_epochs=1, generator_steps=2, width=8, loop=tiny_loop()),
        "salm-pgd": dict(k=0.1, noise="pgd", pgd_steps=2, mask_epochs=1, loop=tiny_loop()),
        "samplewise": dict(steps=2, loop=tiny_loop()),
        "classwise": dict(steps=2, loop=tiny_loop()),
        "generator": dict(generator_steps=2, width=8, loop=tiny_loop()),
        "random": {},
        "random-k": dict(k=20),
    }[name]


ALL = ["salm", "salm-pgd", "samplewise", "classwise", "generator", "random", "random-k"]


def method_name(case: str) -> str:
    return case.split("-")[0]




@pytest.fixture(scope="module")
def gray():
    return make_synthetic(n_train=64, n_val=8, n_test=16, seed=3)


@pytest.fixture(scope="module")
def rgb():
    return make_synthetic(n_train=48, n_val=8, n_test=16, channels=3, n_classes=3, seed=4)


def pixels_changed(delta: torch.Tensor) -> torch.Tensor:
    """Per image: pixels where any channel of the perturbation is nonzero."""
    return (delta != 0).any(dim=1).flatten(1).sum(1)


def assert_float_budget(x: torch.Tensor, delta: torch.Tensor, k: int | None) -> None:
    assert delta.shape == x.shape and delta.dtype == torch.float32
    assert bool(torch.isfinite(delta).all())
    assert float(delta.abs().max()) <= EPS32
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    assert float(delta.abs().max()) > 0  # it did something
    if k is not None:
        assert int(pixels_changed(delta).max()) <= k


def assert_stored_release(ds, path, k: int | None, split: str = "train") -> np.ndarray:
    """Reload the release from disk and check it against the clean dataset; returns pixels changed per image."""
    rel = load_medmnist(path)
    assert list(rel.splits) == list(ds.splits)
    for name in ds.splits:
        np.testing.assert_array_equal(rel[name].labels, ds[name].labels)
        if name != split:
            np.testing.assert_array_equal(rel[name].images, ds[name].images)  # untouched, byte for byte
    clean, stored = ds[split].images.astype(np.int16), rel[split].images.astype(np.int16)
    assert rel[split].images.dtype == np.uint8 and stored.shape == clean.shape
    diff = np.abs(stored - clean)
    assert diff.max() <= budget_levels(EPS)
    assert diff.max() >= 1  # the perturbed split really changed
    changed = diff.max(axis=-1) if diff.ndim == 4 else diff
    per_image = (changed > 0).reshape(len(clean), -1).sum(1)
    if k is not None:
        assert per_image.max() <= k
    with np.load(path, allow_pickle=False) as z:  # nothing but images and labels
        assert sorted(z.files) == sorted(f"{s}_{kind}" for s in ds.splits for kind in ("images", "labels"))
    return per_image


# ------------------------------------------------------------------------------ every method, via protect()
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
@pytest.mark.parametrize("case", ALL)
def test_every_method_holds_its_budget_in_float_and_in_the_stored_release(case, channels, gray, rgb, tmp_path):
    ds = gray if channels == 1 else rgb
    options = fast_options(case)
    k_opt = options.pop("k", None)
    figure = case == "salm"  # the figure once per layout (gray, RGB)
    res = protect(ds, method_name(case), out=tmp_path, eps=EPS, k=k_opt, seed=1, figure=figure, splits="train",
                  **options)
    if figure:
        with Image.open(tmp_path / "protection.png") as im:
            assert im.format == "PNG" and im.size[0] > 100
    x = torch.from_numpy(np.array(ds["train"].images)).float() / 255
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    hw = x.shape[2] * x.shape[3]
    k = ops.resolve_k(k_opt, hw) if k_opt is not None else None
    assert_float_budget(x, res.delta, k)
    per_image = assert_stored_release(ds, res.release_path, k)
    if case == "random":  # unmasked uniform noise: every image changes
        assert (per_image > 0).all()
    if k is not None:  # masked methods: exactly k ones per image (every image selected by default); SALM's
        # default global mask: the whole 4 x 4 blocks that fit in k
        ones = (k // 16) * 16 if case in ("salm", "salm-pgd") else k
        assert torch.equal(res.mask.flatten(1).sum(1), torch.full((len(x),), float(ones)))
        assert bool((res.delta * (1 - res.mask) == 0).all())  # nothing off the mask
    assert res.summary["budget"]["linf_levels"] == int(np.abs(
        load_medmnist(res.release_path)["train"].images.astype(np.int16)
        - ds["train"].images.astype(np.int16)).max())


def test_all_splits_can_be_perturbed_and_each_holds_the_budget(gray, tmp_path):
    res = protect(gray, "random", out=tmp_path, eps=EPS, k=30, splits="all", seed=0, figure=False)
    rel = load_medmnist(res.release_path)
    for name in gray.splits:
        diff = np.abs(rel[name].images.astype(np.int16) - gray[name].images.astype(np.int16))
        assert 1 <= diff.max() <= budget_levels(EPS)
        assert (diff > 0).reshape(len(diff), -1).sum(1).max() <= 30
    assert res.summary["splits"] == ["train", "val", "test"]
    assert res.summary["images"] == sum(len(gray[s]) for s in gray.splits)


# ------------------------------------------------------------------------------ SALM options
def _xy(ds):
    return ds["train"].to_tensors()


def test_salm_classes_leave_other_classes_byte_identical(gray, tmp_path):
    res = protect(gray, "salm", out=tmp_path, eps=EPS, k=0.1, classes=[1], seed=0, figure=False, splits="train",
                  **{k: v for k, v in fast_options("salm").items() if k != "k"})
    rel = load_medmnist(res.release_path)["train"].images
    y = gray["train"].labels[:, 0]
    np.testing.assert_array_equal(rel[y == 0], gray["train"].images[y == 0])
    changed = (rel != gray["train"].images).reshape(len(y), -1).any(1)
    assert changed[y == 1].all()  # every class-1 image is protected
    assert float(res.mask[torch.from_numpy(y == 0)].sum()) == 0


def test_salm_poison_ratio_selects_round_ratio_n_images(gray):
    x, y = _xy(gray)
    m = SALM(EPS, k=0.1, poison_ratio=0.5, seed=0, noise="pgd", pgd_steps=1, mask_epochs=1, loop=tiny_loop())
    p = m.fit(x, y, 2)
    selected = p.mask.flatten(1).sum(1) > 0
    assert int(selected.sum()) == round(0.5 * len(x))
    assert bool((pixels_changed(p.delta)[~selected] == 0).all())
    assert_float_budget(x, p.delta, ops.resolve_k(0.1, 28 * 28))
    # classes and ratio together: half of class 1 only
    m = SALM(EPS, k=0.1, classes=[1], poison_ratio=0.5, seed=0, noise="pgd", pgd_steps=1, mask_epochs=1,
             loop=tiny_loop())
    sel = m.selected(y, 2)
    assert int(sel.sum()) == round(0.5 * int((y == 1).sum())) and not bool(sel[y == 0].any())


@pytest.mark.parametrize("noise", ["generator", "pgd"])
def test_salm_mask_refresh_moves_the_mask_and_keeps_l0(noise, gray):
    x, y = _xy(gray)
    k = ops.resolve_k(0.1, 28 * 28)
    opts = dict(k=0.1, seed=0, noise=noise, pgd_steps=2, generator_steps=2, width=8, mask_epochs=1, mask="image")
    fixed = SALM(EPS, loop=tiny_loop(2), **opts).fit(x, y, 2)
    refreshed = SALM(EPS, loop=tiny_loop(2), mask_refresh=1, **opts).fit(x, y, 2)
    assert not torch.equal(fixed.mask, refreshed.mask)  # the refresh really re-ranked the pixels
    assert torch.equal(refreshed.mask.flatten(1).sum(1), torch.full((len(x),), float(k)))
    assert bool((refreshed.delta * (1 - refreshed.mask) == 0).all())  # stored noise moved inside the new mask
    assert_float_budget(x, refreshed.delta, k)


@pytest.mark.parametrize("window", [1, 5])
def test_salm_mask_is_the_top_k_of_the_surrogate_saliency(gray, monkeypatch, window):
    seen = {}
    real = S.saliency_mask

    def spy(model, x, y, k, **kw):
        seen.update(model=model, p=kw.get("p", 1), window=kw.get("window", 1))
        return real(model, x, y, k, **kw)

    monkeypatch.setattr(S, "saliency_mask", spy)
    x, y = _xy(gray)
    m = SALM(EPS, k=25, classes=[0], seed=0, noise="pgd", pgd_steps=1, mask_epochs=1, loop=tiny_loop(),
             saliency_window=window, mask="image")
    p = m.fit(x, y, 2)
    xg = x.clone().requires_grad_(True)  # summed loss: each image's gradient is its own
    (g,) = torch.autograd.grad(F.cross_entropy(S.logits(seen["model"].eval(), xg), y, reduction="sum"), xg)
    sal = g.abs().sum(1, keepdim=True)  # p = 1: sum_c |dL/dx|
    # ranked by the local saliency: the mean over the window (edges: over the pixels inside)
    sal = F.avg_pool2d(sal, window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]
    assert seen["p"] == 1 and seen["window"] == window
    for i in range(len(x)):
        on = p.mask[i, 0] > 0
        if int(y[i]) == 1:
            assert not bool(on.any())
            continue
        assert int(on.sum()) == 25
        assert float(sal[i][on].min()) >= float(sal[i][~on].max())


# ------------------------------------------------------------------------------ the generator protects new images
def test_trained_generator_protects_new_images_within_budget(gray):
    x, y = _xy(gray)
    m = make_method("generator", eps=EPS, seed=0, **fast_options("generator"))
    m.fit(x, y, 2)
    new_x, new_y = gray["test"].to_tensors()
    d = m.perturb(new_x, new_y)
    assert_float_budget(new_x, d, None)
    # bf16 generator: the same noise up to bf16 rounding, the budget still exact
    d16 = m.perturb(new_x, new_y, precision="bf16")
    assert_float_budget(new_x, d16, None)
    assert d16.dtype == new_x.dtype and float((d16 - d).abs().max()) <= 0.05 * EPS
    assert all(p.is_contiguous() for p in m.net.parameters())  # the generator is left in its own layout
    with pytest.raises(ValueError, match="precision"):
        m.perturb(new_x, new_y, precision="fp16")
    with pytest.raises(RuntimeError, match="fit"):
        make_method("generator").perturb(new_x, new_y)


# ------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(("name", "options", "match"), [
    ("nope", {}, "unknown method"),
    ("salm", {"eps": 0}, "eps"),
    ("salm", {"eps": 1.5}, "eps"),
    ("salm", {"eps": True}, "eps"),
    ("salm", {"eps": float("nan")}, "eps"),
    ("salm", {"k": 0}, "k"),
    ("salm", {"k": 1.5}, "k"),
    ("salm", {"k": "a"}, "k"),
    ("salm", {"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
    ("salm", {"seed": -1}, "seed"),
    ("random", {"seed": True}, "seed"),
    ("random", {"seed": "3"}, "seed"),
    ("salm", {"rounds": 1.5}, "rounds must be an integer >= 1, got 1.5"),
    ("samplewise", {"rounds": 0}, "rounds"),
    ("samplewise", {"steps": 0}, "steps"),
    ("classwise", {"step_size": 0.0}, "step_size"),
    ("generator", {"width": 8.0}, "width"),
    ("generator", {"generator_lr": float("inf")}, "generator_lr"),
    ("salm", {"mask_epochs": 1.5}, "mask_epochs"),
    ("salm", {"saliency_p": 1.0}, "saliency_p"),
    ("salm", {"code": "no"}, "code"),
    ("salm", {"classes": ["a"]}, "classes"),
    ("salm", {"eps": "2"}, "ambiguous"),
    ("salm", {"bogus": 1}, "unknown option 'bogus' for method salm; valid: .*mask_refresh"),
    ("salm", {"surrogate": "vgg99"}, "surrogate"),
    ("salm", {"loop": {"max_rounds": 1}}, "loop must be a BiLevelConfig"),
    ("salm", {"noise": "fgsm"}, "noise"),
    ("salm", {"poison_ratio": 0.0}, "poison_ratio"),
    ("salm", {"poison_ratio": 1.5}, "poison_ratio"),
    ("salm", {"saliency_p": 3}, "saliency_p"),
    ("salm", {"mask_refresh": -1}, "mask_refresh"),
    ("salm", {"classes": []}, "classes is empty"),
    ("samplewise", {"k": 10}, "masked methods only"),
    ("classwise", {"bogus": 1}, "bogus"),
    ("samplewise", {"loop": BiLevelConfig(max_rounds=0)}, "max_rounds"),
    ("generator", {"loop": BiLevelConfig(batch_size=0)}, "batch_size"),
    ("salm", {"loop": BiLevelConfig(min_rounds=5, max_rounds=2)}, "min_rounds"),
    ("salm", {"rounds": 2, "min_rounds": 3}, "min_rounds must be in \\[0, max_rounds=2\\]"),
    ("salm", {"min_rounds": -1}, "min_rounds"),
    ("salm", {"texture": "stripes"}, "texture"),
])
def test_make_method_refuses_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_method(name, **options)


def test_defaults_come_from_the_method_class():
    assert make_method("salm").k == make_method("salm", k=None).k == SALM.default_k == 0.2
    assert make_method("ops").k == METHODS["ops"].default_k == 1
    assert make_method("salm").eps == make_method("salm", eps="8/255").eps == METHODS["salm"].default_eps == EPS
    assert make_method("random").k is None  # not masked: no k unless given
    assert all(METHODS[n].default_k is not None for n in METHODS if METHODS[n].masked)


def test_option_names_are_the_constructors_keywords():
    names = SALM.option_names()
    assert {"eps", "k", "seed", "mask_refresh", "generator_steps", "loop", "rounds", "surrogate"} <= set(names)
    assert "kw" not in names and "self" not in names
    assert set(METHODS["random"].option_names()) == {"eps", "seed", "k"}


def test_a_method_copies_the_loop_it_is_given():
    cfg = tiny_loop(5)
    m = make_method("samplewise", seed=3, rounds=2, loop=cfg)
    assert (cfg.max_rounds, cfg.seed) == (5, 0)  # the caller's config is left alone
    assert (m.loop.max_rounds, m.loop.seed) == (2, 3)


def test_rounds_caps_the_loop_and_min_rounds_forces_it():
    assert SALM.default_loop().min_rounds == 5 and SALM.default_loop().max_rounds == 20
    capped = make_method("salm", rounds=3).loop  # a cap below the default minimum lowers the minimum
    assert (capped.max_rounds, capped.min_rounds) == (3, 3)
    early = make_method("salm", min_rounds=1).loop  # stop as soon as the surrogate fits
    assert (early.max_rounds, early.min_rounds) == (20, 1)
    exact = make_method("salm", rounds=5, min_rounds=5).loop
    assert (exact.max_rounds, exact.min_rounds) == (5, 5)


def test_method_specs_check_option_names_when_parsed():
    from salm_fast.experiment import MethodSpec

    assert MethodSpec.parse("salm:k=0.05,noise=pgd").options == (("k", 0.05), ("noise", "pgd"))
    with pytest.raises(ValueError, match="unknown option 'kk' for method salm"):
        MethodSpec.parse("salm:kk=0.05")
    with pytest.raises(ValueError, match="seed"):
        MethodSpec.parse("samplewise:seed=3")


def test_fit_refuses_bad_data(gray):
    x, y = _xy(gray)
    m = make_method("random", k=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.fit(x + 1, y)
    with pytest.raises(ValueError, match="one integer label per image"):
        m.fit(x, y[:-1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        m.fit(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match="k must be between 1 and H\\*W"):
        make_method("random", k=28 * 28 + 1).fit(x, y)
    with pytest.raises(ValueError, match="classes"):
        SALM(k=16, classes=[2], mask_epochs=1, loop=tiny_loop()).fit(x, y, 2)
    with pytest.raises(ValueError, match="no image is selected"):  # round(0.005 * 64) = 0 images
        SALM(k=16, poison_ratio=0.005, mask_epochs=1, loop=tiny_loop()).fit(x, y, 2)


def test_fit_leaves_the_callers_random_state_alone(gray):
    x, y = _xy(gray)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    make_method("samplewise", steps=1, loop=tiny_loop()).fit(x, y, 2)
    make_method("random", k=10).fit(x, y, 2)
    assert torch.equal(torch.get_rng_state(), before)


def test_method_registry_is_complete():
    assert set(METHODS) == {"salm", "samplewise", "classwise", "generator", "random", "tap", "ops", "lsp"}
