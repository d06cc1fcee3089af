"""Protection speed, side by side in one run: the classic error-minimizing loop vs ours.

``python -m bench speed [--dataset PATH] [--victim cnn] [--epochs 15] [--out bench/results_speed.json]``

Rows (same data, same surrogate architecture and optimizer, same budget):

* **classic**: a faithful plain-PyTorch error-minimizing loop with the reference semantics
  (Huang et al., ICLR 2021): 10 surrogate steps, then a full pass of 20-step PGD (step
  0.8/255) over the training set, until the surrogate's accuracy on the perturbed data
  exceeds 99%. Unfused ops (``sign``, ``clamp``), a DataLoader, fp32, no denormal flush:
  how such code is usually written.
* **ours: sample-wise EM** (``salm_fast.methods.SampleWiseEM``), the same loop semantics
  on the fused ops, with run-time precision and in-place PGD.
* **ours: SALM** (the default: one block mask for the set, K = 20%; and the paper's per-image mask).

For each: wall time, images/s (training images / wall time), and the clean test AUC of a
victim trained on the stored (uint8) release. Also the throughput of a trained SALM
generator protecting new images (one forward pass, mask included or given).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from salm_fast import surrogate as S
from salm_fast.data import atomic_write_json, load_dataset, storage_to_nchw
from salm_fast.release import quantize_release

MD_BEGIN = "<!-- bench:speed:begin (written by python -m bench speed; edits inside are overwritten) -->"
MD_END = "<!-- bench:speed:end -->"
EPS = 8 / 255


def classic_em(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, seed: int = 0, max_rounds: int = 20,
               steps: int = 20, step_size: float = 0.8 / 255, surrogate_steps: int = 10, batch_size: int = 128,
               stop: float = 0.99) -> tuple[torch.Tensor, int]:
    """The reference loop, written plainly; returns (noise, rounds)."""
    torch.manual_seed(seed)
    model = S.build_surrogate(S.DEFAULT_SURROGATE, x.shape[1], n_classes, x.shape[2]).to(
        memory_format=torch.contiguous_format)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    noise = torch.zeros_like(x)
    idx_all = torch.arange(len(x))
    train_loader = DataLoader(TensorDataset(x, y, idx_all), batch_size=batch_size, shuffle=True)
    pgd_loader = DataLoader(TensorDataset(x, y, idx_all), batch_size=batch_size, shuffle=False)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        model.train()
        for i, (xb, yb, ib) in enumerate(train_loader):
            if i == surrogate_steps:
                break
            loss = F.cross_entropy(model(S.normalize(torch.clamp(xb + noise[ib], 0, 1))), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        for xb, yb, ib in pgd_loader:
            d = noise[ib].clone()
            for _ in range(steps):
                d.requires_grad_(True)
                loss = F.cross_entropy(model(S.normalize(torch.clamp(xb + d, 0, 1))), yb)
                (g,) = torch.autograd.grad(loss, d)
                d = d.detach() - step_size * g.sign()
                d = torch.clamp(d, -EPS, EPS)
                d = torch.clamp(xb + d, 0, 1) - xb
            noise[ib] = d
        with torch.no_grad():
            acc = float((model(S.normalize(torch.clamp(x + noise, 0, 1))).argmax(1) == y).float().mean())
        if acc > stop:
            break
    return noise, rounds


def victim_auc(clean_ds, release_u8: torch.Tensor, victim: str, epochs: int, seed: int) -> dict:
    from salm_fast.victims import train_victim

    test = clean_ds["test"]
    r = train_victim(victim, release_u8, clean_ds["train"].labels, test.images, test.labels, epochs=epochs,
                     augment="crop_flip", seed=seed, precision="auto", num_classes=clean_ds.n_classes)
    return {"acc": r.test["acc"], "auc": r.test["auc"], "precision": r.precision}


def train_tensors(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train split as stored (uint8 N x C x H x W), as floats in [0, 1], and its labels."""
    u8 = storage_to_nchw(ds["train"].images)
    return u8, u8.float() / 255, torch.from_numpy(ds["train"].labels[:, 0].copy()).long()


def run(dataset: str, victim: str, epochs: int, seed: int, log=print) -> dict:
    from salm_fast.methods import SALM, SampleWiseEM

    torch.set_flush_denormal(False)  # the classic loop runs as written; ours sets its own
    ds = load_dataset(dataset)
    u8, x, y = train_tensors(ds)
    rows = []

    def record(name: str, seconds: float, delta: torch.Tensor, extra: dict) -> None:
        release = quantize_release(u8, delta, EPS)
        v = victim_auc(ds, release, victim, epochs, seed)
        rows.append({"method": name, "seconds": seconds, "images_per_s": len(x) / seconds, "victim": victim,
                     "victim_acc": v["acc"], "victim_auc": v["auc"], **extra})
        log(f"{name:28s} {seconds:8.1f} s {len(x) / seconds:8.1f} img/s  victim AUC {v['auc']:.3f}")

    clean = victim_auc(ds, u8, victim, epochs, seed)
    log(f"{'clean (no protection)':28s} {'':>8s}   {'':>8s}        victim AUC {clean['auc']:.3f}")
    t = time.perf_counter()
    noise, rounds = classic_em(x, y, ds.n_classes, seed=seed)
    record("classic EM (plain PyTorch)", time.perf_counter() - t, noise, {"rounds": rounds})
    for name, method in (("ours: sample-wise EM", SampleWiseEM(EPS, seed=seed)),
                         ("ours: SALM (default, K=20%)", SALM(EPS, seed=seed)),
                         ("ours: SALM mask=image (paper), K=20%", SALM(EPS, mask="image", seed=seed))):
        t = time.perf_counter()
        p = method.fit(x, y, ds.n_classes)
        record(name, time.perf_counter() - t, p.delta, {"rounds": p.info.get("rounds"),
                                                         "stopped_because": p.info.get("stopped_because")})
        if isinstance(method, SALM) and "generator" not in [r.get("kind") for r in rows]:
            rows.append(generator_throughput(method, x, y))
            log(f"{'SALM generator, new images':28s} {rows[-1]['images_per_s']:.0f} img/s (mask given), "
                f"{rows[-1]['images_per_s_with_mask']:.0f} img/s (mask computed)")
    return {"dataset": dataset, "n_train": len(x), "clean_victim_auc": clean["auc"], "clean_victim_acc": clean["acc"],
            "rows": rows, "machine": _machine(), "command": f"python -m bench speed --dataset {dataset} "
            f"--victim {victim} --epochs {epochs} --seed {seed}"}


