"""salm_fast.compat: the reference PerturbationTool's calls give the same numbers as the same loop in plain
PyTorch (noise atol 1e-6, surrogate losses within 1e-5), the budget holds, the dataset side keeps negative
noise, bad arguments raise one line; and ``python -m salm_fast`` runs the CLI."""
from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import salm_fast.compat as compat
from bench.compat import PlainPerturbationTool, classic_loop
from salm_fast.compat import PerturbationTool, poison_uint8

EPS, STEP = 8 / 255, 2 / 255
NOISE_ATOL, LOSS_ATOL = 1e-6, 1e-5  # float32 rounding: the fused step adds in another order


def data(n: int = 48, n_classes: int = 3, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, size, size), generator=g)
    x[: n // 4, :, :3] = 0.0  # saturated pixels: there the reference's eta points outside [0, 1]
    x[n // 4: n // 2, :, -3:] = 1.0
    return x, torch.randint(0, n_classes, (n,), generator=g)


def tools(num_steps: int = 5) -> tuple[PlainPerturbationTool, PerturbationTool]:
    return (PlainPerturbationTool(EPS, num_steps, STEP),
            PerturbationTool(epsilon=EPS, num_steps=num_steps, step_size=STEP, device="cpu"))


@pytest.mark.parametrize("class_wise, attack", [(False, "min_min_attack"), (True, "min_min_attack"),
                                                (False, "min_max_attack")])
def test_classic_loop_gives_the_same_numbers(class_wise, attack):
    x, y = data()
    plain, ours = tools()
    kwargs = dict(seed=0, rounds=3, train_steps=3, batch_size=16, width=4, class_wise=class_wise, attack=attack)
    noise_plain, losses_plain = classic_loop(plain, x, y, 3, **kwargs)
    noise_ours, losses_ours = classic_loop(ours, x, y, 3, **kwargs)
    assert float(noise_plain.abs().max()) > EPS / 2  # the loop did move the noise
    torch.testing.assert_close(noise_ours, noise_plain, rtol=0, atol=NOISE_ATOL)
    assert len(losses_ours) == len(losses_plain) == 9
    assert max(abs(a - b) for a, b in zip(losses_ours, losses_plain)) <= LOSS_ATOL
    assert float(noise_ours.abs().max()) <= float(torch.tensor(EPS))
    if not class_wise:  # the stored eta is the reference's: clipped to eps only, not to [0, 1]
        assert bool(((x + noise_ours) < 0).any() or ((x + noise_ours) > 1).any())


@pytest.mark.parametrize("attack", ["min_min_attack", "min_max_attack"])
def test_one_call_matches_plain_and_holds_the_budget(attack):
    x, y = data(16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 3)).eval()
    plain, ours = tools(num_steps=7)
    torch.manual_seed(4)
    img_plain, eta_plain = getattr(plain, attack)(x, y, model, None, nn.CrossEntropyLoss())
    torch.manual_seed(4)  # random_noise=None: the same uniform draw from torch's global generator
    img_ours, eta_ours = getattr(ours, attack)(x, y, model, None, nn.CrossEntropyLoss())
    torch.testing.assert_close(eta_ours, eta_plain, rtol=0, atol=NOISE_ATOL)
    torch.testing.assert_close(img_ours, img_plain.detach(), rtol=0, atol=NOISE_ATOL)
    assert img_ours.requires_grad and img_ours.is_leaf  # as the reference returns it
    assert float(eta_ours.abs().max()) <= float(torch.tensor(EPS))
    img = img_ours.detach()
    assert float((img - x).abs().max()) <= float(torch.tensor(EPS)) + 1e-7
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    torch.testing.assert_close(img_ours.detach(), torch.clamp(x + eta_ours, 0, 1), rtol=0, atol=1e-7)


def test_model_state_left_as_given_and_sample_wise_has_no_effect():
    x, y = data(8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 100, 3))
    model.train()  # the caller's choice; the tool does not change it (nor touch parameter gradients)
    running = model[1].running_mean.clone()
    _, ours = tools(num_steps=2)
    noise = torch.zeros_like(x)
    _, eta_a = ours.min_min_attack(x, y, model, None, nn.CrossEntropyLoss(), random_noise=noise)
    _, eta_b = ours.min_min_attack(x, y, model, None, nn.CrossEntropyLoss(), random_noise=noise, sample_wise=True)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model[1].running_mean, running)  # train mode: BatchNorm did update, as in the reference
    model.eval()
    _, eta_c = ours.min_min_attack(x, y, model, None, nn.CrossEntropyLoss(), random_noise=noise)
    _, eta_d = ours.min_min_attack(x, y, model, None, nn.CrossEntropyLoss(), random_noise=noise, sample_wise=True)
    assert torch.equal(eta_c, eta_d)


def test_custom_criterion_and_classify_flag():
    x, y = data(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 3)).eval()
    model.classify = False
    calls = []

    def criterion(m, images, labels, optimizer):  # the reference's non-CE call shape (e.g. a robust loss)
        calls.append(optimizer)
        logits = m(images)
        return logits, nn.functional.cross_entropy(logits, labels)

    _, ours = tools(num_steps=3)
    noise = torch.zeros_like(x)
    _, eta_custom = ours.min_min_attack(x, y, model, "opt", criterion, random_noise=noise)
    assert calls == ["opt"] * 3 and model.classify is False  # the flag is set on the CE path only
    _, eta_ce = ours.min_min_attack(x, y, model, "opt", nn.CrossEntropyLoss(), random_noise=noise)
    assert model.classify is True
    torch.testing.assert_close(eta_custom, eta_ce, rtol=0, atol=0)


