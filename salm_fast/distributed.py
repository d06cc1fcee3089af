"""Many processes (``torchrun``): one place for the process group and its collectives.

``torchrun --nproc-per-node N -m salm_fast protect ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init_from_env` joins them into one process group (``gloo`` on the CPU, ``nccl`` on CUDA, one
device per local rank). Every helper here is an exact no-op when no group is initialized or the world
has one process: it returns its input unchanged, so single-process code paths are byte for byte the
same as before.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    import torch.distributed as dist
    return dist


def initialized() -> bool:
    """True when a torch.distributed process group with more than one process is running."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized group; ``(0, 1)`` without one."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and always in a single process)."""
    return world()[0] == 0


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the torchrun variables when WORLD_SIZE > 1, else None.

    Raises ValueError naming the variable when torchrun's variables are set but incomplete or bad."""
    size = os.environ.get("WORLD_SIZE")
    if size is None:
        return None
    try:
        n = int(size)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={size!r} is not an integer") from None
    if n <= 1:
        return None
    values = {}
    for key in ("RANK", "LOCAL_RANK"):
        raw = os.environ.get(key)
        if raw is None:
            if key == "LOCAL_RANK":
                raw = os.environ.get("RANK")
            if raw is None:
                raise ValueError(f"WORLD_SIZE={n} but {key} is not set (start the processes with torchrun)")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r} is not an integer") from None
    if not 0 <= values["RANK"] < n:
        raise ValueError(f"RANK={values['RANK']} is outside WORLD_SIZE={n}")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise ValueError(f"WORLD_SIZE={n} but {key} is not set (start the processes with torchrun)")
    return values["RANK"], n, values["LOCAL_RANK"]


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: torch.device | str) -> torch.device:
    """The device this process uses: for ``cuda`` (no index) under torchrun, ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        env = env_world()
        if env is not None:
            return torch.device("cuda", env[2] % max(1, torch.cuda.device_count()))
    return device


def init_from_env(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group when the environment describes one (WORLD_SIZE > 1).

    Returns True when a multi-process group is (now) initialized, False in a single process.
    Idempotent: an already initialized group is kept."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    env = env_world()
    if env is None:
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = local_device(device)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, **kwargs)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Destroy the process group if one is initialized (a no-op otherwise)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: the current CUDA device for nccl, else the CPU."""
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over every rank (every rank gets it), as a tensor on ``t``'s device and dtype.

    The input is not modified. Without a group (or world size 1) ``t`` itself is returned.
    The sum is computed in float64 for floating inputs so its rounding does not depend on the
    order in which the ranks' values arrive; every rank gets the same bytes."""
    if not initialized():
        return t
    dist = _dist()
    work_dtype = torch.float64 if t.is_floating_point() else t.dtype
    if t.dtype == torch.bool:
        work_dtype = torch.int64
    buf = t.detach().to(device=_comm_device(), dtype=work_dtype).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(device=t.device, dtype=t.dtype if t.dtype != torch.bool else torch.int64)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (ranks may hold different row counts;
    the other dimensions and the dtype must agree). Without a group ``t`` itself is returned."""
    if not initialized():
        return t
    dist = _dist()
    _, size = world()
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    rows = [int(c.item()) for c in counts]
    top = max(rows)
    local = t.detach().to(dev).contiguous()
    if local.shape[0] < top:
        pad = torch.zeros((top - local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(t.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object). Without a group: ``obj``."""
    if not initialized():
        return obj
    dist = _dist()
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order. Without a group: ``[obj]``."""
    if not initialized():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (a no-op without a group)."""
    if not initialized():
        return
    dist = _dist()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard_indices(n: int, rank: int | None = None, size: int | None = None) -> range:
    """The contiguous block of ``range(n)`` rank ``rank`` of ``size`` owns (the first ``n % size``
    ranks get one extra). Deterministic and covering ``range(n)`` exactly once, in order."""
    if rank is None or size is None:
        rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (agreed decisions). Single process: flag."""
    if not initialized():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], dtype=torch.int64)).item() > 0)


def mean_over_ranks(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Weighted mean of per-rank statistics (e.g. correct / seen counts): every rank gets the same list."""
    if not initialized():
        if weights is None:
            return [float(v) for v in values]
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    w = torch.tensor([1.0] * len(values) if weights is None else [float(x) for x in weights], dtype=torch.float64)
    num = all_reduce_sum(v * w)
    den = all_reduce_sum(w)
    return [float(a / b) if b > 0 else 0.0 for a, b in zip(num.tolist(), den.tolist())]
