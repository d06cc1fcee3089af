"""float16 / bfloat16 tensors: computed in float32, rounded back without breaking the budget.

The kernels compute in float32 or float64. A half-precision input is widened to float32
(exactly), run through the backend's float32 kernel (bit-identical on every backend) and
the result rounded once to the input dtype:

* saliency: rounded to nearest; a saliency beyond the dtype's range becomes inf, which the
  ops report as an overflow. ``saliency_topk_mask`` ranks the saliency *as rounded to the
  dtype*, so it still equals ``topk_mask(grad_magnitude(g, p), k)`` bit for bit (rounding
  creates ties; they go to the lower index as always).
* masks: exactly 0 and 1 in any dtype; ranking a half-precision saliency in float32 keeps
  its order, ties included.
* perturbations (``masked_linf_project``, ``pgd_step``): the budget is first rounded *down*
  to the dtype (:func:`budget`: the largest representable value <= eps; float32/float64
  keep torch's round-to-nearest ``eps``, as before), then the float32 result is rounded to
  nearest, except where that would cross the box bound ``1 - x``, which alone need not be
  representable (``-x`` and the rounded eps are): there the next value toward -inf is
  taken (:func:`round_perturbation`). So ``|delta| <= eps`` and ``0 <= x + delta <= 1``
  hold exactly in the dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def budget(eps: float, dtype: torch.dtype) -> float:
    """The L-inf budget the kernels clip to for tensors of ``dtype``.

    Half precision: the largest value of ``dtype`` <= eps (exact in float32, so the float32
    kernel clips to exactly that). Other dtypes: eps unchanged (the kernels round it to
    nearest in their dtype, the contract the float32/float64 releases are pinned to).
    """
    if not is_low_precision(dtype):
        return eps
    e = torch.tensor(eps, dtype=torch.float64).to(dtype)
    if float(e) > eps:
        e = torch.nextafter(e, torch.tensor(float("-inf"), dtype=dtype))
    return float(e)


def round_perturbation(result: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The float32 perturbation ``result`` (projected for the widened image ``x``) in ``dtype``.

    Round to nearest, but step one value toward -inf where the rounded value would exceed
    ``1 - x`` (computed in float32, as the kernel did): the other bounds (-x, +-eps) are
    representable, so rounding to nearest cannot cross them.
    """
    r = result.to(dtype)
    over = r.to(torch.float32) > 1.0 - x
    return torch.where(over, torch.nextafter(r, torch.full((), float("-inf"), dtype=dtype, device=r.device)), r)
