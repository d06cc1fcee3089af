"""Kernel benchmark: every fused op as eager PyTorch, the ``torch`` reference backend and
the native backend (``cpp`` on CPU; ``triton`` on CUDA when a GPU is present).

    python -m bench kernels            # N=256, C in {1, 3}, H=W in {28, 64, 224}, k = 10%
    python -m bench kernels --quick    # a small subset (smoke run), RESULTS.md untouched

What one timing includes: the wall-clock time (``time.perf_counter``; on CUDA between two
``torch.cuda.synchronize()``) of one call, median of ``repeats`` calls after ``warmup``
calls. The backend columns call the backend functions with preallocated outputs (the
backend contract: the dispatcher allocates, the backend fills), which excludes argument
validation and the page faults of freshly allocated outputs; the ``pgd_step (alloc)`` row
calls the public ``salm_fast.ops.pgd_step`` without ``out=`` for every variant instead
(the registered op: argument checks, the value checks' extra read of the inputs, allocation).
Eager PyTorch is the unfused composition a user would write, temporaries and all.
Bytes moved count each input read once and each output written once; GB/s is bytes over
the median time, and "% copy" compares it with the copy bandwidth measured in the same
run (2 x bytes / time of ``dst.copy_(src)`` on large preallocated buffers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

import salm_fast.ops as ops
from salm_fast.ops import _backends

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EPS = 8 / 255  # L-inf budget (DESIGN.md default)
ALPHA = 0.8 / 255  # PGD step; error-minimizing, so the signed step is -ALPHA
MD_BEGIN = "<!-- bench:kernels:begin (written by python -m bench kernels; edits inside are overwritten) -->"
MD_END = "<!-- bench:kernels:end -->"


@dataclass(frozen=True)
class Config:
    n: int = 256  # images per batch
    channels: tuple[int, ...] = (1, 3)
    sizes: tuple[int, ...] = (28, 64, 224)  # H = W, pixels
    k_fraction: float = 0.1  # top-k as a fraction of H*W
    repeats: int = 7  # timed calls per variant (median reported)
    warmup: int = 1  # untimed calls first
    copy_mib: int = 256  # size of each copy-bandwidth buffer, MiB
    dtype: str = "float32"
    cuda: bool = True  # also benchmark CUDA (eager vs triton) when a GPU is present


FULL = Config()
QUICK = Config(n=16, channels=(3,), sizes=(28, 64), repeats=3, copy_mib=64)


# ------------------------------------------------------------------ timing
def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


#: A variant whose warm-up call is slow gets fewer timed calls (at least 3), so that the
#: full run stays within minutes (the reference top-k sorts every image).
SLOW_BUDGET_S = 10.0


def time_call(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> dict:
    """Wall-clock statistics of ``fn()`` in milliseconds over ``repeats`` calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    if warmup:
        per_call = (time.perf_counter() - t0) / warmup
        if per_call * repeats > SLOW_BUDGET_S:
            repeats = max(min(3, repeats), int(SLOW_BUDGET_S / per_call))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "std_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
        "n": len(times),
    }


def copy_bandwidth(device: torch.device, mib: int, repeats: int, warmup: int) -> dict:
    """GB/s of ``dst.copy_(src)`` (2 x bytes / median time) on preallocated float32 buffers."""
    numel = mib * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.zeros(numel, device=device)  # written once, so its pages exist before timing
    t = time_call(lambda: dst.copy_(src), max(repeats, 5), warmup, _sync_for(device))
    nbytes = 2 * numel * 4
    return {**t, "bytes": nbytes, "gbps": nbytes / t["median_ms"] / 1e6, "best_gbps": nbytes / t["min_ms"] / 1e6}


# ------------------------------------------------------------------ the ops
@dataclass
class Case:
    op: str
    bytes: int
    eager: Callable[[], object]
    backend: Callable[[ModuleType], Callable[[], object]]  # backend module -> timed call


