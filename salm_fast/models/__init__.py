"""The victim model zoo: architectures an unauthorized trainer would pick, written here
because torchvision has no CPU build in this project's environment.

>>> from salm_fast.models import build_model, MODELS
>>> model = build_model("resnet18", in_channels=1, num_classes=2, image_size=28)
>>> sorted(MODELS)[:3]
['cnn', 'densenet121', 'mobilenetv2']

Every model takes N x C x H x W float input (already normalized; see
``salm_fast.victims.train``) and returns N x num_classes logits. Weights are initialized from
torch's global RNG, so ``torch.manual_seed(s)`` before ``build_model`` fixes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .cnn import cnn
from .densenet import densenet121
from .mobilenet import mobilenetv2
from .resnet import resnet18, resnet50
from .vgg import vgg11, vgg16
from .vit import vit

#: Inclusive range of image sizes (px) the zoo is built and tested for.
MIN_IMAGE_PX, MAX_IMAGE_PX = 28, 224


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: the constructor ``(in_channels, num_classes, image_size) -> nn.Module``
    and a one-line description."""

    build: Callable[[int, int, int], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(cnn, "small fast 4-conv CNN (32-64-128-128, BN, global pool), 0.24 M params; tests, quick runs"),
    "resnet18": ModelSpec(resnet18, "ResNet-18; CIFAR stem (3x3/1, no max-pool) to 64 px, ImageNet stem above; 11 M"),
    "resnet50": ModelSpec(resnet50, "ResNet-50 (bottleneck blocks), same stems as resnet18; 23.5 M params"),
    "vgg11": ModelSpec(vgg11, "VGG-11 with BN; pools skipped at 1 px, global-pool + linear head; 9 M params"),
    "vgg16": ModelSpec(vgg16, "VGG-16 with BN; pools skipped at 1 px, global-pool + linear head; 15 M params"),
    "densenet121": ModelSpec(densenet121, "DenseNet-121 (growth 32); CIFAR stem up to 64 px; 7 M params"),
    "mobilenetv2": ModelSpec(mobilenetv2, "MobileNetV2 (width 1.0); stem and stage-2 stride 1 up to 64 px; 2.2 M"),
    "vit": ModelSpec(vit, "small ViT: patch 4 px (<=32 px), 8 (<=64), 16 above; dim 192, depth 6, 3 heads; 1.8 M"),
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int = 28) -> nn.Module:
    """Build zoo model ``name`` for ``in_channels``-channel, ``image_size`` px images and
    ``num_classes`` classes. Raises ValueError on an unknown name or bad sizes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if int(in_channels) < 1 or int(num_classes) < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    if not MIN_IMAGE_PX <= int(image_size) <= MAX_IMAGE_PX:
        raise ValueError(f"image_size must be in [{MIN_IMAGE_PX}, {MAX_IMAGE_PX}] px, got {image_size}")
    return MODELS[name].build(int(in_channels), int(num_classes), int(image_size))


__all__ = ["MAX_IMAGE_PX", "MIN_IMAGE_PX", "MODELS", "ModelSpec", "build_model"]
