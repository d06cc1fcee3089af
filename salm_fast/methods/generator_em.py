"""Generator-based error-minimizing noise: the amortized anti-learning perturbation of the
bi-level formulation (Ye et al. 2023; in the spirit of the generative unlearnable-examples
line of work): a network maps each image to its perturbation and is trained by the
min-min loop. Unmasked (every pixel may change). Once trained, it protects images added
later in one forward pass (:meth:`GeneratorEM.perturb`).

This is the plain generator: no class-wise texture code, so it shows what the min-min
loop finds on its own; SALM adds the saliency mask and the code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..bilevel import BiLevelConfig
from ..generator import NoiseGenerator
from ..noise import GeneratorNoise
from .base import BiLevelMethod, check_int, check_number


class GeneratorEM(BiLevelMethod):
    name = "generator"
    paper = "generator-based error-minimizing noise (bi-level min-min, amortized)"
    code = False  # SALM overrides: class-wise texture code

    def __init__(self, eps: float | str | None = None, *, generator_steps: int = 20, generator_lr: float = 1e-3,
                 width: int = 32, **kw):
        super().__init__(eps, **kw)
        self.generator_steps = check_int(self.name, "generator_steps", generator_steps, 1)
        self.generator_lr = check_number(self.name, "generator_lr", generator_lr)
        self.width = check_int(self.name, "width", width, 1)
        self.net: NoiseGenerator | None = None

    @classmethod
    def default_loop(cls) -> BiLevelConfig:
        return BiLevelConfig(max_rounds=20, surrogate_steps=20, surrogate_reset_every=5, min_rounds=5,
                             augment=True, eval_images=1024)

    def options(self):
        return {**super().options(), "generator_steps": self.generator_steps, "generator_lr": self.generator_lr,
                "width": self.width, "code": self.code}

    def code_options(self, x, n_classes: int) -> dict:
        """The generator's class-wise code (``code=``, ``code_scale=``): none for the plain generator."""
        return {}

    def make_noise(self, x, y, n_classes, mask):
        # Initialized on the CPU (the seeded global stream), then moved: the same weights on every device.
        self.net = NoiseGenerator(x.shape[1], n_classes, self.eps, width=self.width,
                                  **self.code_options(x, n_classes)).to(x.device)
        return GeneratorNoise(self.net, self.eps, steps=self.generator_steps, lr=self.generator_lr)

    # ---------------------------------------------------------------- protecting images that arrive later
    @property
    def can_save_protector(self) -> bool:
        """Whether :meth:`protector_state` describes this object whole. The plain generator's does (its
        network is all it needs); a subclass that adds state (SALM's masks) must define its own
        ``protector_state`` / ``from_protector_state``, and until it does it cannot save one."""
        return type(self) is GeneratorEM or type(self).protector_state is not GeneratorEM.protector_state

    def protector_state(self) -> dict:
        """What protects new images, as tensors and primitives only (``torch.load(weights_only=True)``
        reads it back): the generator's constructor arguments and weights, and the budget. No seed, no
        optimizer, no training data. :meth:`from_protector_state` rebuilds a method whose :meth:`perturb`
        gives the same perturbation."""
        if not self.can_save_protector:
            raise RuntimeError(f"{self.name}: cannot save a protector (its state is more than the generator)")
        if self.net is None:
            raise RuntimeError(f"{self.name}: fit() first; the generator is not trained")
        net = self.net
        return {"kind": "generator", "eps": float(self.eps),
                "generator": {"channels": int(net.channels), "n_classes": int(net.n_classes), "width": int(self.width),
                              "class_conditional": bool(net.class_conditional), "parity": bool(net.parity)},
                "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}

    @classmethod
    def from_protector_state(cls, state: dict) -> "GeneratorEM":
        """A method that protects new images as the one that saved ``state`` (:meth:`protector_state`) did;
        ValueError (one line) on a state that is not one."""
        if not isinstance(state, dict) or state.get("kind") != "generator":
            raise ValueError(f"{cls.name}: the protector's method state is not a generator's")
        try:
            eps, spec, weights = state["eps"], dict(state["generator"]), state["state_dict"]
            method = cls(eps, width=spec["width"])
            code = weights.get("code")  # a class-wise code's shape (its values are in the weights)
            with torch.random.fork_rng(devices=[]):  # its random initial weights are replaced: leave the caller's RNG
                net = NoiseGenerator(spec["channels"], spec["n_classes"], method.eps, width=spec["width"],
                                     code=None if code is None else torch.zeros_like(code),
                                     class_conditional=spec["class_conditional"], parity=spec["parity"])
            net.load_state_dict(weights, strict=True)
        except (KeyError, TypeError, RuntimeError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:200]
            raise ValueError(f"{cls.name}: the protector's generator state does not load ({reason})") from None
        method.net = net.eval()
        return method

    @torch.no_grad()
    def perturb(self, x: Tensor, y: Tensor, mask: Tensor | None = None, batch_size: int = 1024,
                precision: str = "fp32") -> Tensor:
        """Protect new images with the trained generator, one forward pass per batch.

        ``precision="bf16"`` runs the generator's convolutions in bfloat16 (channels-last):
        ~3.4x the fp32 throughput on an AVX-512-BF16 CPU (1 thread, 28 px: 4,233 vs 1,268
        images/s); the noise then differs from the fp32 one by bf16 rounding, while the
        budget is still enforced exactly (the projection runs in the input's dtype)."""
        from ..runtime import autocast

        if self.net is None:
            raise RuntimeError(f"{self.name}: fit() first; the generator is not trained")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.net.eval()
        if mask is None:
            mask = x.new_ones((x.shape[0], 1, x.shape[2], x.shape[3]))
        out = torch.empty_like(x)
        fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
        net = self.net.to(device=x.device, memory_format=fmt)
        try:
            with torch.inference_mode():  # no autograd graph: a forward pass is all it takes
                for s in range(0, len(x), batch_size):
                    sl = slice(s, s + batch_size)
                    with autocast(precision, x.device):
                        raw = net(x[sl].contiguous(memory_format=fmt), y[sl])
                    out[sl] = ops.masked_linf_project(x[sl], raw.to(x.dtype).contiguous(), mask[sl], self.eps)
        finally:
            self.net.to(memory_format=torch.contiguous_format)
        return out
