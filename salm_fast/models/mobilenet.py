"""MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks, width 1.0.

Strides for small images (<= 64 px), as in the common CIFAR adaptation: the stem conv has
stride 1 and the 24-channel stage stride 1, so 28 px reaches the last stage at 4x4 (total
stride 8) instead of 1x1 (total stride 32, used for larger images).
"""
from __future__ import annotations

from torch import Tensor, nn

from ._blocks import conv_bn_relu, is_small

# (expansion t, channels c, repeats n, stride s) of the paper's Table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu(c_in, hidden, 1, act=nn.ReLU6))
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.2):
        super().__init__()
        small = is_small(image_size)
        layers: list[nn.Module] = [conv_bn_relu(in_channels, 32, 3, 1 if small else 2, act=nn.ReLU6)]
        c = 32
        for i, (t, c_out, n, s) in enumerate(SETTINGS):
            if small and i == 1:
                s = 1
            for j in range(n):
                layers.append(InvertedResidual(c, c_out, s if j == 0 else 1, t))
                c = c_out
        layers += [conv_bn_relu(c, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def mobilenetv2(in_channels: int, num_classes: int, image_size: int = 28) -> MobileNetV2:
    return MobileNetV2(in_channels, num_classes, image_size)


__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]
