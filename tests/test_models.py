"""The victim model zoo: shapes, sizes, trainability, deterministic init."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salm_fast.models import MODELS, build_model

# Expected parameter counts (millions) for 3 input channels and 10 classes, with a 10%
# tolerance: these pin the architectures to their published sizes (CIFAR-style heads).
EXPECTED_MPARAMS = {
    "cnn": 0.24, "resnet18": 11.17, "resnet50": 23.52, "vgg11": 9.23, "vgg16": 14.73,
    "densenet121": 6.96, "mobilenetv2": 2.24, "vit": 1.80,
}




def test_registry_lists_every_model_with_a_description():
    assert set(MODELS) == set(EXPECTED_MPARAMS)
    assert all(spec.description for spec in MODELS.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_channels_and_classes(name):
    for in_channels in (1, 3):
        for num_classes in (2, 5):
            torch.manual_seed(0)
            model = build_model(name, in_channels, num_classes, 28).eval()
            with torch.no_grad():
                out = model(torch.rand(2, in_channels, 28, 28))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,size", [("resnet18", 224), ("resnet18", 64), ("vit", 64), ("vgg11", 64),
                                       ("mobilenetv2", 96)])
def test_larger_images(name, size):
    model = build_model(name, 3, 4, size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 4)


def test_stem_follows_image_size():
    small, large = build_model("resnet18", 1, 2, 28), build_model("resnet18", 1, 2, 224)
    small_convs = [m for m in small.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    large_convs = [m for m in large.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert small_convs[0].kernel_size == (3, 3) and small_convs[0].stride == (1, 1)
    assert large_convs[0].kernel_size == (7, 7) and large_convs[0].stride == (2, 2)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.stem.modules())
    assert build_model("vit", 1, 2, 28).patch == 4 and build_model("vit", 1, 2, 224).patch == 16


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_architecture(name):
    n = sum(p.numel() for p in build_model(name, 3, 10, 28).parameters())
    assert abs(n / 1e6 - EXPECTED_MPARAMS[name]) <= 0.1 * EXPECTED_MPARAMS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_few_steps_reduce_the_loss(name):
    torch.manual_seed(1)
    model = build_model(name, 1, 2, 28).train()
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    assert final < losses[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_is_deterministic_from_the_seed(name):
    x = torch.rand(2, 3, 28, 28)
    outs, states = [], []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        model = build_model(name, 3, 3, 28).eval()
        with torch.no_grad():
            outs.append(model(x))
        states.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(states[0], states[1]) and torch.equal(outs[0], outs[1])
    assert not torch.equal(states[0], states[2])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet19", 1, 2)
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn", 1, 2, image_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", 1, 1)
    with pytest.raises(ValueError, match="28 px"):
        build_model("vit", 1, 2, 28)(torch.rand(1, 1, 32, 32))
