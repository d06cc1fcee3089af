"""VGG-11 / VGG-16 with BatchNorm (Simonyan & Zisserman 2015), adapted to small images.

Adaptations (documented because they change the architecture):
- a 2x2 max-pool is skipped once the feature map is already 1 px, so 28 px works
  (28 -> 14 -> 7 -> 3 -> 1, the fifth pool is dropped);
- the head is global average pooling + one linear layer (the CIFAR variant), not the
  ImageNet 4096-4096 MLP (120 M parameters, untrainable on a CPU); for large images the
  conv features are averaged over the remaining spatial grid.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._blocks import init_conv_bn_linear

CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    def __init__(self, config: tuple[int | str, ...], in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in config:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))


def vgg11(in_channels: int, num_classes: int, image_size: int = 28) -> VGG:
    return VGG(CONFIGS["vgg11"], in_channels, num_classes, image_size)


def vgg16(in_channels: int, num_classes: int, image_size: int = 28) -> VGG:
    return VGG(CONFIGS["vgg16"], in_channels, num_classes, image_size)


__all__ = ["VGG", "vgg11", "vgg16"]
