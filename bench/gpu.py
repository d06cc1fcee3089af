"""GPU proof: the fused ops on CUDA (Triton) against eager PyTorch and the device's copy bandwidth, and
end-to-end SALM protection images/s. One command, a few minutes on an H100/H200-class GPU:

    python -m bench gpu                                  # from a source checkout, on a machine with CUDA
    python -m bench gpu --data path/to/pneumoniamnist.npz --out bench/results_gpu.json

On a machine without CUDA it prints one line saying so and exits 0. ``--device cpu`` runs the same
code on the CPU (the native backend is then ``cpp``; ``--quick`` keeps it small): a check of the
benchmark itself, not a GPU measurement.

Ops (each at 28, 64 and 224 px, C = 3; N chosen so that one image tensor is ``--tensor-mb`` MB at
every size: 64 images at 224 px, 4,096 at 28 px): ``grad_magnitude`` (p=1), ``topk_mask``,
``saliency_topk_mask`` (k = 10% of H*W), ``masked_linf_project`` forward and forward + backward,
``pgd_step``, and ``pgd_step (alloc)`` (the public op: argument and value checks, allocation).
Variants, as in ``bench/kernels.py``: **eager** (the unfused PyTorch a user would write,
temporaries and all), **torch** (the reference backend) and **triton** (the native backend on
CUDA), the backends called with preallocated outputs. Bytes moved count each input read once
and each output written once (``bench/kernels.py``'s rule); **copy** is ``dst.copy_(src)`` moving
the same number of bytes (half read, half written), timed the same way, so **% copy** is the
op's bandwidth as a share of what a plain copy of its bytes reaches on this device.

Timing: CUDA events around a block of back-to-back calls (as many as make the block last
>= 1 ms, so launch gaps do not dominate small shapes), the block time divided by its calls;
median over ``--repeats`` blocks after ``--warmup`` calls (which include Triton's compilation).
A failing op prints its error in its row; the others continue.

End to end: ``salm_fast.protect`` with SALM's defaults on the device (Triton kernels, bf16 autocast
where the GPU has it), PneumoniaMNIST (``--data``; skipped with a line saying so when the file is
absent: the machine's checkout may not hold the shared data; copy it into an ignored folder of the
checkout and pass its path) and synthetic 224 px RGB (``--synthetic-n`` images, ``--e2e-rounds``
rounds), each timed from the call to the published output; images/s is the summary's (images
protected / seconds in ``fit``). Results: a table on stdout and ``bench/results_gpu.json`` with the
device name and the torch / Triton / CUDA versions.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EPS = 8 / 255
ALPHA = 0.8 / 255
BLOCK_MS = 1.0  # a timed block of calls lasts at least this long
MAX_CALLS_PER_BLOCK = 2000
DEFAULT_DATA = Path("../shared/data/medmnist/pneumoniamnist.npz")


def no_cuda_line() -> str:
    return f"bench gpu: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); " \
           "nothing measured"


def ensure_kernels_importable() -> str:
    """``salm_fast.kernels`` from an install, else from this checkout's ``kernels/`` (setup.py maps it there;
    a plain checkout on a fresh machine has no install). Returns where it came from."""
    try:
        import salm_fast.kernels as k

        return str(Path(k.__file__).parent)
    except ImportError:
        pass
    init = REPO_DIR / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location("salm_fast.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        raise ImportError(f"no Triton kernels at {init.parent}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["salm_fast.kernels"] = module
    spec.loader.exec_module(module)
    import salm_fast

    salm_fast.kernels = module  # type: ignore[attr-defined]
    return str(init.parent)


# ------------------------------------------------------------------ timing
class Timer:
    """Median time of one call (ms): CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _block(self, fn: Callable[[], object], calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], object]) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        one = max(self._block(fn, 1), 1e-3)
        calls = max(1, min(MAX_CALLS_PER_BLOCK, math.ceil(BLOCK_MS / one)))
        times = [self._block(fn, calls) / calls for _ in range(self.repeats)]
        return {"median_ms": statistics.median(times), "min_ms": min(times), "blocks": len(times),
                "calls_per_block": calls}


