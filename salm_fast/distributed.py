"""Many processes (``torchrun``): one place for the process group and its collectives.

``torchrun --nproc-per-node N -m salm_fast protect ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init_from_env` joins them into one process group (``gloo`` on the CPU, ``nccl`` on CUDA, one
device per local rank). Every helper here is an exact no-op when no group is initialized or the world
has one process: it returns its input unchanged, so single-process code paths are byte for byte the
same as before.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import sys
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

def _dist():
    import torch.distributed as dist
    return dist


_alone = 0  # > 0 inside :func:`alone`


def initialized() -> bool:
    """True when a torch.distributed process group with more than one process is running (and this
    process is not inside :func:`alone`)."""
    dist = _dist()
    return bool(not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized group; ``(0, 1)`` without one (or inside :func:`alone`)."""
    dist = _dist()
    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process works as if it were the only one: :func:`initialized` is False,
    :func:`world` is ``(0, 1)`` and every collective here is a no-op. For work one rank does by itself
    while the others wait (rank 0 running a method that is not data-parallel): a collective reached
    there would otherwise wait forever for ranks that never join it."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


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


#: How long a collective waits for the other ranks. Long: the ranks other than 0 wait at the end while rank 0
#: writes the release (and audits it), or fits alone a method that is not data-parallel. A rank that dies
#: is noticed at once (its connections close) and torchrun stops the others, so this bounds only a hang.
TIMEOUT_S = 6 * 3600.0


def init_from_env(device: torch.device | str = "cpu", timeout_s: float = TIMEOUT_S) -> bool:
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


def backend_name() -> str | None:
    """The initialized group's backend (``gloo``, ``nccl``), None without one."""
    dist = _dist()
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def shutdown() -> None:
    """Destroy the process group if one is initialized (a no-op otherwise)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(status: int = 0) -> None:
    """The end of a successful rank of a torchrun job: wait for every rank (rank 0 may still be writing),
    then leave the process at once with ``status``, output flushed. Leaving at once skips tearing the
    group and the interpreter down, where gloo's threads sometimes aborted a rank (``terminate called
    without an active exception``, 3 exits of about 15 on this machine) after the job had succeeded and
    made torchrun report a failure. Nothing is pending once every rank has passed the barrier.
    Without a group: flush and return."""
    many = initialized()
    if many:
        barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    if many:
        os._exit(status)


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


def share(n: int, rank: int | None = None, size: int | None = None) -> int:
    """How many of ``n`` items (images, a batch) rank ``rank`` of ``size`` takes: ``n // size``, plus one
    for the first ``n % size`` ranks (the length of :func:`shard_indices`)."""
    return len(shard_indices(n, rank, size))


def average_gradients(params: Iterable[torch.nn.Parameter], weight: float,
                      buffers: Iterable[torch.Tensor] = ()) -> None:
    """Make every rank's gradients (and floating ``buffers``, e.g. BatchNorm running statistics) the
    ``weight``-weighted mean over the ranks, in place, in one collective.

    ``weight``: how many images this rank's gradient is the mean over (0: none this step; its
    gradients are ignored). With per-rank means weighted by their batch sizes the result is the
    mean gradient of the union of the ranks' batches: what one process computes on that batch.
    A parameter whose gradient is None on every rank stays None (an optimizer then skips it, as
    it would in one process). A no-op without a group."""
    if not initialized():
        return
    params = [p for p in params if p.requires_grad]
    buffers = [b for b in buffers if b.is_floating_point()]
    if not params and not buffers:
        return
    dev = _comm_device()
    w = float(weight)
    pieces = []
    for p in params:
        g = p.grad
        pieces.append((g.detach().reshape(-1).to(dev, torch.float64) * w) if g is not None and w > 0
                      else torch.zeros(p.numel(), dtype=torch.float64, device=dev))
    for b in buffers:
        pieces.append(b.detach().reshape(-1).to(dev, torch.float64) * w)
    flags = torch.tensor([1.0 if p.grad is not None and w > 0 else 0.0 for p in params] + [w], dtype=torch.float64,
                         device=dev)
    flat = torch.cat(pieces + [flags])
    _dist().all_reduce(flat, op=_dist().ReduceOp.SUM)
    total = float(flat[-1])
    if total <= 0:
        return  # no rank had an image: nothing to average (every rank agrees: the same sums)
    has = flat[-1 - len(params):-1]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if has[i] > 0:
            value = (flat[offset:offset + n] / total).view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)
        else:
            p.grad = None
        offset += n
    for b in buffers:
        n = b.numel()
        b.copy_((flat[offset:offset + n] / total).view_as(b).to(b.dtype))
        offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place), e.g. after
    building a model from a rank-dependent random stream. Returns the module; a no-op without a group."""
    if not initialized():
        return module
    dist = _dist()
    dev = _comm_device()
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(dev).clone()
            dist.broadcast(buf, src=src)
            t.copy_(buf.to(t.device))
    return module


