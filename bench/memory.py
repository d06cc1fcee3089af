"""Memory benchmark: peak resident memory of a protection against the size of the data set.

    python -m bench memory                       # n = 2000 and 8000 synthetic 224 px RGB images, SALM
    python -m bench memory --methods salm samplewise classwise --noise-storage int8   # the PGD methods too
    python -m bench memory --n 200 --size 64     # a quick run
    python -m bench memory --pythonpath OLD_CHECKOUT --n 2000   # the same measurement of another version

What one row is: a fresh Python process runs one ``salm_fast.protect`` of a method (a short run: one
round, one surrogate step per round; SALM: one epoch of mask training and one generator step; the PGD
methods (samplewise, classwise): one PGD step per batch over the whole set: memory depends on the data
and the batch, not on how many steps run) on a MedMNIST-style ``.npz`` written beforehand by another
process, and reports its own peak resident set (``VmHWM`` of ``/proc/self/status``, which
counts anonymous memory and the pages of memory-mapped files alike), and the peak of its anonymous
memory alone (``RssAnon``, sampled every 20 ms by a thread: the memory-mapped data is not in it).
Columns:

* ``baseline``: resident after importing torch and salm_fast, before the data is opened;
* ``data``: the images in the file (uint8, all splits), ``release``: the perturbed split's release
  bytes (uint8), which the protection holds in memory before it writes them;
* ``beyond data``: peak - baseline - data: what the protection itself holds (models, batches, masks,
  noise, the release arrays, temporaries), at most (the data's pages need not all be resident at the
  peak). The target is <= 2 GiB and flat in n;
* ``peak anon``: the sampled peak of anonymous memory less its baseline: the same, without any page
  of the data file;
* ``growth``: how ``beyond data`` grows per train image between the smallest and largest n of a method:
  the per-image state a method keeps (the release arrays, SALM's uint8 mask, a sample-wise noise's
  int8 levels).

The file is written uncompressed (``np.savez``), so the current code memory-maps it; a version that
reads it whole holds the same bytes in anonymous memory instead. The audit that ``protect`` runs by
default is left out (``audit=False``): it is a separate check with its own victim training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MD_BEGIN = "<!-- bench:memory:begin (written by python -m bench memory; edits inside are overwritten) -->"
MD_END = "<!-- bench:memory:end -->"
MIB = 1 << 20

#: Writes the synthetic set as an uncompressed MedMNIST-style .npz (a process of its own: the rendering's
#: float temporaries are not the protection's).
MAKE_DATA = r"""
import sys, numpy as np
from salm_fast.data import make_synthetic
n, size, channels, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
n_val, n_test = round(0.1 * n), round(0.2 * n)
ds = make_synthetic(n_train=n - n_val - n_test, n_val=n_val, n_test=n_test, size=size, channels=channels, seed=0)
arrays = {f"{s}_images": ds[s].images for s in ds.splits}
arrays.update({f"{s}_labels": ds[s].labels.astype(np.uint8) for s in ds.splits})
np.savez(path, **arrays)
print(sum(ds[s].images.nbytes for s in ds.splits), ds["train"].images.nbytes)
"""

#: The measured process: one protection, then its own peak resident set.
PROTECT = r"""
import inspect, json, sys, threading, time

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None

peak_anon, done = [0], threading.Event()
def sample():  # RssAnon has no high-water mark of its own
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon") or 0)
        done.wait(0.02)

import torch
import salm_fast
from salm_fast import protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.methods import SALM
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
baseline, baseline_anon = status("VmRSS"), status("RssAnon")
threading.Thread(target=sample, daemon=True).start()
params = inspect.signature(protect).parameters
extra = {k: v for k, v in (("audit", False), ("device", "cpu")) if k in params}
method = cfg.get("method", "salm")
if method == "salm":
    extra.update(k=0.2, mask_epochs=1, generator_steps=1)
    if "mask_batch_size" in SALM.option_names():  # a version without it trains the mask surrogate in batches of 128
        extra["mask_batch_size"] = cfg["batch_size"]
else:  # samplewise, classwise: one PGD step per batch
    extra["steps"] = 1
if cfg.get("noise_storage"):
    extra["noise_storage"] = cfg["noise_storage"]
loop = BiLevelConfig(max_rounds=cfg["rounds"], min_rounds=1, surrogate_steps=1, batch_size=cfg["batch_size"],
                     eval_images=cfg["batch_size"], precision="auto", augment=method == "salm")