# ------------------------------------------------------------------ the ops
def op_cases(n: int, c: int, size: int, k: int, device: torch.device) -> list:
    """``bench/kernels.py``'s cases (same data, bytes and eager compositions) plus the projection's
    forward + backward."""
    from bench.kernels import Case, _cases

    cases = _cases(n, c, size, k, torch.float32, device)
    gen = torch.Generator().manual_seed(1)
    shape = (n, c, size, size)
    x = torch.rand(shape, generator=gen).to(device)
    delta = ((torch.rand(shape, generator=gen) * 2 - 1) * 2 * EPS).to(device)
    mask = (torch.rand((n, 1, size, size), generator=gen) < k / (size * size)).float().to(device)
    grad_out = torch.randn(shape, generator=gen).to(device)
    out, grad_delta = torch.empty_like(x), torch.empty_like(x)
    full, plane = x.numel() * 4, mask.numel() * 4

    def eager_fwd_bwd():
        d = delta.detach().requires_grad_(True)
        p = (d * mask).clamp(-EPS, EPS)
        torch.max(torch.min(p, 1 - x), -x).backward(grad_out)

    def backend_fwd_bwd(b):
        def call():
            b.masked_linf_project(x, delta, mask, EPS, out)
            b.masked_linf_project_backward(x, delta, mask, EPS, grad_out, grad_delta, None)
        return call

    # Forward: x, delta, mask in, out written; backward: x, delta, mask, grad_out in, grad_delta written.
    cases.insert(4, Case("masked_linf_project fwd+bwd", 7 * full + 2 * plane, eager_fwd_bwd, backend_fwd_bwd))
    return cases


