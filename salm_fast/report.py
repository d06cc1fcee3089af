"""``salm-fast report``: a Markdown report (with PNG figures) from an experiment grid's table.

Cells: the **protection AUC** (for a binary task max(AUC, 1 - AUC): an attacker with a few clean
labeled images flips an inverted ranking; otherwise the AUC) as mean +- std over seeds with n,
then the raw test AUC (mean). Sections, each present when the grid holds the cells it needs, per
dataset and victim epochs:

* the protocol table: rows = methods (the clean data first, then the default SALM, its named
  variants, the baselines), columns = victims, no counter-measure; PSNR / SSIM per method; where
  a variant or a baseline leaves a lower protection AUC than the default SALM, a line says so;
* counter-measures: rows = methods, columns = counter-measures in a fixed order (none, jpeg-10,
  jpeg-50, blur, iss, cutout, mixup, cutmix, bitdepth-4, best-val, clean-splits, purify, adv-8,
  then any other), the clean-data row beside; the chosen victim (ResNet-18 by default) first;
* rounds: the protection AUC after 1, 5 and the default number of bi-level rounds, when the grid
  holds method specs that differ only in ``rounds=``;
* K sweep: clean test accuracy and AUC vs K for SALM, per dataset (figure);
* learning curves: a victim's train / clean-test accuracy per epoch, clean vs protected;
* selected classes: per-class clean test accuracy when SALM protects only some classes.

Each table names the command that reproduces its cells.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

from .data.atomic import atomic_path
from .experiment import CLEAN, MethodSpec, canonical_dataset, dataset_tag, load_results, split_stale
from .figures import new_figure, save_png


def _code(text: str) -> str:
    """`text` for a Markdown table cell (a literal | would end the cell)."""
    return "`" + str(text).replace("|", "\\|") + "`"


#: Column order of the counter-measures table (others follow, sorted).
COUNTER_MEASURES = ("none", "jpeg-10", "jpeg-50", "blur", "iss", "cutout", "mixup", "cutmix", "bitdepth-4",
                    "best-val", "clean-splits", "purify", "adv-8")


def _protection(r: dict) -> float:
    """A row's protection AUC (rows written before it was recorded: the AUC)."""
    value = r.get("test_auc_protection")
    return r["test_auc"] if value is None else value


def _default_salm(specs: dict[str, MethodSpec]) -> list[str]:
    """The default SALM's rows: spec ``salm`` (no options); without it, SALM at K <= 20% (no class selection)."""
    exact = [m for m, sp in specs.items() if sp.name == "salm" and not sp.options]
    return exact or [m for m, sp in specs.items() if sp.name == "salm" and sp.option("classes") is None
                     and isinstance(sp.option("k"), float) and sp.option("k") <= 0.2]


def _beats_salm(rows: list[dict], victims: list[str]) -> list[str]:
    """Where a variant or a baseline leaves a victim a lower protection AUC than the default SALM."""
    out = []
    for v in victims:
        prot: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["victim"] == v and r["method_name"] != CLEAN:
                prot[r["method"]].append(_protection(r))
        specs = {m: MethodSpec.parse(m) for m in prot}
        default = _default_salm(specs)
        if not default:
            continue
        best = min(mean(prot[m]) for m in default)
        label = _code(default[0]) if len(default) == 1 else "the best SALM at K <= 20%"
        better = sorted((mean(a), m) for m, a in prot.items() if m not in default and mean(a) < best)
        if better:
            out.append(f"- {v}: lower protection AUC than {label} ({best:.3f}): "
                       + ", ".join(f"{_code(m)} {a:.3f}" for a, m in better) + ".")
    return out


