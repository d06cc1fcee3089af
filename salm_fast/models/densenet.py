"""DenseNet-121 (Huang et al. 2017): growth 32, blocks (6, 12, 24, 16), BN-bottleneck x4,
compression 0.5. Small images (<= 64 px) get a 3x3 stride-1 stem of 2*growth channels and
no max-pool (so 28 px goes 28 -> 14 -> 7 -> 3 through the three transitions); larger ones
the ImageNet stem.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._blocks import init_conv_bn_linear, stem


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bn_size: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
            nn.Conv2d(c_in, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def _transition(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], in_channels: int, num_classes: int, image_size: int,
                 growth: int = 32, bn_size: int = 4, compression: float = 0.5):
        super().__init__()
        c = 2 * growth
        layers: list[nn.Module] = [stem(in_channels, c, image_size)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth, bn_size))
                c += growth
            if i < len(blocks) - 1:
                c_out = int(c * compression)
                layers.append(_transition(c, c_out))
                c = c_out
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def densenet121(in_channels: int, num_classes: int, image_size: int = 28) -> DenseNet:
    return DenseNet((6, 12, 24, 16), in_channels, num_classes, image_size)


__all__ = ["DenseNet", "densenet121"]
