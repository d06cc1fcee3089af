"""What the protector and the victims share at run time: device, precision, denormals, input
normalization and the attacker's crop + flip.

Both sides import from here (never from each other): :func:`resolve_device`,
:func:`choose_precision` / :func:`autocast` (fp32, or bf16 autocast with fp32 master weights),
:func:`flush_denormal` (a context manager that restores the caller's state), :func:`normalize`
/ :class:`Normalize` (fixed scalars, no dataset statistics) and :func:`crop_flip`.

Precision is chosen at run time.

Why at run time: the CPU changes between sessions and bf16 autocast is a large win or a large
loss depending on it. Training throughput at 28 px, 1 channel, batch 128, forward + backward +
SGD step on an in-memory batch (images/s; CL = channels_last):

===============================  ========  ========  ========  ========  ===========
CPU, model                        fp32      fp32 CL   bf16      bf16 CL   bf16/fp32 CL
===============================  ========  ========  ========  ========  ===========
Intel SPR (AMX), ResNet-18        --        --        --        --        ~2.7x
AMD EPYC (AVX2 only), small CNN   --        340       --        28        0.08x
AMD EPYC (AVX2 only), ResNet-18   --        36        --        2         0.06x
AMD EPYC (AVX-512, avx512_bf16,   292+-3    366+-10   527+-8    733+-8    2.0x
no AMX), small CNN, 1 thread
same CPU, ResNet-18, 1 thread     31+-1     37+-1     66+-0     72+-0     1.9x
===============================  ========  ========  ========  ========  ===========
(The AVX-512 rows: torch 2.13.0+cpu, a CPU shared with other jobs (load ~5 on 2 cores),
mean +- std of 3 (CNN, 5 steps each) or 2 (ResNet-18, 2 steps each) timings after warm-up.
With 2 threads on that loaded CPU every figure dropped and turned erratic, e.g. ResNet-18 fp32
CL 27, bf16 CL 11: contention, not precision.) On that CPU bf16 kept the accuracy: small CNN on
BreastMNIST, 30 epochs, seed 0: fp32 test ACC 0.897 / AUC 0.914, bf16 0.891 / 0.914.

Policy of ``choose_precision("auto")``:
- CUDA: bf16 where the GPU supports it, else fp32.
- CPU with AMX tiles (``torch.cpu._is_amx_tile_supported()``): bf16, no measurement.
- CPU without native bf16 (no ``avx512_bf16``, e.g. AVX2 only): fp32, no measurement
  (autocast emulates bf16 there and is ~10x slower).
- CPU with ``avx512_bf16`` but no AMX: a short calibration (:func:`calibrate_bf16`), six
  interleaved fp32 / bf16 training steps each (batch 32), on one thread, of the model (or of the
  small CNN when no model is given) on random data; bf16 is chosen when it is at least
  ``BF16_MIN_SPEEDUP`` x faster AND its loss on the same weights and batch agrees with fp32 within
  ``BF16_MAX_LOSS_REL_DIFF``. Results are cached per (model type and size, input shape, batch
  size). Accuracy was also checked end to end (BreastMNIST, above). One thread, because the
  ratio is what is used and contending threads blur it: on this project's shared 2-core AMD EPYC
  (avx512_bf16, no AMX; load ~3), 10 calibrations each of the demo's models at 28 px, 1 channel,
  batch 32: the CNN victim with 2 threads and 2 steps chose bf16 4 times in 10 (speedups 0.47 to
  1.86), with 1 thread and 6 steps 10 times (1.51 to 1.99); the cnn-half surrogate 6/10 (0.67 to
  2.55) vs 10/10 (1.20 to 1.37). Timed apart (1 thread, median of 15 interleaved steps, load ~7):
  the surrogate's training step (batch 128) fp32 445 ms, bf16 253; the generator step 914 vs 705;
  the victim's training step (batch 65) 451 vs 250; its evaluation forward (batch 512) 1,717 vs
  920: bf16 is the faster choice for every model of the demo. The calibration costs well under
  1 s for the small CNNs and about 10 s for ResNet-18 (28 px, 1.6x) on one thread.
A timing choice can flip on a noisy machine; pass ``"fp32"`` or ``"bf16"`` explicitly for
bit-for-bit reproducible runs. Every run reports the precision used and why.

On the Sapphire Rapids (AMX) CPU of a later session, 1 thread, training steps of batch 128 at 28 px
(ms/step, median of 2 x 200 steps; CNN victim: 3 x 10): the protector's surrogate (cnn-half) fp32 171,
bf16 80; its generator + surrogate step fp32 408, bf16 205; the small CNN victim fp32 626, bf16 282.
bf16 stays the AMX choice for the small models too.

Threads are chosen at run time as well (:func:`choose_threads`). On that CPU, shared by other jobs
(load average ~8 on 2 cores), the small CNN victim's step took 1,114 ms with 2 intra-op threads and
311 ms with 1 (bf16; fp32 1,623 vs 702): each parallel region waits for a core another process holds,
and a tiny op (one Adam update of a 3 x 3 kernel) took ~2 ms instead of microseconds. A demo
(protect + 2 victims) took 1,427 s there with 2 threads. ``choose_threads("auto")`` times a few
training steps of the run's own model with 1 thread and with all of them, interleaved, and keeps
all only when they are at least ``THREADS_MIN_SPEEDUP`` x faster.
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16")
BF16_MIN_SPEEDUP = 1.2          # bf16 must be at least this much faster (images/s ratio)
THREADS_MIN_SPEEDUP = 1.15      # all threads must be at least this much faster than one (images/s ratio)
BF16_MAX_LOSS_REL_DIFF = 0.05   # |loss_bf16 - loss_fp32| / loss_fp32 on identical weights and batch
CALIBRATION_STEPS = 2           # timed steps per thread count (after one untimed warm-up step each)
BF16_CALIBRATION_STEPS = 6      # timed steps per precision, on one thread (module doc: the demo's models)
CALIBRATION_BATCH = 32          # images per calibration step (the ratio, not the rate, is what is used)

_calibration_cache: dict[tuple, dict[str, float]] = {}


def cpu_features() -> dict[str, object]:
    """What torch sees of this CPU: AMX tiles, AVX-512 bf16, the dispatched ISA level."""
    return {
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "capability": str(torch.backends.cpu.get_cpu_capability()),
    }


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu") -> Iterator[None]:
    """bf16 autocast for ``"bf16"``; nothing for ``"fp32"``."""
    if precision == "bf16":
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            yield
    elif precision == "fp32":
        yield
    else:
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                precision: str) -> float:
    t0 = time.perf_counter()
    with autocast(precision, x.device):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def calibrate_bf16(model: nn.Module | None = None, *, in_channels: int = 1, image_size: int = 28,
                   num_classes: int = 2, batch_size: int = 128, channels_last: bool = True,
                   steps: int = BF16_CALIBRATION_STEPS) -> dict[str, float]:
    """Time fp32 vs bf16 training steps (interleaved, median of ``steps`` each after one warm-up
    each) on a copy of ``model`` (default: the zoo's small CNN) with random CPU data, and compare
    the two losses on the initial weights. Leaves ``model`` and the global RNG untouched.
    Returns ``fp32_img_s``, ``bf16_img_s``, ``speedup`` (bf16 / fp32), ``loss_rel_diff``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model is None:
            from .models import build_model
            model = build_model("cnn", in_channels, num_classes, image_size)
        else:
            model = copy.deepcopy(model)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.cpu().to(memory_format=fmt)
        x = torch.rand(batch_size, in_channels, image_size, image_size).contiguous(memory_format=fmt)
        y = torch.randint(0, num_classes, (batch_size,))
        model.eval()
        with torch.no_grad():
            loss32 = float(F.cross_entropy(model(x).float(), y))
            with autocast("bf16"):
                loss16 = float(F.cross_entropy(model(x).float(), y))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for i in range(steps + 1):
            for p in PRECISIONS:
                t = _train_step(model, opt, x, y, p)
                if i > 0:
                    times[p].append(t)
    fp32 = batch_size / statistics.median(times["fp32"])
    bf16 = batch_size / statistics.median(times["bf16"])
    return {"fp32_img_s": fp32, "bf16_img_s": bf16, "speedup": bf16 / fp32,
            "loss_rel_diff": abs(loss16 - loss32) / max(abs(loss32), 1e-12)}


def choose_precision(requested: str = "auto", device: str | torch.device = "cpu", *,
                     model: nn.Module | None = None, sample_shape: tuple[int, ...] | None = None,
                     num_classes: int = 2) -> tuple[str, str]:
    """Return ``(precision, reason)``, precision in ``("fp32", "bf16")`` (policy: module doc).

    ``requested``: ``"auto"``, ``"fp32"`` or ``"bf16"``; an explicit choice is honoured (the
    reason says whether the hardware runs it natively). ``model`` and ``sample_shape`` (a batch
    shape, N x C x H x W) make the calibration, when one is needed, measure the real workload.
    """
    device = torch.device(device)
    if requested not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of auto, fp32, bf16; got {requested!r}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "CUDA device supports bf16") if native else ("fp32", "CUDA device has no bf16")
        return requested, f"requested (CUDA bf16 support: {'yes' if native else 'no'})"
    if device.type != "cpu":
        return ("fp32", f"{device.type} device: fp32 by default") if requested == "auto" else (requested, "requested")
    feats = cpu_features()
    desc = (f"AMX {'yes' if feats['amx'] else 'no'}, avx512_bf16 {'yes' if feats['avx512_bf16'] else 'no'}, "
            f"ISA {feats['capability']}")
    if requested != "auto":
        return requested, f"requested ({desc})"
    if feats["amx"]:
        return "bf16", f"CPU has AMX tiles: bf16 autocast is the fast path ({desc})"
    if not feats["avx512_bf16"]:
        return "fp32", f"CPU has no native bf16 (autocast would be emulated, ~10x slower) ({desc})"
    _, c, h, w = sample_shape if sample_shape is not None else (CALIBRATION_BATCH, 1, 28, 28)
    n = min(CALIBRATION_BATCH, sample_shape[0]) if sample_shape is not None else CALIBRATION_BATCH
    n_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    key = (type(model).__name__ if model is not None else "cnn", n_params, n, c, h, w, num_classes)
    if key not in _calibration_cache:
        with intra_op_threads(1):  # the per-core ratio: contending threads on a shared CPU made it a coin flip
            _calibration_cache[key] = calibrate_bf16(model, in_channels=c, image_size=h, num_classes=num_classes,
                                                     batch_size=n)
    cal = _calibration_cache[key]
    numbers = (f"calibration {key[0]} batch {n}, 1 thread: fp32 {cal['fp32_img_s']:.0f} img/s, bf16 {cal['bf16_img_s']:.0f} "
               f"img/s ({cal['speedup']:.2f}x), loss rel. diff {cal['loss_rel_diff']:.1e}; {desc}")
    if cal["speedup"] >= BF16_MIN_SPEEDUP and cal["loss_rel_diff"] <= BF16_MAX_LOSS_REL_DIFF:
        return "bf16", f"avx512_bf16 without AMX, bf16 measured faster: {numbers}"
    return "fp32", f"avx512_bf16 without AMX, bf16 not clearly faster or not accurate enough: {numbers}"


