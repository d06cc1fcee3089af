"""Protection on real MedMNIST: every method against one victim, the clean reference beside it.

``python -m bench real [--root runs/real] [--victim resnet18] [--epochs 15] [--ks 0.01 0.05 0.1 0.2 0.5]``

Runs an experiment grid (cached and resumable: re-running continues where it stopped)
over BreastMNIST and PneumoniaMNIST from ``--data-dir``: the clean-data victim, random
noise, SALM at each K, sample-wise and class-wise error-minimizing noise and the plain
generator. Each victim is trained from scratch on the stored uint8 release and tested on
the clean test split. Writes the table into ``bench/RESULTS.md`` with the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from salm_fast.experiment import CLEAN, Grid, MethodSpec, dataset_tag

MD_BEGIN = "<!-- bench:real:begin (written by python -m bench real; edits inside are overwritten) -->"
MD_END = "<!-- bench:real:end -->"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"


def methods_for(ks: Sequence[float], extra: Sequence[str]) -> list[str]:
    return [CLEAN, "random", *(f"salm:k={k}" for k in ks), "samplewise", "classwise", "generator", *extra]


def markdown(rows: list[dict], command: str, note: str = "") -> str:
    lines = [MD_BEGIN, "## Protection on real MedMNIST (CPU)", "", f"`{command}`", "", *([note, ""] if note else []),
             "Victim trained from scratch on the stored release (crop+flip), clean test split; eps 8/255. "
             "Protect s = wall time of the protection (all phases). Every cell's own command is in "
             "`results.csv` of the grid root.", ""]
    for ds, epochs in sorted({(r["dataset"], r["epochs"] or 0) for r in rows}):
        sub = [r for r in rows if r["dataset"] == ds and (r["epochs"] or 0) == epochs]
        m = sub[0]
        lines += [f"### {dataset_tag(ds)} ({m['victim']}, {m['epochs']} epochs, precision {m['precision']})", "",
                  "| method | test ACC | test AUC | bal. ACC | train ACC | protect s | L0 | PSNR dB | SSIM |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sub:
            ps = "-" if r.get("protect_seconds") is None else f"{r['protect_seconds']:.0f}"
            psnr = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
            lines.append(f"| `{r['method']}` | {r['test_acc']:.3f} | {r['test_auc']:.3f} | "
                         f"{r['test_balanced_acc']:.3f} | {r['train_acc']:.3f} | {ps} | {r['l0']:.3f} | {psnr} | "
                         f"{r['ssim']:.4f} |")
        lines.append("")
    lines.append(MD_END)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.speed import write_section

    ap = argparse.ArgumentParser(prog="python -m bench real", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/real")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    ap.add_argument("--victim", default="resnet18")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--ks", nargs="+", type=float, default=[0.01, 0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--methods", nargs="*", default=None, help="replace the method list (specs)")
    ap.add_argument("--extra", nargs="*", default=[], help="add method specs to the default list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", default="bench/RESULTS.md")
    ap.add_argument("--tabulate-only", action="store_true", help="write the table from finished cells; run nothing")
    args = ap.parse_args(argv)
    paths = [str(Path(args.data_dir) / f"{d}.npz") for d in args.datasets]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"bench real: data not found: {', '.join(missing)} (see --data-dir)")
        return 2
    methods = args.methods or methods_for(args.ks, args.extra)
    for m in methods:
        MethodSpec.parse(m)
    grid = Grid(args.root, paths, methods, [args.victim], seeds=[args.seed], epochs=args.epochs)
    if not args.tabulate_only:
        grid.run(progress=False)
    # The table holds every finished cell of this victim and these methods under the root,
    # whichever invocation ran it (e.g. the datasets run in two lanes at different epochs).
    order = {str(MethodSpec.parse(m)): i for i, m in enumerate(methods)}
    tags = {dataset_tag(p): i for i, p in enumerate(paths)}
    rows = [r for r in grid.finished_rows() if r["victim"] == args.victim and r["defense"] == "none"
            and r["seed"] == args.seed and r["method"] in order and dataset_tag(r["dataset"]) in tags]
    rows.sort(key=lambda r: (tags[dataset_tag(r["dataset"])], order[r["method"]], r["epochs"] or 0))
    if not rows:
        print("bench real: no finished cells to tabulate")
        return 1
    command = "python -m bench real " + " ".join(argv if argv is not None else sys.argv[1:])
    note = ("From the cells that `bash bench/paper_grid.sh breast` and `bash bench/paper_grid.sh pneumonia` "
            "computed. " if args.tabulate_only else "")
    note += ("Reference (MedMNIST v2, ResNet-18 (28), 100 epochs): BreastMNIST ACC 0.863 / AUC 0.901, "
             "PneumoniaMNIST ACC 0.854 / AUC 0.944.")
    section = markdown(rows, command.strip(), note)
    write_section(Path(args.md), section, MD_BEGIN, MD_END)
    print(section)
    return 0
