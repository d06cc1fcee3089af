"""``salm-fast``: the command line.

    salm-fast demo                                   # synthetic data: protect, evaluate, print the table
    salm-fast protect --data X.npz --method salm --eps 8/255 --k 0.2 --out DIR
    salm-fast evaluate --clean X.npz --release DIR/X.npz --victim resnet18 [--defense jpeg-10]
    salm-fast audit DIR --clean X.npz                # quick verdict: budget, PSNR/SSIM, a brief victim
    salm-fast protect ... --save-protector P.pt      # also keep what protects images that arrive later
    salm-fast apply --protector P.pt --data new.npz --out DIR2   # protect them, publish a release folder
    salm-fast backends                               # which kernel backends run here, and why not

The benchmarks are not part of the package: from a source checkout, ``python -m bench kernels``
(or ``make bench``). Bad input gets one line on stderr naming the problem, exit status 2, and
nothing written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` (one line on stderr, exit 2, from ``main``)
    instead of printing the whole usage; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_eps(text: str) -> float:
    """'8/255' or '0.0314' -> a budget in [0, 1] units, by the one rule :func:`salm_fast.release.parse_eps`
    (a bare '1', '2' or '1.5' is ambiguous and refused, naming both spellings)."""
    from .release import parse_eps as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_k(text: str) -> int | float:
    """'20' -> 20 pixels; '0.1' or '10%' -> a fraction of H*W."""
    t = text.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100
        return int(t) if t.isdigit() else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be pixels (e.g. 80) or a fraction (0.1, 10%), got {text!r}") from None


def parse_grid_epochs(text: str) -> int | dict[str, int]:
    """'30' -> 30; 'breastmnist=30,pneumoniamnist=15' -> per dataset."""
    from .experiment import parse_epochs

    try:
        return parse_epochs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_resize(text: str) -> tuple[int, int]:
    """'64x48' -> (64, 48): height x width in pixels."""
    from .data import parse_resize as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must be comma-separated integers, got {text!r}") from None


# ------------------------------------------------------------------------------ commands
def cmd_protect(args) -> int:
    from .api import protect
    from .distributed import finish, init_from_env, is_main
    from .runtime import resolve_device

    # Under torchrun (WORLD_SIZE > 1): join the job's process group; each rank protects a shard, rank 0 publishes.
    # A rank that fails raises as usual (one error line, exit 2): torchrun then stops the others, which may be
    # inside a collective (so no barrier and no group teardown on that path).
    many = init_from_env(resolve_device(args.device))
    status = _protect(args, protect, is_main())
    if many:  # every rank leaves together, once rank 0 has published (salm_fast.distributed.finish)
        finish(status)
    return status


def _protect(args, protect, main: bool) -> int:
    options = {} if args.rounds is None else {"rounds": args.rounds}
    for name in ("noise", "mask_refresh", "classes", "poison_ratio"):
        value = getattr(args, name)
        if value is not None:
            if args.method != "salm":
                raise UsageError(f"--{name.replace('_', '-')} is a SALM option (method is {args.method})")
            options[name] = value
    result = protect(args.data, args.method, out=args.out, eps=args.eps, k=args.k, splits=args.splits,
                     seed=args.seed, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                     backend=args.backend, figure=not args.no_figure, keep_checkpoint=args.keep_checkpoint,
                     workdir=args.workdir, precision=args.precision, audit=not args.no_audit, resize=args.resize,
                     device=args.device, save_protector=args.save_protector, **options)
    if not main:  # another rank of a torchrun job: rank 0 published and prints
        return 0
    print(result.table())
    for split, budget in result.summary.get("stored_budget", {}).items():  # 16-bit / DICOM files: their own grid
        for bits, m in budget["per_bits"].items():
            print(f"stored values ({split}, {bits}-bit): L-inf {m['linf_levels']}/{m['maxval']} "
                  f"(budget {m['budget_levels']}/{m['maxval']})")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    if "audit" in result.summary:
        print(f"audit: {result.summary['audit']['verdict']} ({Path(args.out) / result.summary['audit']['file']})")
    if args.save_protector:
        print(f"protector: {args.save_protector} (private, like the checkpoint: it protects new images with "
              "salm-fast apply; never share it)")
    return 0


def cmd_apply(args) -> int:
    from .protector import apply

    result = apply(args.protector, args.data, out=args.out, splits=args.splits, overwrite=args.overwrite,
                   progress=not args.quiet, figure=not args.no_figure, device=args.device, resize=args.resize)
    print(result.table())
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_audit(args) -> int:
    from .audit import audit

    budget = {} if args.time_budget is None else {"time_budget_s": args.time_budget}
    res = audit(args.release, args.clean, eps=args.eps, k=args.k, epochs=args.epochs, seed=args.seed,
                resize=args.resize, out=args.out, progress=not args.quiet, **budget)
    b = res.budget["per_split"]
    for split, m in b.items():
        print(f"{split:<6} L-inf {m['linf_levels']}/255, L0 {m['l0_fraction']:.3f} "
              f"(<= {m['l0_max_per_image']} pixels an image), {m['changed_images']}/{m['n_images']} images changed")
    if res.quality is not None:
        print(f"train  PSNR {res.quality['psnr_db']:.1f} dB, SSIM {res.quality['ssim']:.4f}")
    s = res.settings
    print(f"victim {s['victim']}, {s['epochs']} epoch(s) on {s['n_train']} images, tested on {s['test']} "
          f"({res.seconds:.0f} s)")
    print(res.verdict)
    if args.out:
        print(f"results: {Path(args.out) / 'audit.json'}")
    return 1 if res.status in ("NOT protected", "over budget") else 0


def cmd_evaluate(args) -> int:
    from .api import evaluate

    res = evaluate(args.clean, args.release, victim=args.victim, defense=args.defense, augment=args.augment,
                   epochs=args.epochs, seed=args.seed, precision=args.precision, out=args.out,
                   progress=not args.quiet, device=args.device)
    print(res.table())
    if args.out:
        print(f"results: {Path(args.out) / 'evaluation.json'}")
    return 0


def cmd_demo(args) -> int:
    from .api import describe_eps, describe_k, evaluate, protect
    from .data import load_dataset
    from .methods import SALM

    out = Path(args.out)
    t0 = time.perf_counter()
    data = "synthetic:n=1500,seed=0"
    eps, k = SALM.default_eps, SALM.default_k  # SALM's defaults, as protect uses them
    h, w = load_dataset(data).image_shape
    print(f"1/2 protecting the built-in synthetic dataset ({data}) with SALM ...")
    print(f"SALM: K = {describe_k(k, h * w)}, eps = {describe_eps(eps)}", flush=True)
    result = protect(data, "salm", out=out, eps=eps, k=k, overwrite=True, progress=not args.quiet,
                     audit=False)  # step 2 is the full evaluation: the quick audit would repeat it
    print(result.table())
    print(f"\n2/2 training a victim ({args.victim}) on the clean data and on the release ...", flush=True)
    res = evaluate(data, result.release_path, victim=args.victim, epochs=args.epochs, out=out,
                   progress=not args.quiet)
    print()
    print(res.table())
    drop = res.clean["test"]["acc"] - res.release["test"]["acc"]
    print(f"\nThe victim trained on the release lost {drop:.1%} clean test accuracy. Figures: "
          f"{out / 'protection.png'}, {out / 'learning_curves.png'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_experiment(args) -> int:
    from .experiment import Grid

    grid = Grid(args.root, args.datasets, args.methods, args.victims, args.defenses, args.seeds,
                epochs=args.epochs, precision=args.precision, augment=args.augment, eps=args.eps, shard=args.shard,
                device=args.device)
    grid.run(progress=not args.quiet)
    if args.report:
        from .report import build_report

        print(f"report: {build_report(args.root)}")
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    print(f"report: {build_report(args.root, args.out, counter_measures_victim=args.victim)}")
    return 0


def cmd_backends(args) -> int:
    from .ops import available_backends

    for status in available_backends().values():
        print(status)
    return 0


# ------------------------------------------------------------------------------ parser
_PRECISIONS = ["auto", "fp32", "bf16"]
_DEVICE_HELP = ("auto (default: CUDA when present, else the CPU), cpu, cuda or cuda:<index>; precision auto is "
                "chosen for it")


def _add_protect(sub) -> None:
    from .methods import METHODS, SALM
    from .ops import BACKENDS

    pr = sub.add_parser("protect", help="perturb a dataset; publish the release, a summary and a figure")
    pr.add_argument("--data", required=True, help="MedMNIST .npz, an image folder with labels.csv, or 'synthetic'")
    pr.add_argument("--method", default="salm", choices=sorted(METHODS))
    pr.add_argument("--eps", type=parse_eps, default=None, help="L-inf budget: a fraction 8/255 or a number below 1 "
                    "(0.03); default: the method's (8/255; 1.0 for ops and for lsp's L2 mode)")
    pr.add_argument("--k", type=parse_k, default=None, help="masked methods: pixels per image (80) or fraction "
                    f"(0.1, 10%%); SALM default {SALM.default_k:g}")
    pr.add_argument("--out", required=True, help="output folder (new, empty, or a previous output with --overwrite), "
                    "published whole: the release, summary.json, protection.png, rounds.jsonl")
    pr.add_argument("--splits", default="all", help="'all' (default: a split shipped clean is an unprotected copy), "
                    "'train' (for benchmarking), or a comma list")
    pr.add_argument("--seed", type=int, default=None, help="default: a secret seed from the OS, kept only in the "
                    "work folder's checkpoint (--resume reads it back); give one for a reproducible experiment")
    pr.add_argument("--rounds", type=int, default=None, help="cap on bi-level rounds")
    pr.add_argument("--noise", choices=["generator", "pgd"], default=None, help="SALM: generator (default) or PGD")
    pr.add_argument("--mask-refresh", type=int, default=None, help="SALM: refresh the mask every N rounds")
    pr.add_argument("--classes", type=parse_classes, default=None, help="SALM: protect only these classes (0,2)")
    pr.add_argument("--poison-ratio", type=float, default=None, help="SALM: fraction of images to perturb")
    pr.add_argument("--backend", choices=list(BACKENDS), default=None, help="force a kernel backend (default: "
                    "triton on CUDA, cpp on the CPU)")
    pr.add_argument("--device", default="auto", help="where the protection runs: " + _DEVICE_HELP)
    pr.add_argument("--precision", choices=_PRECISIONS, default=None,
                    help="the surrogate's precision in the bi-level loop (default auto: from the device); "
                         "the summary records the one used and why")
    pr.add_argument("--workdir", default=None, help="private folder for the checkpoint and round log while the run "
                    "lasts (default: .OUT.salm-work beside OUT; never inside OUT)")
    pr.add_argument("--resume", action="store_true", help="continue from the checkpoint in the work folder")
    pr.add_argument("--overwrite", action="store_true", help="replace a previous salm-fast output in OUT")
    pr.add_argument("--keep-checkpoint", action="store_true",
                    help="keep the work folder's checkpoint.pt after success (it holds the noise: never share it)")
    pr.add_argument("--no-figure", action="store_true")
    pr.add_argument("--no-audit", action="store_true", help="skip the quick audit (a brief victim on the release vs "
                    "clean data, about a minute on a MedMNIST-size set) and its audit.json")
    pr.add_argument("--resize", type=parse_resize, default=None, help="image folders: resize every image to HxW "
                    "(bilinear) on reading; the release holds the resized images")
    pr.add_argument("--save-protector", default=None, metavar="P.pt",
                    help="also save what protects images that arrive later (salm-fast apply): generator methods "
                         "(salm, generator); a private file, never inside OUT; an existing one only with --overwrite")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_protect)


def _add_apply(sub) -> None:
    ap = sub.add_parser("apply", help="protect images that arrive later with a saved protector; publish a release "
                        "folder laid out as protect's")
    ap.add_argument("--protector", required=True, help="a file from protect --save-protector")
    ap.add_argument("--data", required=True, help="the new images: MedMNIST .npz, an image folder with labels.csv, "
                    "or 'synthetic:...'; the protector's channels and size, labels among its classes")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous output with --overwrite), "
                    "published whole: the release, summary.json, protection.png")
    ap.add_argument("--splits", default="all", help="'all' (default), 'train', or a comma list")
    ap.add_argument("--device", default="auto", help="where the protector runs: " + _DEVICE_HELP)
    ap.add_argument("--resize", type=parse_resize, default=None, help="image folders: resize every image to HxW "
                    "(bilinear) on reading")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous salm-fast output in OUT")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.set_defaults(func=cmd_apply)


def _add_evaluate_and_demo(sub, victims: list[str]) -> None:
    ev = sub.add_parser("evaluate", help="train a victim on clean vs released data; print the table")
    ev.add_argument("--clean", required=True, help="the clean dataset (its test split is the judge)")
    ev.add_argument("--release", required=True, help="the released dataset")
    ev.add_argument("--victim", default="resnet18", choices=victims)
    ev.add_argument("--defense", default=None, help="counter-measures joined by '+', e.g. jpeg-10, cutout+mixup, "
                    "adv-8; the attacker's best-val, clean-splits, purify")
    ev.add_argument("--augment", default="crop_flip", choices=["crop_flip", "none"])
    ev.add_argument("--epochs", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--precision", default="auto", choices=_PRECISIONS)
    ev.add_argument("--device", default="auto", help="where the victims train: " + _DEVICE_HELP)
    ev.add_argument("--out", default=None, help="folder for evaluation.json and learning_curves.png")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    de = sub.add_parser("demo", help="synthetic data: protect with SALM, evaluate a small victim, print the table")
    de.add_argument("--out", default="salm-fast-demo")
    de.add_argument("--victim", default="cnn", choices=victims)
    de.add_argument("--epochs", type=int, default=15)
    de.add_argument("--quiet", action="store_true")
    de.set_defaults(func=cmd_demo)


def _add_audit(sub) -> None:
    au = sub.add_parser("audit", help="quick check of a release: budget, PSNR/SSIM, a brief victim; one verdict line "
                        "(exit status 1: NOT protected or over budget)")
    au.add_argument("release", help="a protect output folder (its summary gives eps and K), or a release file/folder")
    au.add_argument("--clean", required=True, help="the clean dataset the release was made from")
    au.add_argument("--eps", type=parse_eps, default=None, help="check the L-inf budget (default: the summary's)")
    au.add_argument("--k", type=parse_k, default=None, help="check L0 <= K pixels (default: the summary's)")
    au.add_argument("--epochs", type=int, default=None, help="victim epochs (default: as many as fit the time budget)")
    au.add_argument("--time-budget", type=float, default=None,
                    help="seconds of victim training, both victims together (default 40)")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--resize", type=parse_resize, default=None, help="read image folders at HxW (as protect did)")
    au.add_argument("--out", default=None, help="existing folder for audit.json")
    au.add_argument("--quiet", action="store_true")
    au.set_defaults(func=cmd_audit)


def _add_experiment_and_report(sub, victims: list[str]) -> None:
    ex = sub.add_parser("experiment", help="a cached, resumable grid: datasets x methods x victims x defenses x seeds")
    ex.add_argument("--root", required=True, help="folder for releases, cells and the results table")
    ex.add_argument("--datasets", nargs="+", required=True, help="dataset paths or specs (e.g. synthetic)")
    ex.add_argument("--methods", nargs="+", required=True,
                    help="method specs: clean, salm, salm:k=0.05, salm:k=0.1,noise=pgd, samplewise, random, ...")
    ex.add_argument("--victims", nargs="+", default=["resnet18"], choices=victims)
    ex.add_argument("--defenses", nargs="+", default=["none"],
                    help="none, jpeg-10, cutout, mixup+crop_flip, adv-8, ...; the attacker's best-val, clean-splits, "
                         "purify")
    ex.add_argument("--seeds", nargs="+", type=int, default=[0], help="one cell per seed (mean +- std in the report)")
    ex.add_argument("--epochs", type=parse_grid_epochs, default=None,
                    help="victim epochs: one number, or per dataset breastmnist=30,pneumoniamnist=15")
    ex.add_argument("--eps", type=parse_eps, default=None, help="L-inf budget of every protection (default: each "
                    "method's)")
    ex.add_argument("--shard", default=None, help="i/N: run only the cells whose index modulo N is i (default: the "
                    "torch.distributed rank / world size, or RANK / WORLD_SIZE, when set)")
    ex.add_argument("--augment", default="crop_flip", choices=["crop_flip", "none"])
    ex.add_argument("--precision", default="auto", choices=_PRECISIONS)
    ex.add_argument("--device", default="auto", help="where protections and victims run: " + _DEVICE_HELP)
    ex.add_argument("--report", action="store_true", help="write ROOT/report/report.md when done")
    ex.add_argument("--quiet", action="store_true")
    ex.set_defaults(func=cmd_experiment)

    rp = sub.add_parser("report", help="Markdown + PNG report from an experiment grid")
    rp.add_argument("--root", required=True)
    rp.add_argument("--out", default=None, help="report folder (default ROOT/report)")
    rp.add_argument("--victim", default="resnet18", help="the victim of the counter-measures table")
    rp.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS

    p = _Parser(prog="salm-fast", description="Protect medical image datasets from unauthorized "
                "training (unlearnable examples with sparse saliency masks).",
                epilog="Benchmarks: from a source checkout, python -m bench kernels|speed|real (or make bench).")
    sub = p.add_subparsers(dest="command", required=True)
    _add_protect(sub)
    _add_apply(sub)
    _add_evaluate_and_demo(sub, sorted(MODELS))
    _add_audit(sub)
    _add_experiment_and_report(sub, sorted(MODELS))
    be = sub.add_parser("backends", help="which kernel backends can run here")
    be.set_defaults(func=cmd_backends)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "splits", None) not in (None, "train", "all"):
            args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: FileExistsError, PermissionError, ...
        print(f"salm-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("salm-fast: interrupted (protect --resume continues from the last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "parse_eps", "parse_k"]