# ------------------------------------------------------------------------------ threads
@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the caller's count after; None: untouched."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_threads_cache: dict[tuple, dict[str, float]] = {}


def calibrate_threads(model: nn.Module, *, sample_shape: tuple[int, ...], num_classes: int = 2,
                      precision: str = "fp32", threads: int, steps: int = CALIBRATION_STEPS) -> dict[str, float]:
    """Time training steps of a copy of ``model`` (random CPU data of ``sample_shape``) with 1 thread
    and with ``threads``, interleaved, median of ``steps`` each after a warm-up each. Leaves the
    model, the global RNG and the thread count untouched. Returns ``one_img_s``, ``all_img_s``,
    ``speedup`` (all / one)."""
    n, c, h, w = sample_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = copy.deepcopy(model).cpu().to(memory_format=torch.channels_last).train()
        x = torch.rand(n, c, h, w).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (n,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times: dict[int, list[float]] = {1: [], threads: []}
        for i in range(steps + 1):
            for t in (1, threads):
                with intra_op_threads(t):
                    dt = _train_step(model, opt, x, y, precision)
                if i > 0:
                    times[t].append(dt)
    one, every = n / statistics.median(times[1]), n / statistics.median(times[threads])
    return {"one_img_s": one, "all_img_s": every, "speedup": every / one}


def choose_threads(requested: int | str | None = "auto", device: str | torch.device = "cpu", *,
                   model: nn.Module | None = None, sample_shape: tuple[int, ...] | None = None,
                   num_classes: int = 2, precision: str = "fp32") -> tuple[int | None, str]:
    """Return ``(threads, reason)``: the intra-op thread count for a CPU run (None: leave torch's).

    ``requested``: ``"auto"``/None (measure, see the module doc), or a count >= 1 (honoured). Off
    the CPU, with one thread available, with ``OMP_NUM_THREADS`` set (the user's choice), or without a
    model to time, nothing is changed. The count can change the last bits of a result (oneDNN's
    reductions): for bit-for-bit reproducible runs fix it (``torch.set_num_threads`` or ``OMP_NUM_THREADS``)."""
    if requested not in (None, "auto"):
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be auto or an integer >= 1, got {requested!r}")
        return requested, "requested"
    available = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"{available} thread(s), as OMP_NUM_THREADS says"
    if torch.device(device).type != "cpu" or available <= 1 or model is None or sample_shape is None:
        return None, f"{available} thread(s), unchanged"
    n = min(CALIBRATION_BATCH * 2, sample_shape[0])
    shape = (n, *sample_shape[1:])
    key = (type(model).__name__, sum(p.numel() for p in model.parameters()), shape, num_classes, precision, available)
    if key not in _threads_cache:
        _threads_cache[key] = calibrate_threads(model, sample_shape=shape, num_classes=num_classes,
                                                precision=precision, threads=available)
    cal = _threads_cache[key]
    numbers = (f"{key[0]} batch {n} {precision}: 1 thread {cal['one_img_s']:.0f} img/s, {available} threads "
               f"{cal['all_img_s']:.0f} img/s")
    if cal["speedup"] >= THREADS_MIN_SPEEDUP:
        return available, f"{available} threads measured faster ({numbers})"
    return 1, f"1 thread: {available} were not clearly faster, e.g. on a shared CPU ({numbers})"


# ------------------------------------------------------------------------------ device
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None: CUDA when present, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
    ``torch.device`` as given. Raises ValueError naming the problem when that device cannot run."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    return dev


def describe_device(device: str | torch.device) -> str:
    """``"cpu"``, or ``"cuda:0 (NVIDIA H200)"``: what a summary records of where a run ran."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


# ------------------------------------------------------------------------------ denormals
def _flush_denormal_state() -> bool | None:
    """Whether this thread flushes denormals now (MXCSR FTZ/DAZ); None where it cannot be read."""
    try:
        from . import _C
    except ImportError:
        return None
    state = _C.flush_denormal_state()
    return None if state < 0 else bool(state)


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero inside the block (CPU hot loops: denormals slowed a classic
    error-minimizing loop several-fold as noise and gradients shrank), then restore the caller's
    state (read from the CPU's control register; off where it cannot be read)."""
    before = _flush_denormal_state()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(bool(before))


# ------------------------------------------------------------------------------ inputs
#: Fixed input normalization of every model here (images in [0, 1]): no dataset statistics, so the
#: same code serves any dataset, and adversarial steps work in pixel space.
NORM_MEAN, NORM_STD = 0.5, 0.25


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD


class Normalize(nn.Module):
    """(x - mean) / std with fixed scalars: images in [0, 1] -> roughly zero-mean, unit scale."""

    def __init__(self, mean: float = NORM_MEAN, std: float = NORM_STD):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def crop_flip(x: torch.Tensor, gen: torch.Generator, *, pad: int = 4, pad_mode: str = "constant") -> torch.Tensor:
    """The attacker's standard augmentation on a batch N x C x H x W: a random crop with ``pad``
    px of padding (zero, as torchvision's ``RandomCrop(padding=4)``, or reflect), i.e. a
    per-image shift in [-pad, pad]^2, and a horizontal flip with probability 1/2. One gather with
    per-image offsets; differentiable in ``x``; randomness from ``gen`` (drawn on the CPU)."""
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode must be constant or reflect, got {pad_mode!r}")
    n, c, h, w = x.shape
    p = int(pad)
    padded = F.pad(x, (p, p, p, p), mode=pad_mode)
    offs = torch.randint(0, 2 * p + 1, (2, n), generator=gen).to(x.device)
    rows = (offs[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offs[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    flip = torch.rand((n,), generator=gen).to(x.device) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


__all__ = ["BF16_MAX_LOSS_REL_DIFF", "BF16_MIN_SPEEDUP", "NORM_MEAN", "NORM_STD", "PRECISIONS", "Normalize",
           "THREADS_MIN_SPEEDUP", "autocast", "calibrate_bf16", "calibrate_threads", "choose_precision",
           "choose_threads", "cpu_features", "crop_flip", "describe_device", "flush_denormal", "intra_op_threads",
           "normalize", "resolve_device"]