def _stats(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    spread = f" ± {stdev(values):.3f}" if len(values) > 1 else ""
    return f"{mean(values):.3f}{spread} ({len(values)})"


def _fmt_cell(rows: list[dict]) -> str:
    """protection AUC mean ± std (n) · raw AUC mean; best-val cells add the mean best epoch."""
    if not rows:
        return "-"
    cell = f"{_stats([_protection(r) for r in rows])} · {mean(r['test_auc'] for r in rows):.3f}"
    epochs = [r["best_epoch"] for r in rows if r.get("best_epoch") is not None]
    if epochs:
        cell += f" (best ep. {mean(epochs):.1f})"
    if any("no clean split released" in note for r in rows for note in r.get("notes") or []):
        cell += " †"
    return cell


def _method_order(methods: set[str]) -> list[str]:
    """The clean data, the default SALM, SALM's variants, then the baselines (by name and K)."""
    def key(m: str):
        spec = MethodSpec.parse(m)
        rank = 0 if spec.name == CLEAN else 1 if str(spec) == "salm" else 2 if spec.name == "salm" else 3
        k = spec.option("k")
        return rank, spec.name, k if isinstance(k, (int, float)) else 0, m
    return sorted(methods, key=key)


def _quality(rows: list[dict]) -> str:
    """Mean PSNR / SSIM of a method's releases (the clean data: -)."""
    psnr = [r["psnr_db"] for r in rows if r.get("psnr_db") is not None and math.isfinite(r["psnr_db"])]
    ssim = [r["ssim"] for r in rows if r.get("ssim") is not None]
    return f"{mean(psnr):.1f} | {mean(ssim):.4f}" if psnr and ssim else "- | -"


def _table(rows: list[dict], row_key: str, col_key: str, rows_order: list[str], cols_order: list[str], *,
           quality: bool = False) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r[row_key], r[col_key])].append(r)
    extra = " PSNR dB | SSIM |" if quality else ""
    head = f"| {row_key} | " + " | ".join(cols_order) + " |" + extra
    lines = [head, "|" + "---|" * (len(cols_order) + 1 + 2 * quality)]
    for rk in rows_order:
        cells = [_fmt_cell(groups.get((rk, ck), [])) for ck in cols_order]
        tail = f" {_quality([r for r in rows if r[row_key] == rk])} |" if quality else ""
        lines.append(f"| {_code(rk)} | " + " | ".join(cells) + " |" + tail)
    return lines


def _without_k(spec: MethodSpec) -> str:
    rest = [(k, v) for k, v in spec.options if k != "k"]
    return str(MethodSpec(spec.name, tuple(rest)))