t0 = time.perf_counter()
r = protect(cfg["data"], method, out=cfg["out"], eps=8 / 255, seed=0, splits="train", loop=loop, **extra)
info = r.summary.get("protection") or {}
done.set()
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "baseline_anon": baseline_anon,
                  "peak_anon": peak_anon[0], "seconds": time.perf_counter() - t0,
                  "precision": r.summary["precision"]["used"], "salm_fast": salm_fast.__file__,
                  "images": r.summary["images"],
                  "noise_storage": info.get("noise_storage")}))
"""


def _env(pythonpath: str | None) -> dict[str, str]:
    """The children import salm_fast from ``pythonpath``, else from this checkout (they run in a scratch
    folder: ``python -c`` puts its working directory first on the path, which must not hold a salm_fast)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pythonpath or str(REPO_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def measure(n: int, size: int, channels: int, *, rounds: int, batch_size: int, threads: int,
            pythonpath: str | None, workdir: Path, log=print, method: str = "salm",
            noise_storage: str | None = None) -> dict:
    """One row: write the data (a process of its own), protect it with ``method`` in a fresh process, read
    its peak. ``noise_storage``: the methods' option (None: their default)."""
    data = workdir / f"synthetic_{n}_{size}_{channels}.npz"
    made = subprocess.run([sys.executable, "-c", MAKE_DATA, str(n), str(size), str(channels), str(data)],
                          capture_output=True, text=True, env=_env(None), cwd=workdir, check=True)
    data_bytes, train_bytes = map(int, made.stdout.split())
    cfg = {"data": str(data), "out": str(workdir / f"out_{method}_{n}"), "rounds": rounds, "batch_size": batch_size,
           "threads": threads, "method": method, "noise_storage": noise_storage}
    run = subprocess.run([sys.executable, "-c", PROTECT, json.dumps(cfg)], capture_output=True, text=True,
                         env=_env(pythonpath), cwd=workdir)
    data.unlink(missing_ok=True)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["no output"]
        row = {"n": n, "size": size, "channels": channels, "method": method, "error": tail[0]}
        log(f"{method} n={n}: failed: {tail[0]}")
        return row
    res = json.loads(run.stdout.strip().splitlines()[-1])
    beyond = res["peak"] - res["baseline"] - data_bytes
    anon = res["peak_anon"] - res["baseline_anon"] if res.get("peak_anon") else None
    row = {"n": n, "size": size, "channels": channels, "method": method, "noise_storage": res.get("noise_storage"),
           "train_images": res["images"], "data_bytes": data_bytes,
           "release_bytes": train_bytes, "baseline_bytes": res["baseline"], "peak_bytes": res["peak"],
           "beyond_data_bytes": beyond, "peak_anon_bytes": anon, "seconds": res["seconds"], "precision": res["precision"],
           "code": str(Path(res["salm_fast"]).parent.parent)}
    log(f"{method} n={n}: peak {res['peak'] / MIB:.0f} MiB (baseline {res['baseline'] / MIB:.0f}, data {data_bytes / MIB:.0f}, "
        f"release {train_bytes / MIB:.0f}) -> beyond data {beyond / MIB:.0f} MiB, anonymous "
        f"{(anon or 0) / MIB:.0f} MiB, {res['seconds']:.0f} s")
    return row


#: ``beyond data`` growing by less than this per train image counts as flat in n (measurement noise: a
#: few MiB over thousands of images).
FLAT_BYTES_PER_IMAGE = 2048


def _key(r: dict) -> tuple:
    return (r.get("label"), r.get("method", "salm"), r.get("noise_storage"), r.get("size"), r.get("channels"),
            r.get("batch_size"))


def growth(rows: list[dict]) -> dict[tuple, float]:
    """Bytes ``beyond data`` grows by per train image, between the smallest and the largest n of each
    (label, method, noise storage, size, channels) with at least two measured n."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault(_key(r), []).append(r)
    out = {}
    for key, rs in groups.items():
        lo, hi = min(rs, key=lambda r: r["n"]), max(rs, key=lambda r: r["n"])
        if hi["train_images"] > lo["train_images"]:
            out[key] = (hi["beyond_data_bytes"] - lo["beyond_data_bytes"]) / (hi["train_images"] - lo["train_images"])
    return out


def markdown(result: dict) -> str:
    c = result["config"]
    commands = list(dict.fromkeys(r.get("command", result["command"]) for r in result["rows"]))
    slopes = growth(result["rows"])
    lines = [
        "## Memory (protection, streamed data)",
        "",
        "Commands: " + "; ".join(f"`{cmd}`" for cmd in commands) + f". Last run {result['date']}, commit "
        f"`{result['git_commit']}`; {result['machine']}.",
        f"One round, one surrogate step per round (SALM: mask_epochs 1, one generator step; samplewise and "
        f"classwise: one PGD step per batch over the whole set), batch = the loop's and the mask training's, "
        f"{c['threads']} thread(s), synthetic {c['size']} px, {c['channels']} channel(s), perturbing the train "
        "split (70% of n), read from an uncompressed .npz; audit off. Peak = VmHWM of the protecting process. "
        "beyond data = peak - baseline - data (MiB; the release arrays count); peak anon = the sampled peak of "
        "anonymous memory (no page of the data file) less its baseline; growth = how beyond data grows per "
        "train image "
        f"between the smallest and the largest n (KiB; flat: under {FLAT_BYTES_PER_IMAGE // 1024} KiB); load = "
        "the 1-minute load average when the row started.",
        "",
        "| code | method | noise | batch | n | train images | data MiB | release MiB | baseline MiB | peak MiB "
        "| beyond data MiB | peak anon MiB | growth KiB/image | load | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (str(r.get("label")), r.get("method", "salm"), r["n"])):
        head = (f"| {r.get('label', '')} | {r.get('method', 'salm')} | {r.get('noise_storage') or '-'} "
                f"| {r.get('batch_size', '')} | {r['n']} ")
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | | | | | |")
            continue
        slope = slopes.get(_key(r))
        flat = "" if slope is None else f"{slope / 1024:.1f} ({'flat' if slope < FLAT_BYTES_PER_IMAGE else 'grows'})"
        load, anon = r.get("load_average"), r.get("peak_anon_bytes")
        lines.append(head + f"| {r['train_images']} | {r['data_bytes'] / MIB:.0f} "
                     f"| {r['release_bytes'] / MIB:.0f} | {r['baseline_bytes'] / MIB:.0f} | {r['peak_bytes'] / MIB:.0f} "
                     f"| {r['beyond_data_bytes'] / MIB:.0f} | {'' if anon is None else f'{anon / MIB:.0f}'} | {flat} | {'' if load is None else f'{load:.1f}'} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from bench.kernels import _cpu_model, _git
    from bench.speed import write_section

    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 8000], help="images in the set (all splits)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--methods", nargs="+", default=["salm"], choices=["salm", "samplewise", "classwise"],
                        help="methods to measure, one row per method and n")
    parser.add_argument("--noise-storage", default=None, choices=["auto", "float", "int8"],
                        help="the methods' noise_storage option (a sample-wise noise's per-image state; default: "
                             "the methods' own, auto)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="the loop's and the mask training's batch (memory grows with it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pythonpath", default=None, help="measure the salm_fast found here (another checkout)")
    parser.add_argument("--label", default="this", help="the code column of the table (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results_memory.json",
                        help="JSON results; rows of other labels or n already there are kept")
    parser.add_argument("--md", type=Path, default=BENCH_DIR / "RESULTS.md", help="its memory section is rewritten")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args(argv)
    if any(n < 10 for n in args.n) or args.size < 16 or args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--n >= 10, --size >= 16, --rounds, --batch-size and --threads >= 1")
    command = " ".join(["python -m bench memory", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="salm-bench-memory-") as tmp:
        for method in args.methods:
            for n in args.n:
                load = os.getloadavg()[0]
                row = measure(n, args.size, args.channels, rounds=args.rounds, batch_size=args.batch_size,
                              threads=args.threads, pythonpath=args.pythonpath, workdir=Path(tmp),
                              log=lambda line: print(line, flush=True), method=method,
                              noise_storage=args.noise_storage)
                rows.append({**row, "label": args.label, "command": command, "load_average": load,
                             "batch_size": args.batch_size, "threads": args.threads,
                             "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown"})
    previous = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    new_keys = {(_key(r), r["n"]) for r in rows}
    kept = [r for r in previous if (_key({"method": "salm", **r}), r.get("n")) not in new_keys]
    result = {"benchmark": "memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown", "machine": _cpu_model(),
              "command": command, "config": {k: v for k, v in vars(args).items() if k not in ("out", "md", "no_md")},
              "rows": kept + rows}
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    section = markdown(result)
    print("\n" + section)
    print(f"wrote {args.out}")
    if not args.no_md:
        write_section(args.md, f"{MD_BEGIN}\n{section}{MD_END}", MD_BEGIN, MD_END)
        print(f"wrote the memory section of {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
