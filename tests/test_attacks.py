"""salm_fast.attacks: the budget (L-inf eps, L0 <= K, [0, 1]) on every attack, model mode restored,
normalization honoured, the loss moved the right way, half precision, and one-line argument errors."""
from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salm_fast.attacks as attacks
import salm_fast.ops as ops
from salm_fast.attacks import MinMaxPGD, MinMinPGD, add_within_budget

ATTACKS = [MinMinPGD, MinMaxPGD]
EPS = 8 / 255
N, C, H, W = 6, 3, 12, 12


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(8 * H * W, 4))


def batch(seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((N, C, H, W), generator=g)
    x[0, :, :3] = 0.0  # saturated pixels: the [0, 1] cut must bind there
    x[1, :, :3] = 1.0
    return x.to(dtype), torch.randint(0, 4, (N,), generator=g)


def eps_in(dtype: torch.dtype) -> float:
    """The budget as the kernels clip to it: float32/64 round eps to nearest, half precision rounds it down."""
    return float(torch.tensor(EPS, dtype=dtype)) if dtype in (torch.float32, torch.float64) else EPS


def assert_budget(x: torch.Tensor, x_adv: torch.Tensor, k: int | None = None) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float((x_adv.double() - x.double()).abs().max()) <= eps_in(x.dtype)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if k is not None:
        changed = (x_adv != x).any(dim=1).flatten(1).sum(1)
        assert int(changed.max()) <= k, changed.tolist()


def loss_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x.float()), y))


@pytest.mark.parametrize("cls", ATTACKS)
@pytest.mark.parametrize("k", [None, 10, 0.25])
def test_budget_and_l0_hold(cls, k):
    model, (x, y) = tiny_model(), batch()
    x_adv = cls(model, eps=EPS, alpha=2 / 255, steps=6, k=k)(x, y)
    assert_budget(x, x_adv, None if k is None else ops.resolve_k(k, H * W))
    assert bool((x_adv != x).any())  # it moved


@pytest.mark.parametrize("cls", ATTACKS)
def test_k_mask_is_the_clean_saliency_top_k(cls):
    model, (x, y) = tiny_model(), batch()
    x_adv = cls(model, steps=4, k=12)(x, y)
    model.eval()
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    mask = ops.saliency_topk_mask(g, 12).bool()[:, 0]
    changed = (x_adv != x).any(dim=1)
    assert not bool((changed & ~mask).any())  # only saliency top-K pixels move
    assert int(changed.sum()) > N  # and they do move


@pytest.mark.parametrize("cls", ATTACKS)
def test_given_mask_at_construction_and_per_call(cls):
    model, (x, y) = tiny_model(), batch()
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand((N, 1, H, W), generator=g) < 0.1).float()
    other = (torch.rand((N, 1, H, W), generator=g) < 0.1).float()
    atk = cls(model, steps=5, mask=mask)
    x_adv = atk(x, y)
    x_call = atk(x, y, mask=other)  # per-call mask overrides the constructor's
    for m, xa in ((mask, x_adv), (other, x_call)):
        assert_budget(x, xa, int(m.flatten(1).sum(1).max()))
        assert not bool(((xa != x).any(dim=1) & (m[:, 0] == 0)).any())


