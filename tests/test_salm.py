"""SALM's placements (class / global blocks, per-image top-K), its keyed code, what training changes,
and the protector state that protects new images."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import salm_fast.surrogate as S
from salm_fast import ops, protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import load_medmnist, make_synthetic
from salm_fast.generator import keyed_texture
from salm_fast.methods import SALM
from salm_fast.release import budget_levels

EPS = 8 / 255


def loop(rounds: int = 2) -> BiLevelConfig:
    return BiLevelConfig(max_rounds=rounds, surrogate_steps=2, batch_size=32, min_rounds=rounds, precision="fp32")


FAST = dict(mask_epochs=1, generator_steps=3, width=8)


@pytest.fixture(scope="module")
def gray():
    return make_synthetic(n_train=64, n_val=8, n_test=16, seed=3)


def _xy(ds, split="train"):
    x, y = ds[split].to_tensors()
    return x, y


# ------------------------------------------------------------------------------ block masks
def test_block_mask_keeps_the_blocks_with_the_largest_sums_ties_first():
    scores = torch.zeros(2, 8, 8, dtype=torch.float64)
    scores[0, 4:8, 0:4] = 1.0  # block (1, 0)
    scores[0, 0, 7] = 0.5  # block (0, 1)
    mask = S.block_mask(scores, k=2 * 16 + 5, cell=4)  # 2 whole blocks fit in 37 pixels
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.uint8
    assert torch.equal(mask[0, 0, 4:8, 0:4], torch.ones(4, 4, dtype=torch.uint8))
    assert torch.equal(mask[0, 0, 0:4, 4:8], torch.ones(4, 4, dtype=torch.uint8))
    assert int(mask[0].sum()) == 32
    # all-equal scores: the first blocks in row-major order
    assert torch.equal(mask[1, 0, 0:4, 0:8], torch.ones(4, 8, dtype=torch.uint8)) and int(mask[1].sum()) == 32
    with pytest.raises(ValueError, match="0 blocks of 4 x 4"):
        S.block_mask(scores, k=15, cell=4)


def test_blocks_that_cross_the_edge_are_never_chosen():
    scores = torch.zeros(1, 10, 10, dtype=torch.float64)
    scores[0, 8:, 8:] = 100.0  # outside the 2 x 2 grid of whole 4 x 4 blocks
    mask = S.block_mask(scores, k=16, cell=4)
    assert int(mask[0, 0, 8:, :].sum()) == 0 and int(mask[0, 0, :, 8:].sum()) == 0 and int(mask.sum()) == 16


@pytest.mark.parametrize("mode", ["class", "global"])
def test_block_masks_are_the_summed_normalized_saliency_of_the_group(gray, monkeypatch, mode):
    seen = {}
    real = S.saliency_sums

    def spy(model, x, y, groups, n_groups, **kw):
        seen.update(model=model, groups=groups.clone(), n_groups=n_groups)
        return real(model, x, y, groups, n_groups, **kw)

    monkeypatch.setattr(S, "saliency_sums", spy)
    x, y = _xy(gray)
    m = SALM(EPS, k=0.2, mask=mode, seed=0, loop=loop(1), **FAST)
    p = m.fit(x, y, 2)
    k = ops.resolve_k(0.2, 28 * 28)  # 157 pixels: 9 whole 4 x 4 blocks
    assert seen["n_groups"] == (2 if mode == "class" else 1)
    # recompute the sums by hand: each image's |dL/dx| (summed over channels), normalized to 1, summed per group
    model = seen["model"].eval()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(S.logits(model, xg), y, reduction="sum"), xg)
    sal = g.abs().sum(1).double().flatten(1)
    sal = (sal / sal.sum(1, keepdim=True)).view(-1, 28, 28)
    groups = y if mode == "class" else torch.zeros_like(y)
    sums = torch.stack([sal[groups == c].sum(0) for c in range(seen["n_groups"])])
    expected = S.block_mask(sums, k, 4)
    for i in range(len(x)):
        assert torch.equal(p.mask[i], expected[int(groups[i])]), f"image {i}"
    assert torch.equal(p.mask.flatten(1).sum(1), torch.full((len(x),), 9 * 16))
    if mode == "global":
        assert bool((p.mask == p.mask[:1]).all())


def test_block_mode_refuses_k_below_one_block(gray):
    x, y = _xy(gray)
    with pytest.raises(ValueError, match="holds 0 blocks of 8 x 8"):
        SALM(EPS, k=60, cell=8).fit(x, y, 2)
    with pytest.raises(ValueError, match="mask"):
        SALM(EPS, mask="pixels")


# ------------------------------------------------------------------------------ the keyed code
def test_keyed_texture_is_a_secret_of_the_seed():
    a = keyed_texture(2, 1, 28, 28, seed=1)
    assert a.shape == (2, 1, 28, 28) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, keyed_texture(2, 1, 28, 28, seed=1))  # reproducible from the seed
    assert not torch.equal(a, keyed_texture(2, 1, 28, 28, seed=2))
    assert not torch.equal(a[0].abs() * a[0], a[1])  # two classes, two textures
    # every 2 x 2 neighbourhood of a period-2 texture has zero sum (finest stripes / checkerboard)
    for c in range(2):
        blocks = a[c, 0].view(14, 2, 14, 2).sum((1, 3))
        assert bool((blocks == 0).all())
    many = keyed_texture(12, 3, 16, 16, seed=0)
    assert many.shape == (12, 3, 16, 16) and len({tuple(t.flatten().tolist()) for t in many}) == 12


def test_coarse_and_block_textures_have_no_period_2_content():
    blur = torch.tensor([0.274, 0.452, 0.274])  # the sigma-1 3 x 3 blur of the counter-measures, one axis
    for texture in ("coarse", "block"):
        code = keyed_texture(2, 1, 28, 28, seed=5, cell=4, texture=texture)
        assert set(code.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(code, keyed_texture(2, 1, 28, 28, seed=5, cell=4, texture=texture))
        assert not torch.equal(code, keyed_texture(2, 1, 28, 28, seed=6, cell=4, texture=texture))
        # no sign change between two neighbouring pixels inside a 2 x 2 pair: every 2-pixel run is flat
        plane = code[:, 0]
        assert bool((plane[:, 0::2, :] == plane[:, 1::2, :]).all() or (plane[:, :, 0::2] == plane[:, :, 1::2]).all())
        # a blur keeps a real share of it (a period-2 texture comes out at ~10% and inverted)
        kept = F.conv2d(F.conv2d(code, blur.view(1, 1, 1, 3), padding=(0, 1)), blur.view(1, 1, 3, 1), padding=(1, 0))
        assert float((kept * code).mean()) > 0.2
    fine = keyed_texture(2, 1, 28, 28, seed=5, cell=4)
    kept = F.conv2d(F.conv2d(fine, blur.view(1, 1, 1, 3), padding=(0, 1)), blur.view(1, 1, 3, 1), padding=(1, 0))
    assert float((kept * fine).mean()) < 0.1
    block = keyed_texture(2, 1, 28, 28, seed=5, cell=4, texture="block")
    assert torch.equal(block[1], -block[0])  # two flat codes: antipodal
    flat = block[0, 0].view(7, 4, 7, 4)  # constant on every 4 x 4 cell
    assert bool((flat == flat[:, :1, :, :1]).all())
    with pytest.raises(ValueError, match="texture"):
        SALM(EPS, texture="stripes")


def test_training_moves_the_released_bytes_and_code_only_does_not_train(gray, tmp_path):
    kw = dict(eps=EPS, seed=7, splits="train", figure=False, audit=False, code_scale=1.5, **FAST)
    code_only = protect(gray, "salm", out=tmp_path / "a", train=False, **kw)
    trained = protect(gray, "salm", out=tmp_path / "b", loop=loop(3), generator_lr=1e-2, **kw)
    a = load_medmnist(code_only.release_path)["train"].images.astype(np.int16)
    b = load_medmnist(trained.release_path)["train"].images.astype(np.int16)
    clean = gray["train"].images.astype(np.int16)
    on = (a != clean) | (b != clean)
    assert np.abs(a - clean).max() <= budget_levels(EPS) and np.abs(b - clean).max() <= budget_levels(EPS)
    assert (a != b)[on].mean() > 0.05  # training changed a real share of the perturbed pixels
    # the code-only release is the keyed code on the mask: +-eps * tanh(1.5) = 7.2 levels, stored as 7, where
    # [0, 255] does not clip it
    inside = on & (clean >= 8) & (clean <= 247)
    assert inside.any() and set(np.unique(np.abs((a - clean)[inside]))) <= {0, 7}
    assert (np.abs((a - clean)[inside]) == 7).mean() > 0.9


def test_the_default_code_is_stored_at_the_full_budget(gray, tmp_path):
    r = protect(gray, "salm", out=tmp_path, eps=EPS, seed=7, splits="train", figure=False, audit=False, train=False,
                mask_epochs=1)
    a = load_medmnist(r.release_path)["train"].images.astype(np.int16)
    clean = gray["train"].images.astype(np.int16)
    inside = (a != clean) & (clean >= 8) & (clean <= 247)  # eps * tanh(2) = 7.7 levels -> 8
    assert inside.any() and set(np.unique(np.abs((a - clean)[inside]))) == {8}


def test_the_default_seed_is_secret_and_not_in_the_summary(gray, tmp_path):
    kw = dict(eps=EPS, splits="train", figure=False, audit=False, train=False, mask_epochs=1)
    r1 = protect(gray, "salm", out=tmp_path / "a", **kw)
    r2 = protect(gray, "salm", out=tmp_path / "b", **kw)
    a = load_medmnist(r1.release_path)["train"].images
    b = load_medmnist(r2.release_path)["train"].images
    assert not np.array_equal(a, b)  # two OS seeds, two codes
    text = (tmp_path / "a" / "summary.json").read_text()
    assert '"seed":' not in text.replace('"seed_source"', "")


# ------------------------------------------------------------------------------ protector state
@pytest.mark.parametrize("mode", ["class", "image", "mixed"])
def test_protector_state_loads_weights_only_and_protects_like_the_fitted_method(gray, mode):
    x, y = _xy(gray)
    m = SALM(EPS, k=0.2, mask=mode, seed=0, loop=loop(1), **FAST)
    m.fit(x, y, 2)
    buf = io.BytesIO()
    torch.save(m.protector_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "seed" not in state
    again = SALM.from_protector_state(state, image_size=28)
    new_x, new_y = _xy(gray, "test")
    d1, d2 = m.perturb(new_x, new_y), again.perturb(new_x, new_y)
    assert torch.equal(d1, d2)
    assert float(d1.abs().max()) <= EPS + 1e-7 and float((new_x + d1).min()) >= 0 and float((new_x + d1).max()) <= 1
    assert int((d1 != 0).flatten(1).sum(1).max()) <= ops.resolve_k(0.2, 28 * 28)
    with pytest.raises(ValueError, match="not a SALM protector"):
        SALM.from_protector_state({**state, "format": 99})
    with pytest.raises(ValueError, match="noise=pgd"):
        SALM(EPS, noise="pgd").protector_state()