def k_sweep_figure(rows: list[dict], path: Path, victim: str) -> bool:
    """Clean test ACC and AUC vs K: one panel per dataset, one line pair per SALM variant."""
    series: dict[str, dict[str, dict[float, list[tuple[float, float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    clean: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["victim"] != victim or r["defense"] != "none":
            continue
        spec = MethodSpec.parse(r["method"])
        if spec.name == "salm" and isinstance(r.get("k"), (int, float)):
            series[r["dataset"]][_without_k(spec)][float(r["k"])].append((r["test_acc"], r["test_auc"]))
        elif spec.name == CLEAN:
            clean[r["dataset"]] = (r["test_acc"], r["test_auc"])
    panels = {ds: {name: pts for name, pts in per.items() if len(pts) >= 2} for ds, per in series.items()}
    panels = {ds: per for ds, per in panels.items() if per}
    if not panels:
        return False
    fig = new_figure(4.4 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (ds, per) in zip(axes[0], sorted(panels.items())):
        for name, pts in sorted(per.items()):
            ks = sorted(pts)
            xs = [100 * k if k <= 1 else k for k in ks]
            ax.plot(xs, [mean(a for a, _ in pts[k]) for k in ks], "-o", label=f"{name}: ACC")
            ax.plot(xs, [mean(u for _, u in pts[k]) for k in ks], "-s", label=f"{name}: AUC")
        if ds in clean:
            ax.axhline(clean[ds][0], color="tab:blue", ls=":", label="clean data: ACC")
            ax.axhline(clean[ds][1], color="tab:orange", ls=":", label="clean data: AUC")
        ax.set_xscale("log")
        ax.set_xlabel("K (% of pixels per image; pixels if > 1)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{dataset_tag(ds)} ({victim})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean test metric")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)
    return True


def curves_figure(rows: list[dict], path: Path, victim: str, method: str) -> bool:
    pairs = []
    for ds in sorted({r["dataset"] for r in rows}):
        sel = {r["method"]: r for r in rows if r["dataset"] == ds and r["victim"] == victim
               and r["defense"] == "none" and r["seed"] == min(x["seed"] for x in rows)}
        if CLEAN in sel and method in sel:
            pairs.append((ds, sel[CLEAN], sel[method]))
    if not pairs:
        return False
    fig = new_figure(4.6 * len(pairs), 3.4)
    axes = fig.subplots(1, len(pairs), squeeze=False)
    for ax, (ds, c, p) in zip(axes[0], pairs):
        for r, color, name in ((c, "tab:blue", "clean"), (p, "tab:red", "protected")):
            h = r["history"]
            ax.plot([e["epoch"] for e in h], [e["train_acc"] for e in h], "--", color=color, label=f"{name}: train")
            pts = [(e["epoch"], e["test_acc"]) for e in h if e.get("test_acc") is not None]
            ax.plot(*zip(*pts), "-o", ms=3, color=color, label=f"{name}: clean test")
        ax.set_title(f"{dataset_tag(ds)}: {victim}, {method}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
    return True


def selected_classes_section(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        spec = MethodSpec.parse(r["method"])
        classes = spec.option("classes")
        if spec.name != "salm" or classes is None or not r.get("per_class_test_acc"):
            continue
        classes = classes if isinstance(classes, list) else [classes]
        clean = next((c for c in rows if c["method_name"] == CLEAN and c["dataset"] == r["dataset"]
                      and c["victim"] == r["victim"] and c["defense"] == r["defense"] and c["seed"] == r["seed"]),
                     None)
        if not out:
            out += ["| dataset | victim | method | class | protected | clean-data victim ACC | release victim ACC |",
                    "|---|---|---|---|---|---|---|"]
        for cls, acc in sorted(r["per_class_test_acc"].items()):
            ref = (clean or {}).get("per_class_test_acc", {}).get(cls)
            out.append(f"| {dataset_tag(r['dataset'])} | {r['victim']} | {_code(r['method'])} | {cls} | "
                       f"{'yes' if int(cls) in classes else 'no'} | {'-' if ref is None else f'{ref:.3f}'} | "
                       f"{acc:.3f} |")
    return out


def _counter_measure_order(names: set[str]) -> list[str]:
    known = [d for d in COUNTER_MEASURES if d in names]
    return known + sorted(names - set(known))


def _without_rounds(spec: MethodSpec) -> str:
    return str(MethodSpec(spec.name, tuple((k, v) for k, v in spec.options if k not in ("rounds", "min_rounds"))))


def rounds_section(rows: list[dict], main_defense: str = "none") -> list[str]:
    """Protection AUC after 1, 5, ... and the default number of rounds: method specs that differ only in
    ``rounds=`` / ``min_rounds=`` (the one without them is the default; ``min_rounds`` alone: at least
    that many rounds, then until the surrogate fits)."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        spec = MethodSpec.parse(r["method"])
        if spec.name != CLEAN and r["defense"] == main_defense:
            rounds, least = spec.option("rounds"), spec.option("min_rounds")
            if rounds is None:
                col = "default" if least is None else f">= {least}, until fit"
            else:
                col = str(rounds)
            groups[_without_rounds(spec)][col].append(r)
    groups = {base: per for base, per in groups.items() if len(per) >= 2}
    if not groups:
        return []
    def order(c: str) -> tuple[bool, int, bool]:
        digits = "".join(ch for ch in c if ch.isdigit())
        return c == "default", int(digits) if digits else 0, not c.isdigit()

    cols = sorted({c for per in groups.values() for c in per}, key=order)
    md = ["| method | victim | " + " | ".join(f"rounds {c}" for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for base, per in sorted(groups.items()):
        for v in sorted({r["victim"] for rs in per.values() for r in rs}):
            cells = [_fmt_cell([r for r in per.get(c, []) if r["victim"] == v]) for c in cols]
            if sum(cell != "-" for cell in cells) >= 2:  # a victim seen after one number of rounds compares nothing
                md.append(f"| {_code(base)} | {v} | " + " | ".join(cells) + " |")
    return md


def _dataset_section(rows: list[dict], ds: str, victims_all: list[str], main_defense: str,
                     counter_measures_victim: str) -> list[str]:
    """Per victim epochs: methods x victims for one dataset (the protocol table), then counter-measures x
    methods per victim that has them (``counter_measures_victim`` first), then the rounds table."""
    md: list[str] = []
    for epochs in sorted({r.get("epochs") or 0 for r in rows if r["dataset"] == ds}):
        here = [r for r in rows if r["dataset"] == ds and (r.get("epochs") or 0) == epochs]
        title = f"{dataset_tag(ds)}, {epochs} epochs" if epochs else dataset_tag(ds)
        sub = [r for r in here if r["defense"] == main_defense]
        if sub:
            victims = [v for v in victims_all if any(r["victim"] == v for r in sub)]
            md += [f"## {title}: methods x victims (counter-measure: {main_defense})", ""]
            md += _table(sub, "method", "victim", _method_order({r["method"] for r in sub}), victims, quality=True)
            beats = _beats_salm(sub, victims)
            md += ["", *beats, *([""] if beats else [])]
            md += ["Reproduce a cell: " + f"`{sub[0]['command']}` (change --methods/--victims).", ""]
        for v in sorted(victims_all, key=lambda name: name != counter_measures_victim):
            attacked = {r["method"] for r in here if r["victim"] == v and r["defense"] != "none"}
            dsub = [r for r in here if r["victim"] == v and r["method"] in attacked]
            dnames = _counter_measure_order({r["defense"] for r in dsub})
            if len(dnames) < 2:
                continue
            md += [f"### {title}: counter-measures against the release ({v})", ""]
            md += _table(dsub, "method", "defense", _method_order({r["method"] for r in dsub}), dnames)
            if any("no clean split released" in n for r in dsub for n in r.get("notes") or []):
                md += ["", "† no clean split released: clean-splits trained on train + val as released (perturbed)."]
            md += [""]
        rounds = rounds_section(here, main_defense)
        if rounds:
            md += [f"### {title}: protection AUC after n bi-level rounds", "", *rounds, ""]
    return md


def _figures_section(rows: list[dict], out: Path, victims_all: list[str]) -> list[str]:
    """Draw the K sweeps and learning curves into ``out``; the Markdown that shows them."""
    figs = []
    for v in victims_all:
        if k_sweep_figure(rows, out / f"k_sweep_{v}.png", v):
            figs.append((f"K sweep ({v})", f"k_sweep_{v}.png"))
    salm_methods = _method_order({r["method"] for r in rows if r["method_name"] == "salm"})
    if salm_methods:
        pick = "salm" if "salm" in salm_methods else next(
            (m for k in (0.2, 0.1) for m in salm_methods
             if MethodSpec.parse(m).option("k") == k and len(MethodSpec.parse(m).options) == 1), salm_methods[0])
        for v in victims_all:
            if curves_figure(rows, out / f"curves_{v}.png", v, pick):
                figs.append((f"Learning curves ({v}, clean vs `{pick}`)", f"curves_{v}.png"))
    md = ["## Figures", ""] if figs else []
    for caption, name in figs:
        md += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return md


def _timing_section(rows: list[dict]) -> list[str]:
    md = ["## Timing", "", "| dataset | method | protect s | images/s |", "|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["dataset"], r["method"], r["seed"])
        if r["method_name"] == CLEAN or key in seen or r.get("protect_seconds") is None:
            continue
        seen.add(key)
        md.append(f"| {dataset_tag(r['dataset'])} | {_code(r['method'])} | {r['protect_seconds']:.1f} | "
                  f"{r['protect_images_per_s']:.0f} |")
    return md


def build_report(root: str | Path, out: str | Path | None = None, *, title: str = "salm-fast experiment report",
                 main_defense: str = "none", counter_measures_victim: str = "resnet18") -> Path:
    """Write ``report.md`` (and its figures) for the grid in ``root``; returns the Markdown path."""
    root = Path(root)
    # One dataset, one name: grids may have named the same file by different paths.
    rows, stale = split_stale([{**r, "dataset": canonical_dataset(r["dataset"])} for r in load_results(root)])
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# {title}", "",
                     f"Source: `{root / 'results.csv'}` ({len(rows)} cells). Cells: **protection AUC** mean ± std "
                     "(n seeds) · raw test AUC (mean) of a victim trained from scratch on the data named by the row "
                     "and tested on the owner's clean test split; the protection AUC of a binary task is "
                     "max(AUC, 1 - AUC), since an attacker with a few clean labeled images flips an inverted ranking. "
                     "`clean` = trained on unprotected data, at the same epochs.", ""]
    respec = sorted({(r["respec_from"], r["method"]) for r in rows if r.get("respec_from")})
    if respec:
        md += ["Cells made under a former default are listed under the spec that reproduces them today: "
               + ", ".join(f"{_code(a)} as {_code(b)}" for a, b in respec) + ".", ""]
    if stale:
        specs = ", ".join(sorted({_code(r["method"]) for r in stale}))
        md += [f"Left out: {len(stale)} cells whose release was made under options this code no longer gives "
               f"their method spec (a default changed since): {specs}. Rerun them to include them.", ""]
    victims_all = sorted({r["victim"] for r in rows})
    for ds in sorted({r["dataset"] for r in rows}):
        md += _dataset_section(rows, ds, victims_all, main_defense, counter_measures_victim)
    md += _figures_section(rows, out, victims_all)
    sel = selected_classes_section(rows)
    if sel:
        md += ["## Protecting selected classes only", "", *sel, ""]
    md += _timing_section(rows)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


__all__ = ["COUNTER_MEASURES", "build_report", "curves_figure", "k_sweep_figure", "rounds_section"]
