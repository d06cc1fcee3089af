"""One-Pixel Shortcut (OPS): one pixel per class, set to one extreme colour in every image of the class.

Wu et al., "One-Pixel Shortcut: on the Learning Preference of Deep Neural Networks",
ICLR 2023. A model-free availability attack: the victim learns "pixel p_c has colour v_c"
before the anatomy.

Search (deterministic; the seed plays no part). Colours are the 2^C corners of the colour
cube, v in {0, 1}^C (black/white for gray images, 8 colours for RGB). For class c, position
p and colour v, with d_i = mean over channels of |x_i[:, p] - v| for the class's images i:

    score(c, p, v) = mean_i d_i - std_i d_i        (population std over the class's images)

i.e. pixels that the change moves far *and* by the same amount in every image of the class
(stable, far from v). Assignment is greedy over all classes at once: take the highest
(class, position, colour) score, fix that class, retire that position for every other class,
repeat; so no two classes share a position (hence never a (position, colour) pair). Ties go
to the lower class, then colour index (v's bits, channel 0 most significant), then flat
position h * W + w. Classes without images get no pixel.

Perturbation: image i of class c gets ``delta[:, p_c] = v_c - x_i[:, p_c]`` and 0 elsewhere,
so the released pixel is exactly v_c (bytes 0 or 255 per channel).

Budget: L0 = 1 pixel per image (``masked = True``, k fixed at 1: passing another k is an
error); L-inf is the full range, so eps is fixed at 1.0 (the default; any other eps is an
error, since an L-inf-clipped one-pixel change is no longer this attack). An image whose
pixel already has the colour is released unchanged. Shapes: ``x`` N x C x H x W in [0, 1],
``y`` N int64; ``delta`` and ``mask`` N x C x H x W and N x 1 x H x W (one 1 per image).

Example::

    ops_ = OnePixelShortcut()                  # eps 1.0, k 1
    p = ops_.fit(x, y, n_classes)              # p.mask: one pixel per image, p.info["positions"]
    salm_fast.protect("synthetic", "ops", out="out/ops")
"""
from __future__ import annotations

from numbers import Integral
import torch
from torch import Tensor

from .. import ops
from .base import Method, Protection

_CHUNK_ELEMS = 1 << 22  # floats in one images x colours x channels x pixels temporary of the search
CRITERION = "argmax mean_i(d) - std_i(d), d = mean_ch |x_i[:, p] - v|; greedy over classes, distinct positions"


def colour_cube(channels: int) -> Tensor:
    """The 2^C colours {0, 1}^C as a 2^C x C float tensor (channel 0 is the most significant bit)."""
    v = torch.arange(2 ** channels)
    bits = [(v >> (channels - 1 - c)) & 1 for c in range(channels)]
    return torch.stack(bits, dim=1).double()


class OnePixelShortcut(Method):
    name = "ops"
    paper = ("Wu et al., One-Pixel Shortcut: on the Learning Preference of Deep Neural Networks, ICLR 2023 "
             "(one-pixel shortcut)")
    norm = "L0"
    masked = True
    default_eps = 1.0
    default_k = 1

    def __init__(self, eps: float | None = None, *, seed: int = 0, k: int | float | None = None):
        if k is not None and not (isinstance(k, Integral) and not isinstance(k, bool) and k == 1):
            raise ValueError(f"ops: k is fixed at 1 pixel per image (the one-pixel shortcut); got k={k!r}")
        super().__init__(eps, seed=seed, k=self.default_k)
        if self.eps != 1.0:
            raise ValueError(f"ops: eps is fixed at 1.0 (the pixel takes an extreme colour: the full range); "
                             f"got eps={self.eps!r}. Leave eps unset (protect/--eps default) or pass 1.0")

    def check_data(self, image_shape, n_classes):
        super().check_data(image_shape, n_classes)
        if n_classes > image_shape[0] * image_shape[1]:
            raise ValueError(f"ops: {n_classes} classes need as many distinct pixels; images have only "
                             f"{image_shape[0] * image_shape[1]}")

    # ------------------------------------------------------------------ search
    @staticmethod
    def scores(x: Tensor, y: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
        """score[c, v, p] = mean - std over class c's images of d = mean_ch |x[:, p] - colour v|
        (n_classes x 2^C x H*W, float64; -inf for classes without images), and the images per class."""
        n, c, h, w = x.shape
        colours = colour_cube(c)
        nv, hw = len(colours), h * w
        s1 = torch.zeros((n_classes, nv, hw), dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        chunk = max(1, _CHUNK_ELEMS // (nv * hw * c))
        for start in range(0, n, chunk):
            xb = x[start:start + chunk].reshape(-1, c, hw).double()
            d = (xb[:, None] - colours[None, :, :, None]).abs().mean(2)  # B x V x HW
            yb = y[start:start + chunk]
            s1.index_add_(0, yb, d)
            s2.index_add_(0, yb, d * d)
        count = torch.bincount(y, minlength=n_classes).double().view(-1, 1, 1)
        mean = s1 / count.clamp_min(1)
        std = (s2 / count.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
        score = mean - std
        score[count.view(-1) == 0] = float("-inf")
        return score, count.view(-1).long()

    @classmethod
    def search(cls, x: Tensor, y: Tensor, n_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy assignment: per class the flat pixel index (-1: no images), the colour
        (n_classes x C; 0 for classes without images) and the winning score."""
        score, count = cls.scores(x, y, n_classes)
        colours = colour_cube(x.shape[1])
        nv, hw = score.shape[1], score.shape[2]
        position = torch.full((n_classes,), -1, dtype=torch.long)
        colour = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64)
        best = torch.full((n_classes,), float("nan"), dtype=torch.float64)
        for _ in range(int((count > 0).sum())):
            flat = int(torch.argmax(score))  # the first maximum: lowest class, colour, position
            c, rest = divmod(flat, nv * hw)
            v, p = divmod(rest, hw)
            position[c], colour[c], best[c] = p, colours[v], score[c, v, p]
            score[c] = float("-inf")
            score[:, :, p] = float("-inf")
        return position, colour, best

    # ------------------------------------------------------------------ fit
    def _fit(self, x, y, n_classes, ctx):
        n, c, h, w = x.shape
        device, x, y = x.device, x.cpu(), y.cpu()  # the search is statistics over the set: on the CPU
        position, colour, best = self.search(x, y, n_classes)
        pos = position[y]  # N
        index = pos.view(n, 1, 1).expand(n, c, 1)
        current = x.reshape(n, c, h * w).gather(2, index)  # N x C x 1
        delta = torch.zeros_like(x)
        delta.view(n, c, h * w).scatter_(2, index, colour[y].to(x.dtype).unsqueeze(2) - current)
        mask = x.new_zeros((n, 1, h, w))
        mask.view(n, h * w).scatter_(1, pos.view(n, 1), 1.0)
        delta = ops.masked_linf_project(x, delta, mask, self.eps)  # a no-op safeguard: x + delta = v
        info = {
            "rounds": 0,
            "criterion": CRITERION,
            "positions": [None if p < 0 else [int(p) // w, int(p) % w] for p in position.tolist()],
            "colours": [None if p < 0 else [int(v) for v in col] for p, col in zip(position.tolist(), colour)],
            "scores": [None if p < 0 else float(s) for p, s in zip(position.tolist(), best)],
            "unchanged_images": int(((delta != 0).flatten(1).sum(1) == 0).sum()),
        }
        return Protection(delta.to(device), mask.to(device), info)
