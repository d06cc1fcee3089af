"""Protecting images that arrive later, measured on PneumoniaMNIST: half by protect, half by apply.

``python -m bench apply_half [--data-dir DIR] [--root runs/apply_half] [--epochs 15] [--seed 0]``

1. ``protect`` the whole file with SALM's defaults (``--save-protector``): the reference release;
2. ``protect`` a file holding the first half of the train split (and val, test) with ``--save-protector``,
   then ``apply`` that protector to a file holding the second half; the release of the full train split
   is assembled from the two (val and test as the half protect released them, i.e. perturbed);
3. ``salm-fast evaluate`` (the ``cnn`` victim, ``--epochs`` epochs, seed ``--seed``) on both releases
   against the clean file: does a protector carry over to images it never saw?
4. ``apply`` throughput: the full protector on the full train split, ``--repeats`` times (images/s of the
   perturbation and its quantization, as ``apply``'s summary gives it, and the whole call's wall time),
   and whether it reproduces the reference release's train bytes.

Prints a table and writes ``bench/results_apply.json`` (numbers, the command, the commit, the machine).
The protections are reused when their outputs are already under ``--root`` (a rerun continues).
Run it on one thread (``OMP_NUM_THREADS=1``) on a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
RESULTS = Path(__file__).resolve().parent / "results_apply.json"
FILE = "pneumoniamnist.npz"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _code_version() -> dict[str, Any]:
    import salm_fast

    return {"salm_fast_path": str(Path(salm_fast.__file__).resolve().parent.name), "head": _git("rev-parse", "HEAD"),
            "salm_py_commit": _git("log", "-1", "--format=%h %s", "--", "salm_fast/methods/salm.py")[:120],
            "dirty": _git("status", "--porcelain", "--", "salm_fast").splitlines()}


def _halves(src: Path, root: Path) -> tuple[Path, Path]:
    """root/a/FILE: the first half of train + val + test; root/b/FILE: the second half of train alone."""
    from salm_fast.data import Dataset, Split, load_dataset, save_medmnist

    ds = load_dataset(src)
    train = ds["train"]
    half = len(train) // 2
    a, b = root / "a" / FILE, root / "b" / FILE
    for path, splits in ((a, {**ds.splits, "train": Split(train.images[:half], train.labels[:half])}),
                         (b, {"train": Split(train.images[half:], train.labels[half:])})):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_medmnist(Dataset(ds.name, splits, ds.n_classes, str(path), ds.label_names, ds.label_dtype), path)
    return a, b


def _protect(data: Path, out: Path, protector: Path, seed: int, progress: bool,
             options: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """A SALM protect (defaults, but ``options``) with --save-protector, reused when done before (its wall time
    in ``OUT.wall.json`` beside it); its summary and wall time."""
    from salm_fast import protect

    wall_file = out.parent / f"{out.name}.wall.json"
    if (out / "summary.json").is_file() and protector.is_file() and wall_file.is_file():
        return json.loads((out / "summary.json").read_text()), json.loads(wall_file.read_text())["wall_s"]
    t0 = time.perf_counter()
    res = protect(data, "salm", out=out, seed=seed, save_protector=protector, overwrite=True, audit=False,
                  progress=progress, **options)
    wall = time.perf_counter() - t0
    wall_file.write_text(json.dumps({"wall_s": wall}) + "\n")
    return res.summary, wall


def _assemble(half_protect: Path, half_apply: Path, out: Path) -> Path:
    """The full-train release: the half protect's train + the applied second half; val/test from the half protect."""
    from salm_fast.data import Split, load_dataset, save_medmnist

    a, b = load_dataset(half_protect / FILE), load_dataset(half_apply / FILE)
    train = np.concatenate([a["train"].images, b["train"].images])
    labels = np.concatenate([a["train"].labels, b["train"].labels])
    full = a.with_split("train", Split(train, labels))
    out.mkdir(parents=True, exist_ok=True)
    save_medmnist(full, out / FILE, overwrite=True)
    return out / FILE


def _evaluate(clean: Path, release: Path, out: Path, epochs: int, seed: int, progress: bool) -> dict[str, Any]:
    from salm_fast import evaluate

    t0 = time.perf_counter()
    res = evaluate(clean, release, victim="cnn", epochs=epochs, seed=seed, out=out, progress=progress)
    return {"clean_auc": res.clean["test"]["auc"], "release_auc": res.release["test"]["auc"],
            "clean_protection_auc": res.protection_auc("clean"),
            "release_protection_auc": res.protection_auc("release"),
            "clean_acc": res.clean["test"]["acc"], "release_acc": res.release["test"]["acc"],
            "psnr_db": res.perturbation["psnr_db"], "l0": res.perturbation["l0"], "wall_s": time.perf_counter() - t0}


