"""Type stubs of salm_fast._C, the C++ CPU kernels (csrc/, pybind11 + OpenMP).

Arrays are float32 or float64 (one dtype per call), C-contiguous, aligned NumPy arrays,
usually zero-copy views of torch tensors (``t.detach().numpy()``); nothing is converted
or copied: a violation raises TypeError (not an array, wrong dtype) or ValueError (shape,
layout, overlap, value). Outputs are filled in place. ``nthreads=0`` uses the OpenMP
default (:func:`num_threads`). User code should call :mod:`salm_fast.ops` instead.
"""
import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def flush_denormal_state() -> int:
    """1 if the calling thread flushes denormals (MXCSR FTZ/DAZ), 0 if not, -1 where unreadable."""

def num_threads() -> int:
    """Threads a call with ``nthreads=0`` uses (``omp_get_max_threads()``)."""

def grad_magnitude(g: _Array, p: int, out: _Array, nthreads: int = 0) -> None:
    """``out`` (N, H, W) <- sum_c |g| (p=1) or sqrt(sum_c g*g) (p=2) of ``g`` (N, C, H, W)."""

def topk_mask(s: _Array, k: int, out: _Array, nthreads: int = 0) -> bool:
    """``out`` (N, 1, H, W) <- 1 at the k largest of each image of ``s`` (N, H, W), ties to the
    lower flat index, else 0. False (``out`` unspecified) if ``s`` has a NaN or an inf."""

def saliency_topk_mask(g: _Array, k: int, p: int, out: _Array, nthreads: int = 0) -> bool:
    """``topk_mask(grad_magnitude(g, p), k)`` without an N x H x W saliency tensor.
    False if the saliency has a NaN or an inf."""

def masked_linf_project(x: _Array, delta: _Array, mask: _Array, eps: float, out: _Array, nthreads: int = 0) -> None:
    """``out`` <- clamp(clamp(delta * mask, -eps, eps), -x, 1 - x); mask (N, 1, H, W) is broadcast
    over channels; ``out`` may be ``delta`` itself."""

def masked_linf_project_backward(
    x: _Array, delta: _Array, mask: _Array, eps: float, grad_out: _Array, grad_delta: _Array,
    grad_x: _Array | None, nthreads: int = 0,
) -> None:
    """PyTorch clamp subgradients of masked_linf_project into ``grad_delta`` and ``grad_x`` (if not None)."""

def pgd_step(
    x: _Array, delta: _Array, g: _Array, mask: _Array, eps: float, alpha: float, out: _Array, nthreads: int = 0,
) -> None:
    """``out`` <- masked_linf_project(x, delta + alpha * sign(g), mask, eps); ``alpha`` is signed;
    ``out`` may be ``delta`` itself (in-place step)."""

def all_finite(a: _Array, nthreads: int = 0) -> bool:
    """True if ``a`` (any shape) holds no NaN and no inf. One read of ``a``, no allocation."""

def none_nan(a: _Array, nthreads: int = 0) -> bool:
    """True if ``a`` (any shape) holds no NaN (inf allowed: the sign of an infinite gradient is defined)."""

def all_binary(a: _Array, nthreads: int = 0) -> bool:
    """True if every value of ``a`` (any shape) is 0 or 1 (a mask); NaN and inf are neither."""
