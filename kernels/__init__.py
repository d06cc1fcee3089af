"""Triton kernels of the fused ops (imported as ``salm_fast.kernels``).

One op per module, each with private ``@triton.jit`` kernels and a plain-Python
launcher that fills caller-allocated outputs (no autograd here; see
``salm_fast.ops``):

* ``grad_magnitude``      - per-pixel saliency, N x C x H x W -> N x H x W;
* ``topk_mask``           - top-k mask by radix select, plain and fused with the saliency;
* ``masked_linf_project`` - the masked L-inf / box projection and its backward;
* ``pgd_step``            - one fused, projected signed-gradient step;
* ``_common``             - the jit helpers several ops inline (scalars, projection, saliency).
"""
from . import grad_magnitude, masked_linf_project, pgd_step, topk_mask

__all__ = ["grad_magnitude", "masked_linf_project", "pgd_step", "topk_mask"]