@pytest.mark.parametrize("cls", ATTACKS)
def test_model_mode_restored_eval_during_attack_no_parameter_gradients(cls):
    model, (x, y) = tiny_model(), batch()
    model.train()
    model[1].eval()  # a mixed mode (frozen BatchNorm) must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    running = model[1].running_mean.clone()
    seen = []
    hook = model[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    cls(model, steps=3, k=0.2)(x, y)
    hook.remove()
    assert seen and not any(seen)  # every forward in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())


def test_model_mode_restored_on_error():
    model, (x, y) = tiny_model(), batch()
    model.train()
    with pytest.raises(ValueError, match="k=500 exceeds the 144 pixels"):
        MinMinPGD(model, k=500)(x, y)
    assert all(m.training for m in model.modules())


class Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


@pytest.mark.parametrize("cls", ATTACKS)
def test_normalization_used_equals_a_normalizing_model(cls):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model, (x, y) = tiny_model(), batch()
    ours = cls(model, steps=5, k=0.3).set_normalization_used(mean, std)(x, y)
    wrapped = cls(Normalized(model, mean, std), steps=5, k=0.3)(x, y)
    assert torch.equal(ours, wrapped)
    plain = cls(model, steps=5, k=0.3)(x, y)
    assert not torch.equal(ours, plain)  # the normalization did change what the model saw


def test_min_min_lowers_and_min_max_raises_the_loss():
    model, (x, y) = tiny_model(), batch()
    clean = loss_at(model, x, y)
    lower = loss_at(model, MinMinPGD(model, steps=10)(x, y), y)
    higher = loss_at(model, MinMaxPGD(model, steps=10)(x, y), y)
    assert lower < clean - 0.05 and higher > clean + 0.05, (lower, clean, higher)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("cls", ATTACKS)
def test_other_dtypes_follow_the_images(cls, dtype):
    model, (x, y) = tiny_model(), batch(dtype=dtype)
    clean = loss_at(model, x, y)
    x_adv = cls(model, steps=8, k=0.25)(x, y)
    assert_budget(x, x_adv, ops.resolve_k(0.25, H * W))
    moved = loss_at(model, x_adv, y)
    assert (moved < clean) if cls is MinMinPGD else (moved > clean)


def test_random_start_stays_in_budget_and_is_reproducible():
    model, (x, y) = tiny_model(), batch()
    atk = MinMinPGD(model, steps=2, k=20, random_start=True)
    torch.manual_seed(3)
    a = atk(x, y)
    torch.manual_seed(3)
    b = atk(x, y)
    assert_budget(x, a, 20)
    assert torch.equal(a, b) and not torch.equal(a, MinMinPGD(model, steps=2, k=20)(x, y))


def test_add_within_budget_never_overshoots_where_a_plain_add_does():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((64, 1, 8, 8), generator=g)
    delta = (torch.rand((64, 1, 8, 8), generator=g) * 2 - 1) * EPS
    delta = torch.maximum(torch.minimum(delta, 1 - x), -x)  # the projection's [0, 1] cut
    plain = x + delta
    moved = lambda xa: (xa.double() - x.double()).abs()  # noqa: E731
    assert bool((moved(plain) > delta.double().abs()).any())  # rounding to nearest overshoots somewhere
    ours = add_within_budget(x, delta)
    assert bool((moved(ours) <= delta.double().abs()).all())
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    assert float((ours - plain).abs().max()) <= 1e-7  # by one ulp at most


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, "eps must be in (0, 1]"),
    ({"eps": 8.0}, "eps must be in (0, 1]"),
    ({"alpha": -1 / 255}, "alpha must be in (0, 1]"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"k": 0}, "k must be >= 1 pixel"),
    ({"k": 1.5}, "k as a fraction of the pixels must be in (0, 1]"),
    ({"k": 5, "mask": torch.ones(N, 1, H, W)}, "give k"),
])
def test_bad_construction_raises_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        MinMinPGD(tiny_model(), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case, message", [
    ("above_one", "images must be in [0, 1]"),
    ("nan", "images contain NaN or inf"),
    ("mask_shape", "mask must have shape (6, 1, 12, 12)"),
    ("mask_values", "mask must hold only 0 and 1"),
    ("labels", "labels must have shape (6,)"),
    ("rank", "N x C x H x W"),
])
def test_bad_call_raises_one_line(case, message):
    model, (x, y) = tiny_model(), batch()
    mask = None
    if case == "above_one":
        x = x * 1.5
    elif case == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif case == "mask_shape":
        mask = torch.ones(N, C, H, W)
    elif case == "mask_values":
        mask = torch.full((N, 1, H, W), 0.5)
    elif case == "labels":
        y = y[:3]
    elif case == "rank":
        x = x[0]
    with pytest.raises(ValueError) as info:
        MinMaxPGD(model, steps=1)(x, y, mask=mask)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_normalization_arguments_checked():
    atk = MinMinPGD(tiny_model())
    with pytest.raises(ValueError, match="std must be > 0"):
        atk.set_normalization_used([0.5, 0.5, 0.5], [0.2, 0.0, 0.2])
    atk.set_normalization_used([0.5, 0.5], [0.25, 0.25])  # two channels for a 3-channel batch
    with pytest.raises(ValueError, match="normalization mean has 2 values for 3 channels"):
        atk(*batch())


def test_docstring_examples_run():
    assert doctest.testmod(attacks).failed == 0


def test_readme_example_runs_and_holds_its_comments():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Drop-in attacks for existing code", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    x, x_adv = scope["x"], scope["x_unlearnable"]
    assert_budget(x, x_adv, 78)
    assert_budget(x, scope["x_adversarial"])
