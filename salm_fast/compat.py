"""The call shape of the public unlearnable-examples code, on the fused ops: swap one import.

The reference implementation of error-minimizing noise (Huang et al., "Unlearnable Examples:
Making Personal Data Unexploitable", ICLR 2021) and the many code bases built on it drive the
noise search through a ``PerturbationTool``. Code written against it changes one line::

    from toolbox import PerturbationTool            # before
    from salm_fast.compat import PerturbationTool   # after: same calls, same numbers

and its PGD steps run on :func:`salm_fast.ops.pgd_step` / :func:`salm_fast.ops.masked_linf_project`.
Same numbers means: each step agrees with the reference's to float rounding (the fused step works on
the perturbation, the reference on the perturbed image: ~1e-8 apart); over many steps, sign() can turn
such a difference at a near-zero gradient into a whole step, just as running the reference itself with
another thread count does (``python -m bench compat`` measures both).
What the tool does (the reference's semantics, kept):

* ``PerturbationTool(seed=0, epsilon=8/255, num_steps=20, step_size=2/255)`` seeds NumPy's
  global generator with ``seed`` (the reference's random patch placement draws from it);
* ``random_noise(noise_shape)``: uniform noise in [-epsilon, epsilon], drawn in float32 on
  the CPU from torch's global generator, then moved to the tool's device;
* ``min_min_attack(images, labels, model, optimizer, criterion, random_noise=None,
  sample_wise=False)`` -> ``(perturb_img, eta)``: start from ``clamp(images + random_noise,
  0, 1)`` (a fresh uniform draw shaped like ``images`` when ``random_noise`` is None), then
  ``num_steps`` signed-gradient steps of ``step_size`` that lower the loss, each projected
  to the L-inf ball of ``epsilon`` around ``images`` and to [0, 1]. ``eta`` is the last
  step's perturbation clipped to [-epsilon, epsilon] only (as the reference returns it: it
  may point outside [0, 1] where an image is saturated; sample-wise code stores it per
  image, class-wise code averages it per class); ``perturb_img = clamp(images + eta, 0, 1)``
  (a leaf tensor with ``requires_grad=True``, as returned by the reference);
* ``min_max_attack(...)``: the same steps raising the loss;
* ``criterion``: a ``torch.nn.CrossEntropyLoss`` is called as ``criterion(model(x), labels)``
  (and ``model.classify`` is set to True first by ``min_min_attack`` where the model has
  that attribute); any other criterion as ``logits, loss = criterion(model, x, labels,
  optimizer)``; ``optimizer`` is used for nothing else;
* ``sample_wise`` is accepted and has no effect, as in the reference: whether the noise is
  sample-wise or class-wise is decided by the caller, by how it stores ``eta``;
* the model is used as given (the caller sets eval mode and ``requires_grad``, as the
  reference's scripts do).

The one deliberate difference is on the dataset side, where the reference turns its noise into
uint8 images with ``noise.mul(255).clamp(0, 255)`` before adding it, which silently drops every
negative value, and then truncates the sum. :func:`poison_uint8` adds the signed noise and
quantizes it by the release rule of :mod:`salm_fast.release` (each nonzero value moves its pixel
by at least one level and by at most ``floor(epsilon * 255)``).

Not reproduced, with no effect on the numbers: the reference also zeroes the model's parameter
gradients at each step and leaves the last step's there (this tool never touches them; the
reference's scripts freeze the parameters during the search anyway), and it leaves the patch
empty when ``_patch_noise_extend_to_img`` gets a NumPy array (here an array is placed like a tensor).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import ops
from .attacks import check_images, check_labels

__all__ = ["PerturbationTool", "poison_uint8"]


def _budget(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"PerturbationTool: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"PerturbationTool: {name} must be in (0, 1] (images in [0, 1]; e.g. 8/255), got {value}")
    return value


class PerturbationTool:
    """Drop-in for the reference ``PerturbationTool`` (module docstring: semantics and the one difference).

    ``epsilon`` (L-inf budget) and ``step_size`` in [0, 1] pixel units; ``num_steps`` >= 1 PGD steps per
    call; ``seed`` seeds NumPy's global generator, as the reference does. ``device`` (default: CUDA where
    available, else the CPU, as the reference) is where :meth:`random_noise` puts its noise; the attacks
    follow their images. ``backend`` forces a backend of the fused ops (default: by device).

    >>> import torch, torch.nn as nn
    >>> from salm_fast.compat import PerturbationTool
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    >>> tool = PerturbationTool(epsilon=8/255, num_steps=5, step_size=0.8/255, device="cpu")
    >>> images, labels = torch.rand(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    >>> noise = tool.random_noise(noise_shape=[4, 3, 8, 8])
    >>> perturb_img, eta = tool.min_min_attack(images, labels, model, None, nn.CrossEntropyLoss(), random_noise=noise)
    >>> bool(eta.abs().max() <= 8/255), bool(((perturb_img - images).abs() <= 8/255 + 1e-7).all())
    (True, True)
    """

    def __init__(self, seed: int = 0, epsilon: float = 0.03137254901, num_steps: int = 20,
                 step_size: float = 0.00784313725, *, device: str | torch.device | None = None,
                 backend: str | None = None) -> None:
        self.epsilon = _budget("epsilon", epsilon)
        self.step_size = _budget("step_size", step_size)
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"PerturbationTool: num_steps must be an integer, got {type(num_steps).__name__}")
        if num_steps < 1:
            raise ValueError(f"PerturbationTool: num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"PerturbationTool: seed must be an integer, got {type(seed).__name__}")
        self.seed = int(seed)
        ops.check_backend(backend)
        self.backend = backend
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        np.random.seed(self.seed)  # the reference's global seeding, kept: its callers rely on it

    # -------------------------------------------------------------- noise
    def _uniform(self, shape: Sequence[int]) -> Tensor:
        # float32 on the CPU from torch's global generator, as the reference draws it: same seed, same noise
        return torch.empty(tuple(shape), dtype=torch.float32).uniform_(-self.epsilon, self.epsilon)

    def random_noise(self, noise_shape: Sequence[int] = (10, 3, 32, 32)) -> Tensor:
        """Uniform noise in [-epsilon, epsilon] of ``noise_shape``, on the tool's device."""
        shape = tuple(noise_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
            raise ValueError(f"PerturbationTool: noise_shape must be positive integers, got {list(noise_shape)}")
        return self._uniform(shape).to(self.device)

    # -------------------------------------------------------------- attacks
    def min_min_attack(self, images: Tensor, labels: Tensor, model: nn.Module, optimizer: object, criterion: object,
                       random_noise: Tensor | None = None, sample_wise: bool = False) -> tuple[Tensor, Tensor]:
        """Error-minimizing noise for one batch: ``(perturb_img, eta)`` (module docstring)."""
        return self._attack("min_min_attack", images, labels, model, optimizer, criterion, random_noise, sign=-1)

    def min_max_attack(self, images: Tensor, labels: Tensor, model: nn.Module, optimizer: object, criterion: object,
                       random_noise: Tensor | None = None, sample_wise: bool = False) -> tuple[Tensor, Tensor]:
        """Error-maximizing noise for one batch: ``(perturb_img, eta)`` (module docstring)."""
        return self._attack("min_max_attack", images, labels, model, optimizer, criterion, random_noise, sign=1)

    def _attack(self, who: str, images: Tensor, labels: Tensor, model: nn.Module, optimizer: object,
                criterion: object, random_noise: Tensor | None, sign: int) -> tuple[Tensor, Tensor]:
        who = f"PerturbationTool.{who}"
        x = check_images(who, images).detach()
        check_labels(who, x, labels)
        if not callable(criterion):
            raise TypeError(f"{who}: criterion must be callable, got {type(criterion).__name__}")
        if random_noise is None:
            random_noise = self._uniform(x.shape)
        elif not isinstance(random_noise, Tensor):
            raise TypeError(f"{who}: random_noise must be a torch.Tensor, got {type(random_noise).__name__}")
        elif tuple(random_noise.shape) != tuple(x.shape):
            raise ValueError(f"{who}: random_noise has shape {tuple(random_noise.shape)}, "
                             f"images {tuple(x.shape)}")
        random_noise = random_noise.detach().to(device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(random_noise).all()):
            raise ValueError(f"{who}: random_noise contains NaN or inf")
        classify = sign < 0 and isinstance(criterion, nn.CrossEntropyLoss) and hasattr(model, "classify")
        if classify:
            model.classify = True
        n, _, h, w = x.shape
        mask = x.new_ones((n, 1, h, w))
        eps, step = self.epsilon, self.step_size
        # The state is the perturbation actually applied, (clamp(images + eta, 0, 1) - images): the
        # reference's perturbed image minus the images, so every step starts where the reference's does.
        delta = (x + random_noise).clamp_(0, 1) - x
        eta = random_noise
        for t in range(self.num_steps):
            g = self._input_gradient(model, x + delta, labels, optimizer, criterion)
            if t + 1 < self.num_steps:
                ops.pgd_step(x, delta, g, mask, eps, step, sign, out=delta, backend=self.backend)
            else:
                # The last step also yields the reference's eta: clipped to the budget, not yet to [0, 1].
                eta = (delta + (sign * step) * torch.sign(g)).clamp_(-eps, eps)
                delta = ops.masked_linf_project(x, eta, mask, eps, backend=self.backend)
        return (x + delta).requires_grad_(True), eta

    @staticmethod
    def _input_gradient(model: nn.Module, perturb_img: Tensor, labels: Tensor, optimizer: object,
                        criterion: object) -> Tensor:
        perturb_img = perturb_img.detach().requires_grad_(True)
        with torch.enable_grad():
            if isinstance(criterion, nn.CrossEntropyLoss):
                loss = criterion(model(perturb_img), labels)
            else:
                _, loss = criterion(model, perturb_img, labels, optimizer)
            (g,) = torch.autograd.grad(loss, perturb_img)
        return g

    # -------------------------------------------------------------- patches
    def _patch_noise_extend_to_img(self, noise: Tensor | np.ndarray, image_size: Sequence[int] = (3, 32, 32),
                                   patch_location: str = "center") -> tuple[tuple[int, int, int, int], Tensor]:
        """A C x h x w noise patch placed in a zero C x H x W image: ``((x1, x2, y1, y2), image)``.

        ``patch_location``: ``"center"``, or ``"random"`` (NumPy's global generator, row then column,
        as the reference draws them). A patch the size of the image fills it. The image is float32 on
        the tool's device; rows ``x1:x2`` and columns ``y1:y2`` hold the patch.
        """
        c, h, w = (int(s) for s in image_size)
        if patch_location not in ("center", "random"):
            raise ValueError(f"PerturbationTool: patch_location must be 'center' or 'random', got {patch_location!r}")
        patch = torch.as_tensor(np.asarray(noise) if isinstance(noise, np.ndarray) else noise.detach().cpu(),
                                dtype=torch.float32)
        ph, pw = int(patch.shape[-2]), int(patch.shape[-1])
        if patch.dim() != 3 or patch.shape[0] != c or ph > h or pw > w:
            raise ValueError(f"PerturbationTool: noise patch of shape {tuple(patch.shape)} does not fit an image "
                             f"of shape {(c, h, w)}")
        if patch_location == "center" or (ph, pw) == (h, w):
            row, col = h // 2, w // 2
        else:
            row = int(np.random.randint(ph // 2, h - ph // 2))
            col = int(np.random.randint(pw // 2, w - pw // 2))
        x1, y1 = row - ph // 2, col - pw // 2  # an odd-sized patch fits too (the reference's slice lost a row)
        x2, y2 = x1 + ph, y1 + pw
        image = torch.zeros((c, h, w), dtype=torch.float32)
        image[:, x1:x2, y1:y2] = patch
        return (x1, x2, y1, y2), image.to(self.device)


# ------------------------------------------------------------------ the dataset side
def poison_uint8(data: np.ndarray | Tensor, noise: Tensor | np.ndarray, epsilon: float,
                 labels: Sequence[int] | np.ndarray | Tensor | None = None) -> np.ndarray:
    """uint8 images + float noise -> the perturbed uint8 images, signed noise kept (the one fix).

    ``data``: N x H x W (gray) or N x H x W x C uint8, the storage layout of torchvision's CIFAR
    ``.data`` and of MedMNIST. ``noise`` in [0, 1] units: N x C x H x W (sample-wise), or
    n_classes x C x H x W with ``labels`` (N class indices; class-wise: image i gets
    ``noise[labels[i]]``). Each nonzero noise value moves its pixel by round(|noise| * 255) levels
    in its own direction, at least 1 and at most ``floor(epsilon * 255)``, then the pixel is clipped
    to [0, 255] (:func:`salm_fast.release.quantize_release`). Returns a new array like ``data``.
    """
    from .data import nchw_to_storage, storage_to_nchw
    from .release import quantize_release

    arr = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[0] == 0:
        raise ValueError(f"poison_uint8: data must be uint8 N x H x W or N x H x W x C images, "
                         f"got {arr.dtype} of shape {arr.shape}")
    images = storage_to_nchw(arr)
    noise = torch.as_tensor(np.asarray(noise) if isinstance(noise, np.ndarray) else noise.detach().cpu())
    if not noise.is_floating_point():
        raise ValueError(f"poison_uint8: noise must be floating point ([0, 1] units), got {noise.dtype}")
    noise = noise.to(torch.float64)
    if labels is not None:
        idx = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels.cpu()).long().flatten()
        if idx.numel() != images.shape[0]:
            raise ValueError(f"poison_uint8: {idx.numel()} labels for {images.shape[0]} images")
        if noise.dim() != 4 or idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < noise.shape[0]):
            raise ValueError(f"poison_uint8: class-wise noise of shape {tuple(noise.shape)} has no row for "
                             f"some label (labels in [{int(idx.min())}, {int(idx.max())}])")
        noise = noise[idx]
    if tuple(noise.shape) != tuple(images.shape):
        raise ValueError(f"poison_uint8: noise of shape {tuple(noise.shape)} does not match the images "
                         f"{tuple(images.shape)} (N x C x H x W{'; class-wise noise needs labels' if labels is None else ''})")
    return nchw_to_storage(quantize_release(images, noise, epsilon))