def gather_rows(t: torch.Tensor, dst: int = 0, chunk_bytes: int = 64 << 20) -> torch.Tensor | None:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on rank ``dst`` (None on the others).

    Ranks may hold different row counts (the other dimensions and the dtype must agree). Sent in
    pieces of about ``chunk_bytes`` per rank, so no rank allocates more than one piece per rank beyond
    the result. Without a group: ``t``."""
    if not initialized():
        return t
    dist = _dist()
    rank, size = world()
    dev = _comm_device()
    rows = [int(r) for r in all_gather_objects(int(t.shape[0]))]
    row_bytes = max(1, t[:1].numel() * t.element_size()) if t.dim() else t.element_size()
    per_piece = max(1, chunk_bytes // row_bytes)
    pieces = math.ceil(max(rows) / per_piece) if max(rows) else 0
    tail = tuple(t.shape[1:])
    out = torch.empty((sum(rows), *tail), dtype=t.dtype) if rank == dst else None
    offsets = [sum(rows[:r]) for r in range(size)]
    for i in range(pieces):
        lo = i * per_piece
        part = t[lo:lo + per_piece].detach().to(dev)
        buf = torch.zeros((per_piece, *tail), dtype=t.dtype, device=dev)
        buf[:len(part)] = part
        if rank == dst:
            bufs = [torch.empty_like(buf) for _ in range(size)]
            dist.gather(buf, bufs, dst=dst)
            for r, b in enumerate(bufs):
                m = max(0, min(per_piece, rows[r] - lo))
                if m:
                    out[offsets[r] + lo:offsets[r] + lo + m] = b[:m].cpu()
        else:
            dist.gather(buf, None, dst=dst)
    return out if rank == dst else None


def gather_objects(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank ``dst``, None elsewhere. Without a group: ``[obj]``."""
    if not initialized():
        return [obj]
    dist = _dist()
    rank, size = world()
    out: list[Any] | None = [None] * size if rank == dst else None
    if dist.get_backend() == "nccl":  # nccl's object collectives need the current CUDA device
        out_all = all_gather_objects(obj)
        return out_all if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def scatter_objects(objs: Sequence[T] | None, src: int = 0) -> T:
    """Rank ``src`` holds one object per rank (``objs``, in rank order); each rank gets its own.
    Without a group: ``objs[0]``."""
    if not initialized():
        assert objs is not None
        return objs[0]
    dist = _dist()
    rank, size = world()
    box: list[Any] = [None]
    if rank == src:
        if objs is None or len(objs) != size:
            raise ValueError(f"scatter_objects: rank {src} must give {size} objects")
    dist.scatter_object_list(box, list(objs) if rank == src else None, src=src)
    return box[0]


def shard_indices(n: int, rank: int | None = None, size: int | None = None) -> range:
    """The contiguous block of ``range(n)`` rank ``rank`` of ``size`` owns (the first ``n % size``
    ranks get one extra). Deterministic and covering ``range(n)`` exactly once, in order."""
    if rank is None or size is None:
        rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rank_seed(seed: int, rank: int) -> int:
    """The random stream of rank ``rank`` of a run seeded ``seed``: ``seed`` itself on rank 0 (so one process
    draws what it always drew), a distinct 63-bit number derived from both on the others."""
    if rank == 0:
        return int(seed)
    digest = hashlib.sha256(f"salm-fast rank {rank} of seed {int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (agreed decisions). Single process: flag."""
    if not initialized():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], dtype=torch.int64)).item() > 0)
