"""Many processes: `protect` on 1 process vs N under torchrun, one thread each, same data and work.

    python -m bench dist                        # synthetic:n=2000, SALM, 5 rounds, 1 vs 2 processes
    python -m bench dist --repeats 3 --nproc 2 4

What one row is: the wall time of the whole command, from start to exit (Python and torch start-up,
the data, the process group, phase 1, the bi-level rounds, the gathered release written once by
rank 0; audit and figure off), for

* ``1 process``: ``python CHILD`` with ``OMP_NUM_THREADS=1``;
* ``N processes``: ``python -m torch.distributed.run --nproc-per-node N CHILD``, ``OMP_NUM_THREADS=1`` in
  every process;

where CHILD is what ``salm-fast protect --data D --method M --seed S --precision P`` does (the same
calls: ``distributed.init_from_env``, ``protect``, ``distributed.finish``) with the method's default
loop held to exactly ``--rounds`` rounds (``min_rounds = max_rounds``): the stop rule could otherwise end
1 and N processes after different numbers of rounds. Runs alternate (1, N, 1, N, ...)
so that a change in the machine's load hits both; the median is reported with the load average
(1 minute) before each run: on a shared machine the numbers move with it. ``fit s`` is the summary's
``seconds`` (rank 0's fit: phase 1, rounds, export, gather), the rest is start-up and writing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MD_BEGIN = "<!-- bench:dist:begin (written by python -m bench dist; edits inside are overwritten) -->"
MD_END = "<!-- bench:dist:end -->"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


#: One protection, as ``salm-fast protect`` runs it, with exactly ``rounds`` bi-level rounds.
CHILD = r"""
import dataclasses, json, sys
import salm_fast
from salm_fast import distributed as D
from salm_fast.methods import METHODS
from salm_fast.runtime import resolve_device

cfg = json.loads(sys.argv[1])
D.init_from_env(resolve_device("cpu"))
loop = dataclasses.replace(METHODS[cfg["method"]].default_loop(), max_rounds=cfg["rounds"], min_rounds=cfg["rounds"])
salm_fast.protect(cfg["data"], cfg["method"], out=cfg["out"], seed=cfg["seed"], precision=cfg["precision"], loop=loop,
                  audit=False, figure=False, device="cpu")
D.finish()
"""


def command(nproc: int, child: Path, cfg: dict) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(child), json.dumps(cfg)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), str(child), json.dumps(cfg)]


def time_one(nproc: int, args, scratch: Path) -> dict:
    out = scratch / f"out{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    child = scratch / "protect_child.py"
    child.write_text(CHILD)
    cfg = {"data": args.data, "method": args.method, "rounds": args.rounds, "seed": args.seed,
           "precision": args.precision, "out": str(out)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(command(nproc, child, cfg), capture_output=True, text=True, env=_env(), cwd=scratch)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # torchrun waits for its workers: theirs count too
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise RuntimeError(f"{nproc} process(es) failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    p = summary["protection"]
    return {"nproc": nproc, "wall_s": wall, "fit_s": summary["seconds"], "cpu_s": cpu, "load_1min": load,
            "rounds": p["rounds"], "surrogate_accuracy": p["surrogate_accuracy"],
            "linf_levels": summary["budget"]["linf_levels"], "l0_max": summary["budget"]["l0_max_per_image"],
            "precision": summary["precision"]["used"], "images": summary["images"]}


def summarize(runs: list[dict], nprocs: list[int]) -> list[dict]:
    rows = []
    base = None
    for n in [1, *nprocs]:
        mine = [r for r in runs if r["nproc"] == n]
        wall = statistics.median(r["wall_s"] for r in mine)
        fit = statistics.median(r["fit_s"] for r in mine)
        cpu = statistics.median(r["cpu_s"] for r in mine)
        if n == 1:
            base = (wall, fit)
        rows.append({"nproc": n, "runs": len(mine), "wall_s": wall, "fit_s": fit, "cpu_s": cpu,
                     "speedup_wall": base[0] / wall, "speedup_fit": base[1] / fit,
                     "load_1min": [round(r["load_1min"], 2) for r in mine], "rounds": sorted({r["rounds"] for r in mine}),
                     "linf_levels": max(r["linf_levels"] for r in mine), "l0_max": max(r["l0_max"] for r in mine),
                     "surrogate_accuracy": [round(r["surrogate_accuracy"], 3) for r in mine]})
    return rows


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "## Many processes (torchrun, CPU)",
        "",
        f"`{result['command']}`. Last run {result['date']}, commit `{result['git_commit']}`; {result['machine']}, "
        f"{result['cores']} cores shared with other jobs (load average before each run in the table).",
        f"`protect --data {c['data']} --method {c['method']} --precision {c['precision']} --no-audit --no-figure` "
        f"(its Python calls, the default loop held to exactly {c['rounds']} rounds) with `OMP_NUM_THREADS=1` in every "
        "process; N processes: the same under "
        f"`torchrun --nproc-per-node N` (gloo). Median of {c['repeats']} alternating run(s). wall: the whole command "
        "(start-up included); fit: rank 0's summary seconds (phase 1, rounds, export, gather); CPU: user + system "
        "seconds of all processes of the command (what the work costs, whatever the other jobs took).",
        "",
        "| processes | wall s | speed-up (wall) | fit s | speed-up (fit) | CPU s | rounds | L-inf / L0 max | "
        "load (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['nproc']} | {r['wall_s']:.1f} | {r['speedup_wall']:.2f}x | {r['fit_s']:.1f} | "
                     f"{r['speedup_fit']:.2f}x | {r['cpu_s']:.0f} | {', '.join(map(str, r['rounds']))} | "
                     f"{r['linf_levels']}/255, "
                     f"{r['l0_max']} px | {', '.join(f'{x:.1f}' for x in r['load_1min'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from bench.kernels import _cpu_model, _git
    from bench.speed import write_section

    parser = argparse.ArgumentParser(prog="python -m bench dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic:n=2000")
    parser.add_argument("--method", default="salm", choices=["salm", "generator", "samplewise", "classwise"])
    parser.add_argument("--rounds", type=int, default=5, help="bi-level rounds, exactly (the stop rule is held off)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts compared with 1")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="fixed by default: auto times bf16 vs fp32 and could choose differently per run")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results_dist.json")
    parser.add_argument("--md", type=Path, default=BENCH_DIR / "RESULTS.md", help="its dist section is rewritten")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or any(n < 2 for n in args.nproc):
        parser.error("--rounds and --repeats >= 1, --nproc >= 2")
    cmd = " ".join(["python -m bench dist", *(argv if argv is not None else sys.argv[1:])])
    runs = []
    with tempfile.TemporaryDirectory(prefix="salm-bench-dist-") as tmp:
        for i in range(args.repeats):
            for n in [1, *args.nproc]:
                r = time_one(n, args, Path(tmp))
                runs.append(r)
                print(f"repeat {i + 1}: {n} process(es): {r['wall_s']:.1f} s wall, fit {r['fit_s']:.1f} s, "
                      f"CPU {r['cpu_s']:.1f} s, "
                      f"{r['rounds']} rounds, load {r['load_1min']:.1f}", flush=True)
    result = {"benchmark": "dist", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown", "machine": _cpu_model(),
              "cores": os.cpu_count(), "command": cmd,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("out", "md", "no_md")},
              "rows": summarize(runs, args.nproc), "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    print("\n" + section)
    print(f"wrote {args.out}")
    if not args.no_md:
        write_section(args.md, f"{MD_BEGIN}\n{section}{MD_END}", MD_BEGIN, MD_END)
        print(f"wrote the dist section of {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
