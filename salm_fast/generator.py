"""The noise generator: a small fully convolutional network, (image, label) -> perturbation.

Output before the mask: ``eps * tanh(code[y] + net(planes))``.

* ``planes``: the image, one plane per class (one-hot label) and three fixed
  pixel-parity planes ((-1)^h, (-1)^w, (-1)^(h+w)). A plain convolution is
  translation-equivariant: on a flat dark background it can only emit a flat,
  brightness-like code, which a victim learns slowly. The parity planes let it write
  fine, position-locked textures.
* ``code``: an optional learnable class-wise texture (a 4 x 4 tile per class, repeated
  over the image), initialized from :func:`texture_codes`: sign patterns that stay
  distinct under the crops and flips a victim applies, so that any sparse set of
  pixels carries the class. The bi-level loop then refines the tile and the
  image-dependent residual ``net`` (zero-initialized, so training starts from the code).

Being amortized, a trained generator protects new images in one forward pass.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE = 4  # texture period in pixels (lcm of the periods 1, 2, 4 used by the codes)
CODE_SCALE = 3.0  # tanh(3) = 0.995: the initial code sits at the budget's edge


def parity_planes(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    r = 1.0 - 2.0 * (torch.arange(h, device=device) % 2).to(dtype)
    c = 1.0 - 2.0 * (torch.arange(w, device=device) % 2).to(dtype)
    rr, cc = r[:, None].expand(h, w), c[None, :].expand(h, w)
    return torch.stack([rr, cc, rr * cc])


def _wave(period: int) -> Tensor:
    """One period-4 row of a sign wave: period 1 = flat, 2 = +-+-, 4 = ++--."""
    i = torch.arange(TILE)
    return {1: torch.ones(TILE), 2: 1.0 - 2.0 * (i % 2), 4: 1.0 - 2.0 * ((i // 2) % 2)}[period].float()


def texture_codes(n_classes: int, channels: int) -> Tensor:
    """``n_classes x channels x 4 x 4`` sign tiles, one texture per class.

    Products of a row wave and a column wave of period 1, 2 or 4 (the all-flat one
    excluded), finest first: horizontal stripes, vertical stripes, checkerboard, then
    coarser ones. Shifting such a texture (a crop) or mirroring it (a flip) gives a
    shifted copy of the same texture, never another class's. Beyond the 8 products,
    flat +1 / -1, then fixed pseudo-random tiles.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    tiles = []
    for pr, pc in sorted(itertools.product((1, 2, 4), repeat=2), key=lambda p: (max(p), p[0] * p[1], -p[0])):
        if (pr, pc) != (1, 1):
            tiles.append(_wave(pr)[:, None] * _wave(pc)[None, :])
    tiles += [torch.ones(TILE, TILE), -torch.ones(TILE, TILE)]
    gen = torch.Generator().manual_seed(1234)
    while len(tiles) < n_classes:
        tiles.append(torch.where(torch.rand(TILE, TILE, generator=gen) < 0.5, -1.0, 1.0))
    return torch.stack(tiles[:n_classes]).unsqueeze(1).expand(n_classes, channels, TILE, TILE).clone()


class NoiseGenerator(nn.Module):
    def __init__(self, channels: int, n_classes: int, eps: float, *, width: int = 32,
                 class_conditional: bool = True, parity: bool = True, code: bool = True):
        super().__init__()
        self.channels, self.n_classes, self.eps = channels, n_classes, float(eps)
        self.class_conditional, self.parity = class_conditional, parity
        if code and not class_conditional:
            raise ValueError("a class-wise texture code needs a class-conditional generator")
        self.code = nn.Parameter(texture_codes(n_classes, channels) * CODE_SCALE) if code else None
        c_in = channels + (n_classes if class_conditional else 0) + (3 if parity else 0)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1),
        )
        if code:  # start exactly at the code; the residual grows only where it helps
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        n, _, h, w = x.shape
        planes = [x]
        if self.class_conditional:
            onehot = F.one_hot(y, self.n_classes).to(x.dtype)
            planes.append(onehot[:, :, None, None].expand(n, self.n_classes, h, w))
        if self.parity:
            planes.append(parity_planes(h, w, x.device, x.dtype).unsqueeze(0).expand(n, 3, h, w))
        raw = self.net(torch.cat(planes, dim=1)).to(x.dtype)  # fp32 out of a bf16 autocast region
        if self.code is not None:
            reps = (math.ceil(h / TILE), math.ceil(w / TILE))
            raw = raw + self.code.repeat(1, 1, *reps)[:, :, :h, :w][y]
        return self.eps * torch.tanh(raw)