def _cases(n: int, c: int, size: int, k: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    shape, hw = (n, c, size, size), size * size
    x = torch.rand(shape, generator=gen, dtype=dtype).to(device)
    delta = ((torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * 2 * EPS).to(device)
    g = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    mask = (torch.rand((n, 1, size, size), generator=gen) < k / hw).to(dtype).to(device)
    s = g.abs().sum(1)
    s_out = torch.zeros_like(s)
    m_out = torch.zeros_like(mask)
    out = torch.zeros_like(x)
    item = x.element_size()
    full, plane = x.numel() * item, s.numel() * item

    def eager_topk(sal: torch.Tensor) -> torch.Tensor:
        flat = sal.flatten(1)
        return torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 1.0).view(n, 1, size, size)

    def eager_project(d: torch.Tensor) -> torch.Tensor:
        d = (d * mask).clamp(-EPS, EPS)
        return torch.max(torch.min(d, 1 - x), -x)

    return [
        Case("grad_magnitude p=1", full + plane, lambda: g.abs().sum(1),
             lambda b: lambda: b.grad_magnitude(g, 1, s_out)),
        Case("topk_mask", plane + plane, lambda: eager_topk(s),
             lambda b: lambda: b.topk_mask(s, k, m_out)),
        Case("saliency_topk_mask p=1", full + plane, lambda: eager_topk(g.abs().sum(1)),
             lambda b: lambda: b.saliency_topk_mask(g, k, 1, m_out)),
        Case("masked_linf_project", 3 * full + plane, lambda: eager_project(delta),
             lambda b: lambda: b.masked_linf_project(x, delta, mask, EPS, out)),
        Case("pgd_step", 4 * full + plane, lambda: eager_project(delta - ALPHA * g.sign()),
             lambda b: lambda: b.pgd_step(x, delta, g, mask, EPS, -ALPHA, out)),
        Case("pgd_step (alloc)", 4 * full + plane, lambda: eager_project(delta - ALPHA * g.sign()),
             lambda b: lambda: ops.pgd_step(x, delta, g, mask, EPS, ALPHA, backend=b.NAME)),
    ]


def _backend(name: str) -> tuple[ModuleType | None, str]:
    status = _backends.backend_status(name)
    return (_backends._load(name)[0], "") if status.available else (None, status.reason)


# ------------------------------------------------------------------ run
def _device_rows(device: torch.device, cfg: Config, copy_gbps: float, log: Callable[[str], None]) -> list[dict]:
    dtype = getattr(torch, cfg.dtype)
    native_name = "triton" if device.type == "cuda" else "cpp"
    variants = {"torch": _backend("torch"), native_name: _backend(native_name)}
    sync = _sync_for(device)
    rows = []
    for size in cfg.sizes:
        for c in cfg.channels:
            k = ops.resolve_k(cfg.k_fraction, size * size)
            for case in _cases(cfg.n, c, size, k, dtype, device):
                timings: dict[str, dict | None] = {"eager": time_call(case.eager, cfg.repeats, cfg.warmup, sync)}
                notes = {}
                for name, (module, reason) in variants.items():
                    if module is None:
                        timings[name], notes[name] = None, reason
                        continue
                    timings[name] = time_call(case.backend(module), cfg.repeats, cfg.warmup, sync)
                gbps = {v: case.bytes / t["median_ms"] / 1e6 for v, t in timings.items() if t is not None}
                rows.append({
                    "device": device.type,
                    "op": case.op,
                    "shape": [cfg.n, c, size, size],
                    "k": k,
                    "dtype": cfg.dtype,
                    "bytes": case.bytes,
                    "native": native_name,
                    "timings": timings,
                    "gbps": gbps,
                    "frac_copy": {v: b / copy_gbps for v, b in gbps.items()},
                    "speedup_vs_eager": {v: timings["eager"]["median_ms"] / t["median_ms"]
                                         for v, t in timings.items() if t is not None and v != "eager"},
                    "unavailable": notes,
                })
                log(_row_line(rows[-1]))
    return rows


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    """/proc/cpuinfo's model name, with family/model (a VM may show only "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # first processor only
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info() -> dict:
    cpp, _ = _backend("cpp")
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpp_threads": cpp.num_threads() if cpp is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1m": _load_average(),  # > the CPU count: other work shared the machine
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(cfg: Config, log: Callable[[str], None] = lambda line: None) -> dict:
    """Benchmark every op on the CPU (and on CUDA when present); the results as a dict."""
    devices = [torch.device("cpu")]
    if cfg.cuda and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    result = {
        "benchmark": "kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": "",
        "machine": machine_info(),
        "config": asdict(cfg),
        "copy_bandwidth": {},
        "rows": [],
    }
    for device in devices:
        bw = copy_bandwidth(device, cfg.copy_mib, cfg.repeats, cfg.warmup)
        result["copy_bandwidth"][device.type] = bw
        log(f"[{device.type}] copy bandwidth {bw['gbps']:.1f} GB/s (median; best {bw['best_gbps']:.1f})")
        result["rows"] += _device_rows(device, cfg, bw["gbps"], log)
    result["load_average_1m_end"] = _load_average()
    return result


# ------------------------------------------------------------------ reporting
def _fmt_ms(t: dict | None) -> str:
    return "n/a" if t is None else f"{t['median_ms']:.2f}"


def _row_line(r: dict) -> str:
    nat = r["native"]
    shape = "x".join(map(str, r["shape"]))
    speed = r["speedup_vs_eager"].get(nat)
    return (f"[{r['device']}] {r['op']:24s} {shape:14s} eager {_fmt_ms(r['timings']['eager']):>8s} ms  "
            f"torch {_fmt_ms(r['timings']['torch']):>8s} ms  {nat} {_fmt_ms(r['timings'][nat]):>8s} ms  "
            + (f"{r['gbps'][nat]:6.1f} GB/s  {100 * r['frac_copy'][nat]:5.1f}% copy  x{speed:.1f} vs eager"
               if speed is not None else ""))


def _load_note(start: float | None, end: float | None, cpus: int | None) -> str:
    if start is None or end is None or not cpus or max(start, end) <= 0.5 * cpus:
        return ""
    return (f" The machine was shared during the run (1-minute load average {start:.1f} at the start, {end:.1f} "
            f"at the end, on {cpus} CPUs): timings are noisy and multi-threaded calls wait for CPU time.")


def markdown(result: dict) -> str:
    """The "## Kernels (CPU)" section of RESULTS.md (plus a CUDA table when there are CUDA rows)."""
    m, cfg = result["machine"], result["config"]
    lines = [
        "## Kernels (CPU)",
        "",
        f"`python -m bench kernels` on {result['date']}, commit `{result['git_commit']}`"
        + (" (with uncommitted changes)" if result["git_dirty"] else "") + ".",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch {m['torch']} with {m['torch_threads']} "
        f"threads, cpp backend {m['cpp_threads']} OpenMP threads" + (f"; GPU {m['cuda_device']}" if m["cuda_device"]
                                                                     else "") + "."
        + _load_note(m["load_average_1m"], result.get("load_average_1m_end"), m["logical_cpus"]),
        "",
        f"- Time: median of {cfg['repeats']} calls (at least 3 where one call takes over "
        f"{SLOW_BUDGET_S / cfg['repeats']:.1f} s) after {cfg['warmup']} warm-up call(s), wall clock, in ms; "
        f"{cfg['dtype']}, k = {cfg['k_fraction']:g} x H*W, eps = 8/255.",
        "- **eager**: the unfused PyTorch a user would write (`g.abs().sum(1)`; `s.flatten(1).topk(k)` + "
        "`zeros.scatter_`; `(delta*mask).clamp(-eps, eps)` then `torch.max(torch.min(d, 1-x), -x)`; "
        "`delta + alpha*g.sign()` then the projection); it allocates its temporaries and result on every call.",
        "- **torch** / **cpp**: the backend functions with preallocated outputs (the backend contract), so "
        "neither argument checks nor the page faults of fresh large allocations are timed; "
        "the `pgd_step (alloc)` row calls the public `ops.pgd_step` without `out=` (allocating, with its argument "
        "and value checks) for every column.",
        "- **GB/s**: bytes moved (each input read once, each output written once) / median time; "
        "**% copy**: that over the copy bandwidth of `dst.copy_(src)` measured in the same run "
        f"(2 x bytes / time, {cfg['copy_mib']} MiB float32 buffers). Small shapes fit in the caches and "
        "can exceed the DRAM copy bandwidth.",
        "- eager `topk` breaks ties in an unspecified order; the backends implement the exact tie rule.",
        "",
    ]
    for device, title in (("cpu", None), ("cuda", "### CUDA")):
        rows = [r for r in result["rows"] if r["device"] == device]
        if not rows:
            continue
        bw = result["copy_bandwidth"][device]
        nat = rows[0]["native"]
        if title:
            lines += [title, ""]
        lines += [
            f"Copy bandwidth ({device}): {bw['gbps']:.1f} GB/s (median; best {bw['best_gbps']:.1f}).",
            "",
            f"| op | N x C x H x W | k | MB moved | eager ms | torch ms | {nat} ms | {nat} min ms | {nat} GB/s "
            f"| % copy | {nat} vs eager |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            t = r["timings"]
            speed = r["speedup_vs_eager"].get(nat)
            ok = t[nat] is not None
            lines.append(
                f"| {r['op']} | {' x '.join(map(str, r['shape']))} | {r['k']} | {r['bytes'] / 1e6:.1f} "
                f"| {_fmt_ms(t['eager'])} | {_fmt_ms(t['torch'])} | {_fmt_ms(t[nat])} | {t[nat]['min_ms']:.2f} "
                f"| {r['gbps'][nat]:.1f} | {100 * r['frac_copy'][nat]:.0f}% | {speed:.1f}x |" if ok else
                f"| {r['op']} | {' x '.join(map(str, r['shape']))} | {r['k']} | {r['bytes'] / 1e6:.1f} "
                f"| {_fmt_ms(t['eager'])} | {_fmt_ms(t['torch'])} | n/a ({r['unavailable'].get(nat, '')}) "
                f"| | | | |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown_section(path: Path, section: str) -> None:
    """Put ``section`` between this benchmark's markers in ``path``, keeping everything else."""
    block = f"{MD_BEGIN}\n{section}{MD_END}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if MD_BEGIN in text and MD_END in text:
        head, rest = text.split(MD_BEGIN, 1)
        tail = rest.split(MD_END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


# ------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subset (N=16, C=3, H=W in {28, 64}, 3 repeats)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results_kernels.json; --quick: results_kernels.quick.json)")
    parser.add_argument("--md", type=Path, default=None,
                        help="Markdown file whose kernel section is rewritten (default bench/RESULTS.md; "
                             "--quick: none)")
    parser.add_argument("--no-md", action="store_true", help="do not touch any Markdown file")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (median reported)")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even when a GPU is present")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(THREADS) first (the cpp backend follows torch's count)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    cfg = QUICK if args.quick else FULL
    overrides = {}
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        overrides["repeats"] = args.repeats
    if args.no_cuda:
        overrides["cuda"] = False
    if overrides:
        cfg = Config(**{**asdict(cfg), **overrides})
    out = args.out or BENCH_DIR / ("results_kernels.quick.json" if args.quick else "results_kernels.json")
    md = None if args.no_md else args.md or (None if args.quick else BENCH_DIR / "RESULTS.md")

    result = run(cfg, log=lambda line: print(line, flush=True))
    result["command"] = " ".join(["python -m bench kernels", *(argv if argv is not None else sys.argv[1:])])
    write_json(result, out)
    section = markdown(result)
    print("\n" + section)
    print(f"wrote {out}")
    if md is not None:
        write_markdown_section(md, section)
        print(f"wrote the kernel section of {md}")
    return 0
