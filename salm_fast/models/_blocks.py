"""Small building blocks shared by the zoo: conv-BN-ReLU, stems, input checks."""
from __future__ import annotations

from torch import nn

#: Images at most this size (px) get a CIFAR-style stem (3x3 stride 1, no max-pool);
#: larger ones the ImageNet stem (7x7 stride 2 + 3x3/2 max-pool).
SMALL_IMAGE_MAX_PX = 64


def is_small(image_size: int) -> bool:
    return image_size <= SMALL_IMAGE_MAX_PX


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        act(inplace=True),
    )


def stem(c_in: int, c_out: int, image_size: int) -> nn.Sequential:
    """CIFAR-style stem for small images, ImageNet-style (7x7/2 + max-pool /2) for large ones."""
    if is_small(image_size):
        return conv_bn_relu(c_in, c_out, 3, 1)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def init_conv_bn_linear(module: nn.Module) -> None:
    """He init for convs, unit BN, small-normal linear heads: the usual ResNet/VGG recipe."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