def test_random_noise_and_seeding_follow_the_reference():
    tool = PerturbationTool(seed=7, epsilon=EPS, device="cpu")
    drawn = np.random.rand(3)
    np.random.seed(7)
    assert np.array_equal(drawn, np.random.rand(3))  # the constructor seeded NumPy's global generator
    torch.manual_seed(1)
    noise = tool.random_noise(noise_shape=[10, 3, 8, 8])
    torch.manual_seed(1)
    expected = PlainPerturbationTool(EPS, 1, STEP).random_noise([10, 3, 8, 8])
    assert noise.shape == (10, 3, 8, 8) and noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected) and float(noise.abs().max()) <= EPS


def test_patch_placement():
    tool = PerturbationTool(seed=0, device="cpu")
    full = torch.rand(1, 8, 8)
    cords, image = tool._patch_noise_extend_to_img(full, image_size=[1, 8, 8])
    assert cords == (0, 8, 0, 8) and torch.equal(image, full)
    patch = torch.ones(3, 4, 4)
    cords, image = tool._patch_noise_extend_to_img(patch, image_size=[3, 10, 10], patch_location="center")
    assert cords == (3, 7, 3, 7) and float(image.sum()) == 48 and float(image[:, 3:7, 3:7].sum()) == 48
    np.random.seed(0)
    (x1, x2, y1, y2), image = tool._patch_noise_extend_to_img(np.ones((3, 5, 5)), [3, 10, 10], "random")
    assert (x2 - x1, y2 - y1) == (5, 5) and 0 <= x1 and x2 <= 10 and 0 <= y1 and y2 <= 10
    assert float(image.sum()) == 75  # an odd-sized NumPy patch is placed whole
    with pytest.raises(ValueError, match="does not fit"):
        tool._patch_noise_extend_to_img(torch.ones(3, 12, 12), [3, 10, 10])


def test_poison_uint8_keeps_negative_noise():
    data_u8 = np.full((4, 6, 6, 3), 100, dtype=np.uint8)  # N x H x W x C, torchvision CIFAR's layout
    noise = torch.zeros(4, 3, 6, 6)
    noise[:, :, :3] = -4 / 255  # the reference's noise.mul(255).clamp(0, 255) would drop these
    noise[:, :, 3:] = 3 / 255
    noise[0, 0, 0, 0] = 0.2 / 255  # below half a level: still one level, not erased
    out = poison_uint8(data_u8, noise, EPS)
    assert out.dtype == np.uint8 and out.shape == data_u8.shape
    expected = np.full_like(data_u8, 96)
    expected[:, 3:] = 103
    expected[0, 0, 0, 0] = 101
    assert np.array_equal(out, expected)
    assert out[0, 0, 0, 0] == 101 and int(np.abs(out.astype(int) - 100).max()) <= 8


def test_poison_uint8_class_wise_and_budget_on_the_bytes():
    g = torch.Generator().manual_seed(0)
    data_u8 = (torch.rand((10, 8, 8), generator=g) * 255).to(torch.uint8).numpy()  # gray N x H x W
    labels = np.array([0, 1, 2] * 3 + [0])
    class_noise = (torch.rand((3, 1, 8, 8), generator=g) * 2 - 1) * 0.2  # beyond the budget on purpose
    out = poison_uint8(data_u8, class_noise, EPS, labels=labels)
    diff = out.astype(int) - data_u8.astype(int)
    assert np.abs(diff).max() <= 8 and out.shape == data_u8.shape
    inside = ((data_u8[[0, 3]] > 10) & (data_u8[[0, 3]] < 245)).all(0)  # away from the clip at 0 and 255
    assert inside.sum() > 20
    assert np.array_equal(diff[0][inside], diff[3][inside])  # images 0 and 3 share class 0's pattern
    assert (diff[0][inside] < 0).any() and (diff[0][inside] > 0).any()
    with pytest.raises(ValueError, match="class-wise noise needs labels"):
        poison_uint8(data_u8, class_noise, EPS)
    with pytest.raises(ValueError, match="no row for some label"):
        poison_uint8(data_u8, class_noise, EPS, labels=labels + 1)
    with pytest.raises(ValueError, match="data must be uint8"):
        poison_uint8(data_u8.astype(np.float32), class_noise, EPS, labels=labels)


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilon": 0}, "epsilon must be in (0, 1]"),
    ({"epsilon": 8}, "epsilon must be in (0, 1]"),
    ({"step_size": -0.1}, "step_size must be in (0, 1]"),
    ({"num_steps": 0}, "num_steps must be >= 1"),
])
def test_bad_construction_raises_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        PerturbationTool(device="cpu", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case, message", [
    ("images", "images must be in [0, 1]"),
    ("noise_shape", "random_noise has shape"),
    ("noise_nan", "random_noise contains NaN or inf"),
    ("labels", "labels must have shape (4,)"),
])
def test_bad_call_raises_one_line(case, message):
    x, y = data(4)
    noise = torch.zeros_like(x)
    if case == "images":
        x = x * 255  # uint8-range floats: the usual mistake
    elif case == "noise_shape":
        noise = noise[:2]
    elif case == "noise_nan":
        noise[0, 0, 0, 0] = float("nan")
    elif case == "labels":
        y = y[:1]
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(ValueError) as info:
        tools()[1].min_max_attack(x, y, model, None, nn.CrossEntropyLoss(), random_noise=noise)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_docstring_examples_run():
    assert doctest.testmod(compat).failed == 0


def test_python_dash_m_salm_fast_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "salm_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: salm-fast" in done.stdout and "protect" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "salm_fast", "no-such-command"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
