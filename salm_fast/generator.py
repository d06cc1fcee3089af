"""The noise generator: a small fully convolutional network, (image, label) -> perturbation.

Output before the mask: ``eps * tanh(code[y] + net(planes))``.

* ``planes``: the image, one plane per class (one-hot label) and three fixed
  pixel-parity planes ((-1)^h, (-1)^w, (-1)^(h+w)). A plain convolution is
  translation-equivariant: on a flat dark background it can only emit a flat,
  brightness-like code, which a victim learns slowly. The parity planes let it write
  fine, position-locked textures.
* ``code``: an optional learnable class-wise texture, one full-size plane per class,
  initialized from :func:`keyed_texture`: a fine sign texture per class (stripes of one
  orientation, a checkerboard, ...) that any compact block of pixels carries and that
  crops and flips do not turn into another class's, with the class -> texture assignment
  and a sign per cell drawn from the release's secret seed. The code starts at
  ``code_scale`` (default 2: ``eps * tanh(2)`` = 0.96 eps, stored as the full 8/255, where
  tanh still has a gradient of 0.07, 7x that at the former 3), so the bi-level loop can move
  it; the image-dependent residual ``net`` starts at zero.

Being amortized, a trained generator protects new images in one forward pass.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE = 4  # texture period in pixels (lcm of the periods 1, 2, 4 used by the codes)
#: The initial code's pre-tanh value: tanh(2) = 0.964 of the budget (7.7 of 8 levels: stored as 8),
#: gradient 1 - 0.964^2 = 0.07 (at 3.0 the code sat at 0.995 with a gradient of 0.01, and training
#: never moved the stored bytes). BreastMNIST, CNN victim, one seed: 1.5 (stored 7/255) 0.682, 2 0.636.
CODE_SCALE = 2.0


def parity_planes(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    r = 1.0 - 2.0 * (torch.arange(h, device=device) % 2).to(dtype)
    c = 1.0 - 2.0 * (torch.arange(w, device=device) % 2).to(dtype)
    rr, cc = r[:, None].expand(h, w), c[None, :].expand(h, w)
    return torch.stack([rr, cc, rr * cc])


def _wave(period: int) -> Tensor:
    """One period-4 row of a sign wave: period 1 = flat, 2 = +-+-, 4 = ++--."""
    i = torch.arange(TILE)
    return {1: torch.ones(TILE), 2: 1.0 - 2.0 * (i % 2), 4: 1.0 - 2.0 * ((i // 2) % 2)}[period].float()


#: The code textures (``texture=``): ``fine`` (period 2 first: learned within an epoch, erased by a
#: blur or JPEG), ``coarse`` (period 4 only, no period-2 factor: a sigma-1 blur keeps ~45% of a
#: stripe) and ``block`` (flat: only the keyed sign per cell, the lowest frequency the cells allow).
TEXTURES = ("fine", "coarse", "block")


def texture_families(texture: str = "fine") -> list[list[Tensor]]:
    """The 4 x 4 sign tiles a class may get, in families tried in order. ``fine``: period 2
    (horizontal stripes, vertical stripes, checkerboard), then the products with a period-4
    wave; ``coarse``: the period-4 waves without a period-2 factor; ``block``: the flat tile.
    Shifting such a texture (a crop) or mirroring it (a flip) gives a shifted copy of the same
    texture."""
    if texture not in TEXTURES:
        raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
    if texture == "block":
        return [[torch.ones(TILE, TILE)]]
    families: dict[int, list[Tensor]] = {}
    for pr, pc in itertools.product((1, 2, 4), repeat=2):
        if (pr, pc) != (1, 1) and (texture == "fine" or 2 not in (pr, pc)):
            families.setdefault(max(pr, pc), []).append(_wave(pr)[:, None] * _wave(pc)[None, :])
    return [families[p] for p in sorted(families)]


def keyed_texture(n_classes: int, channels: int, height: int, width: int, *, seed: int, cell: int = 4,
                  texture: str = "fine") -> Tensor:
    """``n_classes x channels x height x width`` of +-1: each class's texture tiled over the image,
    its sign flipped per ``cell x cell`` block.

    Drawn from ``seed`` (the release's secret): which texture each class gets (the families of
    :func:`texture_families` shuffled one after the other, then random sign tiles for many
    classes; ``block``: the flat tile for every class) and the sign of every cell (``block`` with two
    classes: the second class's signs are the first's, negated). Victims learn the period-2
    textures within an epoch; a flipped cell is the same texture shifted by one pixel, which the
    victim's crops produce anyway.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
    tiles: list[Tensor] = []
    for family in texture_families(texture):
        tiles += [family[i] for i in torch.randperm(len(family), generator=gen).tolist()]
    while len(tiles) < n_classes:
        if texture == "block":  # every class flat; the cell signs tell them apart
            tiles.append(tiles[0])
            continue
        tiles.append(torch.where(torch.rand(TILE, TILE, generator=gen) < 0.5, -1.0, 1.0))
    reps = (-(-height // TILE), -(-width // TILE))
    code = torch.stack([t.repeat(*reps)[:height, :width] for t in tiles[:n_classes]])  # G x H x W
    cells = (-(-height // cell), -(-width // cell))
    signs = torch.where(torch.rand(n_classes, *cells, generator=gen) < 0.5, -1.0, 1.0)
    if texture == "block" and n_classes == 2:  # two flat codes: as far apart as they can be
        signs[1] = -signs[0]
    signs = signs.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :height, :width]
    return (code * signs).unsqueeze(1).expand(n_classes, channels, height, width).contiguous()


class NoiseGenerator(nn.Module):
    """``code``: None (no code; the plain generator) or an ``n_classes x channels x H x W`` texture
    (e.g. :func:`keyed_texture`), learned from ``code_scale * code``; images must then be H x W."""

    def __init__(self, channels: int, n_classes: int, eps: float, *, width: int = 32,
                 class_conditional: bool = True, parity: bool = True, code: Tensor | None = None,
                 code_scale: float = CODE_SCALE):
        super().__init__()
        self.channels, self.n_classes, self.eps = channels, n_classes, float(eps)
        self.class_conditional, self.parity, self.width = class_conditional, parity, width
        if code is not None:
            if not class_conditional:
                raise ValueError("a class-wise texture code needs a class-conditional generator")
            if code.dim() != 4 or tuple(code.shape[:2]) != (n_classes, channels):
                raise ValueError(f"code must be n_classes x channels x H x W = ({n_classes}, {channels}, H, W), "
                                 f"got {tuple(code.shape)}")
        self.code = nn.Parameter(code.float() * code_scale) if code is not None else None
        c_in = channels + (n_classes if class_conditional else 0) + (3 if parity else 0)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1),
        )
        if code is not None:  # start exactly at the code; the residual grows only where it helps
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
            if tuple(self.code.shape[2:]) != (h, w):
                raise ValueError(f"the generator's code is {tuple(self.code.shape[2:])} pixels; images are "
                                 f"{(h, w)}")
            raw = raw + self.code[y]
        return self.eps * torch.tanh(raw)