def _throughput(protector: Path, clean: Path, root: Path, reference: Path, repeats: int) -> dict[str, Any]:
    """apply of the full protector to the full train split, ``repeats`` times."""
    from salm_fast import apply
    from salm_fast.data import load_dataset

    rates, walls, result = [], [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        result = apply(protector, clean, out=root / "throughput", splits="train", overwrite=True, figure=False)
        walls.append(time.perf_counter() - t0)
        rates.append(result.summary["images_per_second"])
    ref = load_dataset(reference)["train"].images
    got = result.release["train"].images
    return {"images": result.summary["images"], "images_per_second": rates,
            "images_per_second_median": statistics.median(rates), "wall_s": walls,
            "threads": result.summary["threads"], "budget": result.summary["budget"],
            "bytes_differing_from_protect_release": int((got != ref).sum()), "bytes": int(ref.size)}


def table(r: dict[str, Any]) -> str:
    full, half = r["evaluate"]["full_protect"], r["evaluate"]["half_protect_half_apply"]
    t = r["apply_throughput"]
    lines = [f"PneumoniaMNIST, victim cnn {r['settings']['epochs']} epochs, seed {r['settings']['seed']} "
             f"(protection AUC = max(AUC, 1 - AUC))",
             f"{'train split released by':<42} {'test AUC':>9} {'prot. AUC':>10} {'test ACC':>9} {'PSNR':>6} {'L0':>6}",
             f"{'clean (reference victim)':<42} {full['clean_auc']:>9.3f} {full['clean_protection_auc']:>10.3f} "
             f"{full['clean_acc']:>9.3f} {'-':>6} {'-':>6}"]
    for name, e in (("protect, all of train", full), ("protect 1st half + apply to 2nd half", half)):
        lines.append(f"{name:<42} {e['release_auc']:>9.3f} {e['release_protection_auc']:>10.3f} "
                     f"{e['release_acc']:>9.3f} {e['psnr_db']:>6.1f} {e['l0']:>6.3f}")
    p = r["protect"]
    lines += [f"protect wall: full {p['full']['wall_s']:.0f} s ({p['full']['rounds']} rounds), "
              f"half {p['half']['wall_s']:.0f} s ({p['half']['rounds']} rounds); apply of the 2nd half: "
              f"{r['apply_second_half']['images']} images, {r['apply_second_half']['wall_s']:.1f} s wall",
              f"apply throughput ({t['images']} train images, {t['threads']} thread(s)): median "
              f"{t['images_per_second_median']:.0f} images/s over {len(t['images_per_second'])} runs "
              f"({', '.join(f'{v:.0f}' for v in t['images_per_second'])}); wall "
              f"{', '.join(f'{v:.1f}' for v in t['wall_s'])} s; bytes differing from the protect release: "
              f"{t['bytes_differing_from_protect_release']} of {t['bytes']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench apply_half", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--root", default="runs/apply_half")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="victim seed")
    ap.add_argument("--protect-seed", type=int, default=0, help="the protections' seed (reproducible experiment)")
    ap.add_argument("--repeats", type=int, default=3, help="apply throughput runs")
    ap.add_argument("--rounds", type=int, default=None, help="cap on SALM's bi-level rounds (default: its own)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    src = Path(args.data_dir) / FILE
    if not src.is_file():
        print(f"apply_half: {src} not found (--data-dir)", file=sys.stderr)
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    t_start = time.perf_counter()
    a, b = _halves(src, root)
    options = {} if args.rounds is None else {"rounds": args.rounds}
    full_sum, full_wall = _protect(src, root / "full_protect", root / "full.pt", args.protect_seed, progress, options)
    half_sum, half_wall = _protect(a, root / "half_protect", root / "half.pt", args.protect_seed, progress, options)
    from salm_fast import apply

    t0 = time.perf_counter()
    second = apply(root / "half.pt", b, out=root / "half_apply", overwrite=True, progress=progress)
    second_wall = time.perf_counter() - t0
    assembled = _assemble(root / "half_protect", root / "half_apply", root / "half_release")
    evals = {"full_protect": _evaluate(src, root / "full_protect" / FILE, root / "eval_full", args.epochs, args.seed,
                                       progress),
             "half_protect_half_apply": _evaluate(src, assembled, root / "eval_half", args.epochs, args.seed, progress)}
    throughput = _throughput(root / "full.pt", src, root, root / "full_protect" / FILE, args.repeats)
    results = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python -m bench apply_half "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"epochs": args.epochs, "seed": args.seed, "protect_seed": args.protect_seed, "victim": "cnn",
                     "method": "salm (defaults)" if not options else f"salm {options}",
                     "half": len(np.load(a)["train_labels"]),
                     "n_train": len(np.load(src)["train_labels"])},
        "code": _code_version(),
        "protect": {name: {"wall_s": w, "seconds": s["seconds"], "rounds": s["protection"].get("rounds"),
                           "stopped_because": s["protection"].get("stopped_because"),
                           "precision": s["precision"]["used"], "budget": s["budget"], "images": s["images"]}
                    for name, s, w in (("full", full_sum, full_wall), ("half", half_sum, half_wall))},
        "apply_second_half": {"images": second.summary["images"], "wall_s": second_wall,
                              "images_per_second": second.summary["images_per_second"],
                              "budget": second.summary["budget"]},
        "evaluate": evals,
        "apply_throughput": throughput,
        "machine": full_sum.get("machine"),
        "load_average": os.getloadavg(),
        "total_wall_s": time.perf_counter() - t_start,
    }
    Path(args.results).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
