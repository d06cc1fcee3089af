"""Drop-in speed: the classic unlearnable-examples loop as the public code writes it vs through salm_fast.compat.

``python -m bench compat [--quick] [--repeats 3] [--threads N] [--out bench/results_compat.json]``

Both rows run the SAME loop (:func:`classic_loop`: the reference's training-side usage of its
``PerturbationTool``, Huang et al. ICLR 2021) on the same data, model initialization and seed:
a few surrogate SGD steps on the perturbed images, then a pass of ``min_min_attack`` over every
batch, warm-started from the stored noise; repeated for a fixed number of rounds. Only the tool
differs:

* **plain PyTorch**: :class:`PlainPerturbationTool`, the reference's step as its code writes it
  (a fresh SGD optimizer on the image and ``model.zero_grad()`` each step, ``loss.backward()``,
  unfused sign / add / clamp / subtract / clamp);
* **salm_fast.compat**: :class:`salm_fast.compat.PerturbationTool` (one import changed): input
  gradients by ``torch.autograd.grad``, one fused ``pgd_step`` per step.

Timed: the whole loop (model construction, surrogate steps, noise search), wall clock, after one
untimed warm-up run of each; excluded: loading the data and the warm-up. The two variants alternate
within each repeat, so machine load hits both alike. Reported: mean +- std over repeats, the
speedup (ratio of means), and how far the two results differ, beside how far the plain loop differs
from itself under another thread count (untimed): each step agrees to float rounding, but sign()
turns a rounding difference at a near-zero gradient into a whole step, so over many steps both
comparisons drift by a similar amount. The plain tool is also the oracle of tests/test_compat.py.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from bench.kernels import _git, machine_info

BENCH_DIR = Path(__file__).resolve().parent
EPS = 8 / 255


class PlainPerturbationTool:
    """The reference tool's PGD in plain PyTorch, step for step as its code writes it (the baseline).

    ``min_min_attack`` / ``min_max_attack`` -> ``(perturb_img, eta)``: start at clamp(images +
    random_noise, 0, 1); each step moves the image by ``step_size * sign(grad)`` (down for min-min),
    clips ``image - images`` to [-epsilon, epsilon] (that is ``eta``) and the image to [0, 1].
    Cross-entropy criteria only (all the loops here use one).
    """

    def __init__(self, epsilon: float, num_steps: int, step_size: float):
        self.epsilon, self.num_steps, self.step_size = epsilon, num_steps, step_size

    def random_noise(self, noise_shape: Sequence[int]) -> Tensor:
        return torch.empty(tuple(noise_shape), dtype=torch.float32).uniform_(-self.epsilon, self.epsilon)

    def _attack(self, images, labels, model, criterion, random_noise, direction: float):
        if random_noise is None:
            random_noise = self.random_noise(images.shape)
        perturbed = torch.clamp(images.detach() + random_noise, 0, 1).requires_grad_(True)
        eta = random_noise
        for _ in range(self.num_steps):
            image_opt = torch.optim.SGD([perturbed], lr=1e-3)  # as the reference: only to zero the image's grad
            image_opt.zero_grad()
            model.zero_grad()
            criterion(model(perturbed), labels).backward()
            moved = perturbed.detach() + direction * self.step_size * perturbed.grad.sign()
            eta = torch.clamp(moved - images, -self.epsilon, self.epsilon)
            perturbed = torch.clamp(images + eta, 0, 1).requires_grad_(True)
        return perturbed, eta

    def min_min_attack(self, images, labels, model, optimizer, criterion, random_noise=None, sample_wise=False):
        return self._attack(images, labels, model, criterion, random_noise, -1.0)

    def min_max_attack(self, images, labels, model, optimizer, criterion, random_noise=None, sample_wise=False):
        return self._attack(images, labels, model, criterion, random_noise, 1.0)


def small_cnn(in_channels: int, n_classes: int, width: int) -> nn.Module:
    from salm_fast.models.cnn import SmallCNN

    return SmallCNN(in_channels, n_classes, width=width)


def _requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def classic_loop(tool, x: Tensor, y: Tensor, n_classes: int, *, seed: int = 0, rounds: int = 2,
                 train_steps: int = 10, batch_size: int = 128, width: int = 16, class_wise: bool = False,
                 attack: str = "min_min_attack") -> tuple[Tensor, list[float]]:
    """The reference's training-side loop around ``tool``; returns (noise, surrogate losses).

    Sample-wise: one noise per image, replaced by the batch's ``eta``. Class-wise: one noise per class,
    set to the class mean of the batch's ``eta`` clipped to the budget. Surrogate steps train on the
    images plus their noise (not clamped, as the reference's training side adds it); batches in a
    fixed order, so the run depends on ``seed`` only.
    """
    torch.manual_seed(seed)
    model = small_cnn(x.shape[1], n_classes, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    noise = torch.zeros((n_classes, *x.shape[1:]) if class_wise else x.shape)
    eps = tool.epsilon
    starts = list(range(0, len(x), batch_size))
    losses: list[float] = []
    step = 0
    for _ in range(rounds):
        model.train()
        _requires_grad(model, True)
        for _ in range(train_steps):
            s = starts[step % len(starts)]
            step += 1
            xb, yb = x[s:s + batch_size], y[s:s + batch_size]
            loss = criterion(model(xb + (noise[yb] if class_wise else noise[s:s + batch_size])), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        _requires_grad(model, False)
        for s in starts:
            xb, yb = x[s:s + batch_size], y[s:s + batch_size]
            start = noise[yb] if class_wise else noise[s:s + batch_size]
            _, eta = getattr(tool, attack)(xb, yb, model, optimizer, criterion, random_noise=start)
            if class_wise:
                for c in yb.unique().tolist():
                    noise[c] = torch.clamp(eta[yb == c].mean(0), -eps, eps)
            else:
                noise[s:s + batch_size] = eta.detach()
    return noise, losses


# ------------------------------------------------------------------ the benchmark
@dataclass(frozen=True)
class Config:
    dataset: str = "synthetic:n=720"  # ~500 training images, 1 x 28 x 28, 2 classes
    rounds: int = 2
    train_steps: int = 10  # the reference's train_step
    num_steps: int = 20  # the reference's PGD steps per batch
    step_size: float = 0.8 / 255
    batch_size: int = 128
    width: int = 16  # SmallCNN width: the protector's surrogate size
    repeats: int = 3
    max_images: int | None = None


FULL = Config()
QUICK = Config(dataset="synthetic:n=120", rounds=1, train_steps=2, num_steps=3, batch_size=32, width=4, repeats=1,
               max_images=64)


def load(cfg: Config) -> tuple[Tensor, Tensor, int]:
    from salm_fast.data import load_dataset

    ds = load_dataset(cfg.dataset)
    x, y = ds["train"].to_tensors()
    if cfg.max_images is not None:
        x, y = x[:cfg.max_images], y[:cfg.max_images]
    return x.contiguous(), y.long().flatten(), ds.n_classes


def _stats(seconds: list[float]) -> dict:
    return {"mean_s": statistics.fmean(seconds), "std_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
            "runs_s": seconds, "n": len(seconds)}


def run(cfg: Config, log: Callable[[str], None] = lambda line: None) -> dict:
    from salm_fast.compat import PerturbationTool

    x, y, n_classes = load(cfg)
    tools = {
        "plain PyTorch": PlainPerturbationTool(EPS, cfg.num_steps, cfg.step_size),
        "salm_fast.compat": PerturbationTool(epsilon=EPS, num_steps=cfg.num_steps, step_size=cfg.step_size,
                                             device="cpu"),
    }
    kwargs = dict(rounds=cfg.rounds, train_steps=cfg.train_steps, batch_size=cfg.batch_size, width=cfg.width)
    results: dict[str, tuple[Tensor, list[float]]] = {}
    for name, tool in tools.items():  # warm-up (untimed): one short round
        classic_loop(tool, x[:cfg.batch_size], y[:cfg.batch_size], n_classes, rounds=1, train_steps=1,
                     batch_size=cfg.batch_size, width=cfg.width)
    seconds: dict[str, list[float]] = {name: [] for name in tools}
    for r in range(cfg.repeats):
        for name, tool in tools.items():
            t = time.perf_counter()
            results[name] = classic_loop(tool, x, y, n_classes, **kwargs)
            seconds[name].append(time.perf_counter() - t)
            log(f"repeat {r + 1}/{cfg.repeats}  {name:18s} {seconds[name][-1]:8.2f} s")
    (noise_a, loss_a), (noise_b, loss_b) = results["plain PyTorch"], results["salm_fast.compat"]
    rows = [{"variant": name, **_stats(s)} for name, s in seconds.items()]
    # The yardstick for "same numbers": the plain loop against itself under another thread count
    # (another reduction order in the convolutions). sign() turns any rounding difference at a
    # near-zero gradient into a whole step, so long loops drift apart either way.
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    torch.set_num_threads(other)
    try:
        noise_c, loss_c = classic_loop(tools["plain PyTorch"], x, y, n_classes, **kwargs)
    finally:
        torch.set_num_threads(threads)
    log(f"untimed: plain PyTorch with {other} threads (the reference's own spread)")
    return {
        "benchmark": "compat",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": "",
        "machine": machine_info(),
        "config": asdict(cfg),
        "images": len(x),
        "image_shape": list(x.shape[1:]),
        "includes": "whole loop: model construction, surrogate SGD steps, min_min_attack over every batch",
        "excludes": "data loading, one untimed warm-up run per variant",
        "rows": rows,
        "speedup": rows[0]["mean_s"] / rows[1]["mean_s"],
        **agreement(noise_a, noise_b, loss_a, loss_b),
        "reference_self_spread": {"threads": other, **agreement(noise_a, noise_c, loss_a, loss_c)},
        "final_loss": {"plain PyTorch": loss_a[-1], "salm_fast.compat": loss_b[-1]},
    }


def agreement(noise_a: Tensor, noise_b: Tensor, loss_a: list[float], loss_b: list[float]) -> dict:
    diff = (noise_a - noise_b).abs()
    return {"max_abs_noise_diff": float(diff.max()), "frac_noise_values_differing": float((diff > 1e-6).float().mean()),
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(loss_a, loss_b))}


def table(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [
        f"classic unlearnable-examples loop, {result['images']} images {'x'.join(map(str, result['image_shape']))}, "
        f"SmallCNN width {cfg['width']}, {cfg['rounds']} rounds x ({cfg['train_steps']} SGD steps + "
        f"{cfg['num_steps']}-step min-min PGD over every batch of {cfg['batch_size']})",
        f"CPU {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, commit {result['git_commit']}",
        f"timed: {result['includes']}; not timed: {result['excludes']}",
        "",
        f"| {'variant':18s} | {'seconds (mean +- std, n)':28s} |",
        f"|{'-' * 20}|{'-' * 30}|",
    ]
    for row in result["rows"]:
        cell = f"{row['mean_s']:.2f} +- {row['std_s']:.2f} (n={row['n']})"
        lines.append(f"| {row['variant']:18s} | {cell:28s} |")
    spread = result["reference_self_spread"]
    lines += ["", f"speedup (plain / compat): {result['speedup']:.2f}x",
              f"plain vs compat: max |noise diff| {result['max_abs_noise_diff']:.2e} "
              f"({100 * result['frac_noise_values_differing']:.1f}% of values > 1e-6), "
              f"max |loss diff| {result['max_abs_loss_diff']:.2e}",
              f"plain vs plain with {spread['threads']} threads (the reference's own spread): max |noise diff| "
              f"{spread['max_abs_noise_diff']:.2e} ({100 * spread['frac_noise_values_differing']:.1f}%), "
              f"max |loss diff| {spread['max_abs_loss_diff']:.2e}"]
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench compat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (64 images, 1 round, 1 repeat)")
    parser.add_argument("--repeats", type=_at_least_one, default=None, help="timed runs per variant (default 3)")
    parser.add_argument("--threads", type=_at_least_one, default=None, help="torch.set_num_threads(THREADS) first")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results_compat.json; --quick: results_compat.quick.json)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    if args.repeats is not None:
        cfg = Config(**{**asdict(cfg), "repeats": args.repeats})
    out = args.out or BENCH_DIR / ("results_compat.quick.json" if args.quick else "results_compat.json")

    from salm_fast.data import atomic_write_json

    result = run(cfg, log=lambda line: print(line, flush=True))
    result["command"] = " ".join(["python -m bench compat", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_json(out, result, indent=1)
    print("\n" + table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
