"""Backend discovery and selection for the fused ops.

Three backends implement the same functions (see ``_reference`` for the contract):

* ``torch``  - the reference, any device;
* ``cpp``    - ``salm_fast._C`` (pybind11 + OpenMP), CPU tensors;
* ``triton`` - ``salm_fast.kernels``, CUDA tensors (or any tensor when Triton's CPU
  interpreter is switched on with ``TRITON_INTERPRET=1``).

Every backend computes in float32 and float64; the registered ops (``_library``) widen
float16/bfloat16 to float32 first, so any backend takes any float dtype.

Choice, first match wins: the ``backend=`` argument, the innermost
:func:`use_backend` block (a ``contextvars.ContextVar``: local to the thread or asyncio
task that entered it), the ``SALM_FAST_BACKEND`` environment variable, then the device
default (triton on CUDA, cpp on CPU, torch where neither can run). A forced backend that
cannot run raises one line saying why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton")
ENV_VAR = "SALM_FAST_BACKEND"
# The backend forced by the innermost use_backend block of this thread / task (None: none).
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("salm_fast_backend", default=None)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when it is available

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name}: {state} ({self.reason})"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend module once; return (module, '') or (None, reason)."""
    if name == "torch":
        return importlib.import_module("salm_fast.ops._reference"), ""
    if name == "cpp":
        try:
            return importlib.import_module("salm_fast.ops._cpp"), ""
        except ImportError as exc:  # the extension was not built
            return None, f"the compiled module salm_fast._C cannot be imported ({exc}); reinstall salm-fast"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install triton"
    try:
        return importlib.import_module("salm_fast.ops._triton"), ""
    except ImportError as exc:
        return None, f"the Triton kernels cannot be imported ({exc})"


def backend_status(name: str) -> BackendStatus:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, reason = _load(name)
    if module is None:
        return BackendStatus(name, False, reason)
    if name == "torch":
        return BackendStatus(name, True, "any device")
    if name == "cpp":
        return BackendStatus(name, True, f"CPU tensors, {module.num_threads()} OpenMP threads")
    if torch.cuda.is_available():
        return BackendStatus(name, True, f"CUDA tensors on {torch.cuda.get_device_name()}")
    if _interpreting():
        return BackendStatus(name, True, "TRITON_INTERPRET=1: CPU interpreter (slow, for tests)")
    return BackendStatus(name, False,
                         "no CUDA device (TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter)")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why."""
    return {name: backend_status(name) for name in BACKENDS}


def check_backend(name: str | None) -> None:
    """Fail now, in one line, if backend ``name`` cannot run here (None, the default, always can).

    ValueError for a name that is not a backend, RuntimeError saying why for one that is
    unavailable (e.g. ``triton`` without CUDA). Changes nothing.
    """
    if name is None:
        return
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    status = backend_status(name)
    if not status.available:
        raise RuntimeError(f"backend {name!r} is unavailable: {status.reason}")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed code with every op forced onto backend ``name`` (None: no change).

    Checks up front (:func:`check_backend`) that the backend can run here, so a long job
    fails before it starts. The choice is local to the current thread or asyncio task
    (a context variable; ``os.environ`` is left alone) and a ``backend=`` argument still
    wins over it.
    """
    if name is None:
        yield
        return
    check_backend(name)
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select(op: str, device: torch.device, backend: str | None = None) -> ModuleType:
    """The backend module that runs ``op`` on tensors living on ``device``."""
    if backend is not None:
        forced, source = backend, "backend="
    elif _FORCED.get() is not None:
        forced, source = _FORCED.get(), "use_backend="
    else:
        forced, source = os.environ.get(ENV_VAR) or None, f"{ENV_VAR}="
    if forced is None:
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        if _load(preferred)[0] is not None and backend_status(preferred).available:
            return _load(preferred)[0]  # type: ignore[return-value]
        return _load("torch")[0]  # type: ignore[return-value]
    if forced not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {source}{forced!r}; choose one of {', '.join(BACKENDS)}")
    status = backend_status(forced)
    if not status.available:
        raise RuntimeError(f"{op}: backend {forced!r} is unavailable: {status.reason}")
    if forced == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: the cpp backend runs on CPU tensors, got a tensor on {device}")
    if forced == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{op}: the triton backend runs on CUDA tensors, got a tensor on {device} "
            "(set TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    return _load(forced)[0]  # type: ignore[return-value]