def generator_throughput(method, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> dict:
    """Images/s of protecting unseen images with a trained SALM generator (batch 1024)."""
    n = min(len(x), 4096)
    xs, ys = x[:n].contiguous(), y[:n]
    mask = torch.ones((n, 1, *x.shape[2:]))
    best = best_mask = best16 = float("inf")
    method.perturb(xs[:64], ys[:64], mask[:64], precision="bf16")  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        method.perturb(xs, ys, mask)
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        method.perturb(xs, ys, mask, precision="bf16")
        best16 = min(best16, time.perf_counter() - t)
        t = time.perf_counter()
        method.perturb(xs, ys)  # saliency mask from the phase-1 surrogate, then the generator
        best_mask = min(best_mask, time.perf_counter() - t)
    return {"kind": "generator", "method": "SALM generator on new images", "images": n,
            "images_per_s": n / best, "images_per_s_bf16": n / best16, "images_per_s_with_mask": n / best_mask}


def _machine() -> dict:
    from salm_fast.api import machine_info

    return machine_info()


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [MD_BEGIN, "## Protection speed (CPU)", "",
             f"`{res['command']}`: {res['dataset']} train split ({res['n_train']} images), eps 8/255, "
             f"CPU {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Wall time of the whole protection "
             "(surrogate training, mask, noise optimization, export); victim: trained on the stored uint8 release "
             f"with crop+flip, tested on the clean test split (clean-data victim: ACC {res['clean_victim_acc']:.3f}, "
             f"AUC {res['clean_victim_auc']:.3f}).", "",
             "| method | rounds | wall s | images/s | speed vs classic | victim ACC | victim AUC |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    classic = next(r for r in res["rows"] if r["method"].startswith("classic"))
    for r in res["rows"]:
        if r.get("kind") == "generator":
            continue
        lines.append(f"| {r['method']} | {r.get('rounds', '')} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | "
                     f"{classic['seconds'] / r['seconds']:.1f}x | {r['victim_acc']:.3f} | {r['victim_auc']:.3f} |")
    g = next((r for r in res["rows"] if r.get("kind") == "generator"), None)
    if g:
        lines += ["", f"Trained SALM generator protecting {g['images']} new images: "
                  f"**{g['images_per_s']:.0f} images/s** with the mask given (bf16: "
                  f"{g.get('images_per_s_bf16', float('nan')):.0f}), {g['images_per_s_with_mask']:.0f} "
                  "images/s computing the saliency mask too (best of 3, batch 1024)."]
    lines += [MD_END]
    return "\n".join(lines)


GEN_BEGIN = "<!-- bench:generator:begin (written by python -m bench speed --generator-only) -->"
GEN_END = "<!-- bench:generator:end -->"


def generator_only(args) -> int:
    from salm_fast.methods import SALM

    ds = load_dataset(args.dataset)
    _, x, y = train_tensors(ds)
    method = SALM(EPS, seed=args.seed, rounds=2)
    method.fit(x, y, ds.n_classes)
    g = generator_throughput(method, x, y)
    m = _machine()
    section = "\n".join([
        GEN_BEGIN, "### SALM generator on new images", "",
        f"`python -m bench speed --generator-only --dataset {args.dataset}` on {m['cpu']}, {m['threads']} threads: "
        f"a SALM generator (K = {SALM.default_k:.0%}, 2 bi-level rounds) protects {g['images']} new {tuple(x.shape[2:])} images at "
        f"**{g['images_per_s']:.0f} images/s** in fp32 and **{g['images_per_s_bf16']:.0f} images/s** in bf16 "
        f"(`perturb(..., precision='bf16')`) with the mask given, {g['images_per_s_with_mask']:.0f} images/s "
        "computing the saliency mask too (fp32; best of 3, batch 1024, no autograd).", GEN_END])
    atomic_write_json(Path(args.out).with_name("results_generator.json"), {**g, "machine": m})
    write_section(Path(args.md), section, GEN_BEGIN, GEN_END)
    print(section)
    return 0


def write_section(path: Path, section: str, begin: str = MD_BEGIN, end: str = MD_END) -> None:
    from salm_fast.data import atomic_path

    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/medmnist/pneumoniamnist.npz")
    ap.add_argument("--victim", default="cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results_speed.json")
    ap.add_argument("--md", default="bench/RESULTS.md")
    ap.add_argument("--generator-only", action="store_true",
                    help="only the throughput of a SALM generator on new images (trained for 2 rounds: the cost "
                         "of a forward pass does not depend on how long it trained)")
    args = ap.parse_args(argv)
    if args.generator_only:
        return generator_only(args)
    res = run(args.dataset, args.victim, args.epochs, args.seed)
    atomic_write_json(args.out, res)
    write_section(Path(args.md), markdown(res))
    print(markdown(res))
    return 0