def copy_case(nbytes: int, device: torch.device) -> Callable[[], object]:
    """``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written)."""
    numel = max(1, nbytes // 8)
    src = torch.ones(numel, device=device)
    dst = torch.zeros(numel, device=device)
    return lambda: dst.copy_(src)


def op_rows(device: torch.device, sizes: Sequence[int], channels: int, tensor_mb: float, timer: Timer,
            log: Callable[[str], None]) -> list[dict]:
    from salm_fast import ops
    from salm_fast.ops import _backends

    native = "triton" if device.type == "cuda" else "cpp"
    variants = {}
    for name in ("torch", native):
        status = _backends.backend_status(name)
        variants[name] = (_backends._load(name)[0], "") if status.available else (None, status.reason)
    rows = []
    for size in sizes:
        n = max(1, round(tensor_mb * 1e6 / (4 * channels * size * size)))
        k = ops.resolve_k(0.1, size * size)
        try:
            cases = op_cases(n, channels, size, k, device)
        except Exception as exc:  # e.g. out of memory: the other sizes still run
            rows.append({"op": "(inputs)", "shape": [n, channels, size, size], "error": _one_line(exc)})
            log(f"{size:>3} px: could not build the inputs: {_one_line(exc)}")
            continue
        for case in cases:
            row = {"op": case.op, "shape": [n, channels, size, size], "k": k, "bytes": case.bytes, "native": native,
                   "timings": {}, "errors": {}}
            for vname, fn in [("eager", case.eager), ("copy", copy_case(case.bytes, device)),
                              *[(name, None) for name in variants]]:
                try:
                    if fn is None:
                        module, reason = variants[vname]
                        if module is None:
                            raise RuntimeError(f"backend unavailable: {reason}")
                        fn = case.backend(module)
                    row["timings"][vname] = timer(fn)
                except Exception as exc:  # a failing variant is reported in its row; the rest continue
                    row["errors"][vname] = _one_line(exc)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
            t = row["timings"]
            row["gbps"] = {v: case.bytes / tv["median_ms"] / 1e6 for v, tv in t.items()}
            if "copy" in t:
                row["frac_copy"] = {v: t["copy"]["median_ms"] / tv["median_ms"] for v, tv in t.items() if v != "copy"}
            if "eager" in t:
                row["speedup_vs_eager"] = {v: t["eager"]["median_ms"] / tv["median_ms"]
                                           for v, tv in t.items() if v not in ("eager", "copy")}
            rows.append(row)
            log(row_line(row))
        del cases  # free this size's inputs before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ end to end
def protect_row(label: str, data, device: torch.device, log: Callable[[str], None], **options) -> dict:
    from salm_fast import protect

    row: dict = {"dataset": label, "options": {k: str(v) for k, v in options.items()}}
    try:
        with tempfile.TemporaryDirectory(prefix="salm-bench-gpu-") as tmp:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            r = protect(data, "salm", out=Path(tmp) / "out", seed=0, device=device, figure=False, audit=False,
                        **options)
            wall = time.perf_counter() - t0
        s = r.summary
        row.update({"images": s["images"], "fit_seconds": s["seconds"], "wall_seconds": wall,
                    "images_per_second": s["images_per_second"], "precision": s["precision"]["used"],
                    "rounds": s["protection"].get("rounds"), "stopped_because": s["protection"].get("stopped_because"),
                    "linf_levels": s["budget"]["linf_levels"], "l0_max_per_image": s["budget"]["l0_max_per_image"],
                    "device": s.get("device")})
        log(f"protect {label}: {s['images']} images in {s['seconds']:.1f} s ({s['images_per_second']:.0f} images/s; "
            f"wall {wall:.1f} s, {row['rounds']} rounds, {row['precision']})")
    except Exception as exc:
        row["error"] = _one_line(exc)
        row["traceback"] = traceback.format_exc(limit=6)
        log(f"protect {label}: failed: {row['error']}")
    return row


def e2e_rows(device: torch.device, data_path: Path | None, synthetic_n: int, rounds: int, quick: bool,
             log: Callable[[str], None]) -> list[dict]:
    rows = []
    candidates = [p for p in (data_path, REPO_DIR / "shared/data/medmnist/pneumoniamnist.npz") if p is not None]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        log(f"protect PneumoniaMNIST: skipped, no file at {' or '.join(map(str, candidates))} (pass --data PATH)")
        rows.append({"dataset": "pneumoniamnist", "skipped": f"no file at {', '.join(map(str, candidates))}"})
    # --quick: the smallest run that goes through every step (a check of the benchmark, not a measurement).
    extra = {"rounds": 1, "mask_epochs": 1, "generator_steps": 1} if quick else {}
    if found is not None:
        rows.append(protect_row(f"pneumoniamnist ({found.name})", str(found), device, log, **extra))
    spec = f"synthetic:n={synthetic_n},size={32 if quick else 224},channels=3,seed=0"
    rows.append(protect_row(spec, spec, device, log, **{**extra, "rounds": rounds}))
    return rows


# ------------------------------------------------------------------ reporting
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _ms(t: dict | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.3f}"


def row_line(r: dict) -> str:
    if "timings" not in r:
        return f"{r['op']}: {r.get('error', '')}"
    t, nat = r["timings"], r["native"]
    shape = "x".join(map(str, r["shape"]))
    text = (f"{r['op']:28s} {shape:16s} {r['bytes'] / 1e6:8.1f} MB  copy {_ms(t.get('copy'))} ms  "
            f"eager {_ms(t.get('eager'))}  torch {_ms(t.get('torch'))}  {nat} {_ms(t.get(nat))} ms")
    if nat in t:
        text += f"  {r['gbps'][nat]:7.1f} GB/s"
        if "frac_copy" in r:
            text += f"  {100 * r['frac_copy'][nat]:5.1f}% copy"
        if "speedup_vs_eager" in r:
            text += f"  x{r['speedup_vs_eager'][nat]:.1f} vs eager"
    if r["errors"]:
        text += "  errors: " + "; ".join(f"{v}: {e}" for v, e in r["errors"].items())
    return text


def table(result: dict) -> str:
    nat = "triton" if result["device"]["type"] == "cuda" else "cpp"
    lines = [f"## GPU: {result['device']['name']}", "",
             f"`{result['command']}`, torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
             f"CUDA {result['versions']['cuda']}; copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s "
             f"({result['copy_bandwidth_mib']} MiB buffers).", "",
             f"| op | N x C x H x W | MB moved | copy ms | eager ms | torch ms | {nat} ms | {nat} GB/s | % copy "
             f"| vs eager |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["ops"]:
        if "timings" not in r:
            lines.append(f"| {r['op']} | {' x '.join(map(str, r['shape']))} | failed: {r.get('error', '')} "
                         "| | | | | | | |")
            continue
        t = r["timings"]
        ok = nat in t
        cells = [r["op"], " x ".join(map(str, r["shape"])), f"{r['bytes'] / 1e6:.1f}", _ms(t.get("copy")),
                 _ms(t.get("eager")), _ms(t.get("torch")), _ms(t.get(nat)),
                 f"{r['gbps'][nat]:.0f}" if ok else "-",
                 f"{100 * r['frac_copy'][nat]:.0f}%" if ok and "frac_copy" in r else "-",
                 f"{r['speedup_vs_eager'][nat]:.1f}x" if ok and "speedup_vs_eager" in r else "-"]
        if r["errors"]:
            cells[-1] += " (" + "; ".join(f"{v}: {e}" for v, e in r["errors"].items()) + ")"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| protection | images | fit s | wall s | images/s | rounds | precision | L-inf | note |",
              "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in result["end_to_end"]:
        if "images" in r:
            lines.append(f"| {r['dataset']} | {r['images']} | {r['fit_seconds']:.1f} | {r['wall_seconds']:.1f} "
                         f"| {r['images_per_second']:.0f} | {r['rounds']} | {r['precision']} | {r['linf_levels']}/255 "
                         f"| {r.get('stopped_because', '')} |")
        else:
            lines.append(f"| {r['dataset']} | | | | | | | | {r.get('skipped') or r.get('error')} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        from bench.kernels import _cpu_model

        return {"type": device.type, "name": _cpu_model()}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}


# ------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:<i>; cpu checks the benchmark itself")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 224], help="H = W, pixels")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--tensor-mb", type=float, default=38.5, help="MB of one N x C x H x W float32 tensor")
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (Triton compiles on the first)")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffers of the headline copy bandwidth")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz for the end-to-end run")
    parser.add_argument("--synthetic-n", type=int, default=None,
                        help="images of the synthetic 224 px run (default 2000; --quick: 60)")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="bi-level rounds of the synthetic 224 px run")
    parser.add_argument("--no-e2e", action="store_true", help="the ops only")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and runs (a check of the benchmark)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results_gpu.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.tensor_mb <= 0 or any(s < 4 for s in args.sizes):
        parser.error("--repeats >= 1, --warmup >= 0, --tensor-mb > 0, --sizes >= 4")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(no_cuda_line())
        return 0
    if args.quick:
        args.tensor_mb, args.repeats, args.warmup, args.copy_mib = 0.05, 2, 1, 8
    if args.synthetic_n is None:
        args.synthetic_n = 60 if args.quick else 2000
    command = " ".join(["python -m bench gpu", *(argv if argv is not None else sys.argv[1:])])

    def log(line: str) -> None:
        print(line, flush=True)

    t_start = time.perf_counter()
    kernels_from = ensure_kernels_importable()
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    timer = Timer(device, args.repeats, args.warmup)
    info = _device_info(device)
    log(f"bench gpu on {info['name']} ({device}); torch {torch.__version__}; kernels from {kernels_from}")
    copy_bytes = args.copy_mib * 2**20 * 2
    copy_t = timer(copy_case(copy_bytes, device))
    copy_gbps = copy_bytes / copy_t["median_ms"] / 1e6
    log(f"copy bandwidth: {copy_gbps:.0f} GB/s ({args.copy_mib} MiB buffers, {copy_t['median_ms']:.3f} ms)")
    result = {"benchmark": "gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "device": info, "versions": _versions(), "copy_bandwidth_gbps": copy_gbps,
              "copy_bandwidth_mib": args.copy_mib, "config": {k: str(v) for k, v in vars(args).items()},
              "ops": op_rows(device, args.sizes, args.channels, args.tensor_mb, timer, log), "end_to_end": []}
    if not args.no_e2e:
        result["end_to_end"] = e2e_rows(device, args.data, args.synthetic_n, 1 if args.quick else args.e2e_rounds,
                                        args.quick, log)
    result["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(result))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
