"""The surrogate classifier of the protector: clean pre-training and saliency masks.

SALM's phase 1 ("important-pixel acquisition"): a surrogate briefly trained on the
clean data gives per-pixel input gradients of the cross-entropy; the fused
``saliency_topk_mask`` op turns them into a per-image top-K mask without an
N x H x W saliency temporary.

Images come as a float tensor or an :class:`~salm_fast.data.view.ImageView` (float batches
made from uint8 on its device); the model must already be on that device. Masks are uint8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .data.view import pass_batch
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


def train_clean(model: nn.Module, x, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                gen: torch.Generator) -> float:
    """Phase 1: a short Adam run on clean data; returns the last epoch's training accuracy.

    Many processes (``torchrun``; ``x`` is this rank's shard): every rank takes as many steps per
    epoch as one process would over all images, each on its share of the batch, with the gradients
    (and BatchNorm statistics) averaged over the ranks before each step (:mod:`salm_fast.distributed`);
    the model starts and stays the same on every rank, and the accuracy is over all images."""
    from . import distributed as D

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    many = D.initialized()
    total = int(D.all_reduce_sum(torch.tensor([len(x)])).item()) if many else len(x)
    D.broadcast_module(model)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)  # summed on the device: one sync per epoch
    for _ in range(epochs):
        correct.zero_()
        if many:  # the same number of steps on every rank; a step may find a rank without images
            order = torch.randperm(len(x), generator=gen)
            steps = torch.tensor_split(order, math.ceil(total / batch_size))
        else:
            steps = batches(len(x), batch_size, gen)
        for idx in steps:
            opt.zero_grad(set_to_none=True)
            if len(idx):
                out = logits(model, x[idx])
                loss = F.cross_entropy(out, y[idx])
                loss.backward()
                correct += (out.argmax(1) == y[idx]).sum()
            if many:
                D.average_gradients(model.parameters(), len(idx), buffers=model.buffers())
            opt.step()
    if many:
        return int(D.all_reduce_sum(correct.cpu().reshape(1)).item()) / max(1, total)
    return int(correct) / max(1, len(x))


def input_grads(model: nn.Module, x, y: Tensor, batch_size: int = 512):
    """Yield ``(slice, dL/dx)`` batch by batch: the gradient of the summed cross-entropy of the model in
    eval mode w.r.t. each image (each image's gradient is its own). ``batch_size`` shrinks for large
    images (:func:`~salm_fast.data.view.pass_batch`)."""
    n = len(x)
    batch_size = pass_batch(x.shape, batch_size)
    model.eval()
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        xb = x[sl].clone().requires_grad_(True)
        loss = F.cross_entropy(logits(model, xb), y[sl], reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
        yield sl, g


def saliency_mask(model: nn.Module, x, y: Tensor, k: int | float, *, p: int = 1, window: int = 1,
                  batch_size: int = 512, backend: str | None = None, exclude: Tensor | None = None) -> Tensor:
    """Per-image top-K mask (N x 1 x H x W uint8, on the images' device) of the surrogate's
    input-gradient saliency. ``batch_size`` shrinks for large images (:func:`~salm_fast.data.view.pass_batch`).

    ``window`` > 1 ranks pixels by their *local* saliency, the mean over a window x window
    neighbourhood: the mask then covers compact important regions rather than isolated
    pixels, and a texture written there stays readable by a victim's small filters.
    ``window`` = 1 is the fused gradient -> top-K kernel. ``exclude`` (N x 1 x H x W, nonzero = taken)
    marks pixels that are never chosen (they rank below every other pixel).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"saliency window must be an odd integer >= 1, got {window}")
    mask = torch.empty((len(x), 1, x.shape[2], x.shape[3]), dtype=torch.uint8, device=x.device)
    for sl, g in input_grads(model, x, y, batch_size):
        if window == 1 and exclude is None:
            mask[sl] = ops.saliency_topk_mask(g, k, p, backend=backend)
        else:
            s = ops.grad_magnitude(g, p, backend=backend).unsqueeze(1)
            if window > 1:
                s = F.avg_pool2d(s, window, stride=1, padding=window // 2, count_include_pad=False)
            if exclude is not None:  # saliency is >= 0: the excluded pixels rank last
                s = s.masked_fill(exclude[sl].to(s.device) > 0, -1.0)
            mask[sl] = ops.topk_mask(s[:, 0], k, backend=backend)
    return mask



def saliency_sums(model: nn.Module, x, y: Tensor, groups: Tensor, n_groups: int, *, p: int = 1,
                  batch_size: int = 512, backend: str | None = None) -> Tensor:
    """``n_groups x H x W`` float64: per group, the sum over its images of each image's saliency map
    (input-gradient magnitude) normalized to sum 1, so every image has one vote whatever its contrast.

    ``groups``: N ints in [0, n_groups) (the labels for class masks, zeros for one global mask).
    Summed over the ranks of a ``torchrun`` job (:func:`salm_fast.distributed.all_reduce_sum`), so
    every rank ranks the same totals.
    """
    from .distributed import all_reduce_sum

    h, w = x.shape[2], x.shape[3]
    total = torch.zeros((n_groups, h * w), dtype=torch.float64, device=y.device)
    for sl, g in input_grads(model, x, y, batch_size):
        s = ops.grad_magnitude(g, p, backend=backend).flatten(1).double()
        s = s / s.sum(1, keepdim=True).clamp_min(1e-30)
        total.index_add_(0, groups[sl].to(total.device), s)
    return all_reduce_sum(total).view(n_groups, h, w)


def block_mask(scores: Tensor, k: int, cell: int) -> Tensor:
    """``G x 1 x H x W`` uint8: per row of ``scores`` (G x H x W), the ``k // cell**2`` whole
    ``cell x cell`` blocks of the grid anchored at (0, 0) with the largest summed score (ties: the
    first in row-major order). Blocks that would cross the bottom or right edge are not candidates.
    ``k // cell**2`` must be >= 1 and at most the number of blocks."""
    g, h, w = scores.shape
    rows, cols = h // cell, w // cell
    n_blocks = k // (cell * cell)
    if not 1 <= n_blocks <= rows * cols:
        raise ValueError(f"k = {k} pixels makes {n_blocks} blocks of {cell} x {cell}; "
                         f"1 to {rows * cols} fit in {h} x {w}")
    cells = scores[:, :rows * cell, :cols * cell].reshape(g, rows, cell, cols, cell).sum((2, 4)).flatten(1)
    order = torch.sort(cells.cpu(), dim=1, descending=True, stable=True).indices[:, :n_blocks]
    chosen = torch.zeros((g, rows * cols), dtype=torch.uint8)
    chosen.scatter_(1, order, 1)
    mask = torch.zeros((g, 1, h, w), dtype=torch.uint8)
    mask[:, 0, :rows * cell, :cols * cell] = (chosen.view(g, rows, 1, cols, 1)
                                              .expand(g, rows, cell, cols, cell).reshape(g, rows * cell, cols * cell))
    return mask.to(scores.device)
