"""The surrogate classifier of the protector: clean pre-training and saliency masks.

SALM's phase 1 ("important-pixel acquisition"): a surrogate briefly trained on the
clean data gives per-pixel input gradients of the cross-entropy; the fused
``saliency_topk_mask`` op turns them into a per-image top-K mask without an
N x H x W saliency temporary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .models import MODELS, build_model
from .models.cnn import SmallCNN
from .runtime import normalize


#: The protector's default surrogate: the zoo's 4-conv CNN at half width (4x cheaper);
#: deliberately not any victim's architecture, so that evaluations measure transfer.
DEFAULT_SURROGATE = "cnn-half"
SURROGATES = ("cnn-half", *MODELS)


def build_surrogate(arch: str, channels: int, n_classes: int, image_size: int) -> nn.Module:
    if arch == "cnn-half":
        model: nn.Module = SmallCNN(channels, n_classes, width=16)
    elif arch in MODELS:
        model = build_model(arch, channels, n_classes, image_size)
    else:
        raise ValueError(f"unknown surrogate {arch!r}; choose one of {', '.join(SURROGATES)}")
    return model.to(memory_format=torch.channels_last)


def logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(normalize(x).contiguous(memory_format=torch.channels_last))


def batches(n: int, batch_size: int, gen: torch.Generator | None = None, shuffle: bool = True):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_clean(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                gen: torch.Generator) -> float:
    """Phase 1: a short Adam run on clean data; returns the last epoch's training accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    correct = 0
    for _ in range(epochs):
        correct = 0
        for idx in batches(len(x), batch_size, gen):
            out = logits(model, x[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == y[idx]).sum())
    return correct / max(1, len(x))


def saliency_mask(model: nn.Module, x: Tensor, y: Tensor, k: int | float, *, p: int = 1, window: int = 1,
                  batch_size: int = 512, backend: str | None = None) -> Tensor:
    """Per-image top-K mask (N x 1 x H x W) of the surrogate's input-gradient saliency.

    ``window`` > 1 ranks pixels by their *local* saliency, the mean over a window x window
    neighbourhood: the mask then covers compact important regions rather than isolated
    pixels, and a texture written there stays readable by a victim's small filters.
    ``window`` = 1 is the fused gradient -> top-K kernel.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"saliency window must be an odd integer >= 1, got {window}")
    mask = x.new_empty((x.shape[0], 1, x.shape[2], x.shape[3]))
    model.eval()
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        xb = x[sl].clone().requires_grad_(True)
        loss = F.cross_entropy(logits(model, xb), y[sl], reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
        if window == 1:
            ops.saliency_topk_mask(g, k, p, out=mask[sl], backend=backend)
        else:
            s = ops.grad_magnitude(g, p, backend=backend).unsqueeze(1)
            s = F.avg_pool2d(s, window, stride=1, padding=window // 2, count_include_pad=False)
            ops.topk_mask(s[:, 0], k, out=mask[sl], backend=backend)
    return mask

