"""``salm-fast report``: a Markdown report (with PNG figures) from an experiment grid's table.

Sections, each present when the grid holds the cells it needs:

* main table: rows = methods, columns = victims, cells = clean test ACC / AUC
  (mean over seeds), the clean-data victim as the first row; per dataset, no defense;
* counter-measures: rows = methods, columns = defenses, for each victim that has them;
* K sweep: clean test accuracy and AUC vs K for SALM, per dataset (figure);
* learning curves: a victim's train / clean-test accuracy per epoch, clean vs protected;
* selected classes: per-class clean test accuracy when SALM protects only some classes.

Each table row names the command that reproduces its cells.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from .data.atomic import atomic_path
from .experiment import CLEAN, MethodSpec, canonical_dataset, dataset_tag, load_results
from .figures import new_figure, save_png


def _code(text: str) -> str:
    """`text` for a Markdown table cell (a literal | would end the cell)."""
    return "`" + str(text).replace("|", "\\|") + "`"


def _beats_salm(rows: list[dict], victims: list[str]) -> list[str]:
    """Where another protection leaves a victim a lower test AUC than the best SALM at K <= 20%."""
    out = []
    for v in victims:
        auc: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["victim"] == v and r["method_name"] != CLEAN:
                auc[r["method"]].append(r["test_auc"])
        specs = {m: MethodSpec.parse(m) for m in auc}
        salm = [mean(auc[m]) for m, sp in specs.items() if sp.name == "salm" and sp.option("classes") is None
                and isinstance(sp.option("k"), float) and sp.option("k") <= 0.2]
        if not salm:
            continue
        best = min(salm)
        better = sorted((mean(a), m) for m, a in auc.items() if specs[m].name != "salm" and mean(a) < best)
        if better:
            out.append(f"- {v}: lower victim AUC than the best SALM at K <= 20% ({best:.3f}): "
                       + ", ".join(f"{_code(m)} {a:.3f}" for a, m in better) + "."
                       + (" (An AUC under 0.5 is an inverted ranking: flipping the victim's scores gives 1 - AUC.)"
                          if any(a < 0.5 for a, _ in better) else ""))
    return out


def _fmt_cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    acc = mean(r["test_acc"] for r in rows)
    auc = mean(r["test_auc"] for r in rows)
    n = f" (n={len(rows)})" if len(rows) > 1 else ""
    return f"{acc:.3f} / {auc:.3f}{n}"


def _method_order(methods: set[str]) -> list[str]:
    def key(m: str):
        spec = MethodSpec.parse(m)
        rank = {CLEAN: 0, "random": 1, "salm": 2}.get(spec.name, 3)
        k = spec.option("k")
        return rank, spec.name, k if isinstance(k, (int, float)) else 0, m
    return sorted(methods, key=key)


def _table(rows: list[dict], row_key: str, col_key: str, rows_order: list[str], cols_order: list[str]) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r[row_key], r[col_key])].append(r)
    head = f"| {row_key} | " + " | ".join(cols_order) + " |"
    lines = [head, "|" + "---|" * (len(cols_order) + 1)]
    for rk in rows_order:
        cells = [_fmt_cell(groups.get((rk, ck), [])) for ck in cols_order]
        lines.append(f"| {_code(rk)} | " + " | ".join(cells) + " |")
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


def _dataset_section(rows: list[dict], ds: str, victims_all: list[str], main_defense: str) -> list[str]:
    """Methods x victims for one dataset, then counter-measures x methods per victim that has them."""
    md: list[str] = []
    sub = [r for r in rows if r["dataset"] == ds and r["defense"] == main_defense]
    if not sub:
        return md
    victims = [v for v in victims_all if any(r["victim"] == v for r in sub)]
    md += [f"## {dataset_tag(ds)}: methods x victims (defense: {main_defense})", ""]
    md += _table(sub, "method", "victim", _method_order({r["method"] for r in sub}), victims)
    md += ["", *_beats_salm(sub, victims)]
    md += ["", "Reproduce a cell: " + f"`{sub[0]['command']}` (change --methods/--victims).", ""]
    defenses = sorted({r["defense"] for r in rows if r["dataset"] == ds})
    if len(defenses) < 2:
        return md
    for v in victims_all:
        attacked = {r["method"] for r in rows if r["dataset"] == ds and r["victim"] == v and r["defense"] != "none"}
        dsub = [r for r in rows if r["dataset"] == ds and r["victim"] == v and r["method"] in attacked]
        dnames = sorted({r["defense"] for r in dsub}, key=lambda d: (d != "none", d))
        if len(dnames) < 2:
            continue
        md += [f"### {dataset_tag(ds)}: counter-measures against the release ({v})", ""]
        md += _table(dsub, "method", "defense", _method_order({r["method"] for r in dsub}), dnames)
        md += [""]
    return md


def _figures_section(rows: list[dict], out: Path, victims_all: list[str]) -> list[str]:
    """Draw the K sweeps and learning curves into ``out``; the Markdown that shows them."""
    figs = []
    for v in victims_all:
        if k_sweep_figure(rows, out / f"k_sweep_{v}.png", v):
            figs.append((f"K sweep ({v})", f"k_sweep_{v}.png"))
    salm_methods = _method_order({r["method"] for r in rows if r["method_name"] == "salm"})
    if salm_methods:
        pick = next((m for k in (0.2, 0.1) for m in salm_methods
                     if MethodSpec.parse(m).option("k") == k and len(MethodSpec.parse(m).options) == 1),
                    salm_methods[0])
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
                 main_defense: str = "none") -> Path:
    """Write ``report.md`` (and its figures) for the grid in ``root``; returns the Markdown path."""
    root = Path(root)
    # One dataset, one name: grids may have named the same file by different paths.
    rows = [{**r, "dataset": canonical_dataset(r["dataset"])} for r in load_results(root)]
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# {title}", "",
                     f"Source: `{root / 'results.csv'}` ({len(rows)} cells). Cells: clean **test ACC / AUC** of a "
                     "victim trained from scratch on the data named by the row, tested on the clean test split "
                     "(mean over seeds; n = number of seeds when > 1). `clean` = trained on unprotected data.", ""]
    victims_all = sorted({r["victim"] for r in rows})
    for ds in sorted({r["dataset"] for r in rows}):
        md += _dataset_section(rows, ds, victims_all, main_defense)
    md += _figures_section(rows, out, victims_all)
    sel = selected_classes_section(rows)
    if sel:
        md += ["## Protecting selected classes only", "", *sel, ""]
    md += _timing_section(rows)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


__all__ = ["build_report", "curves_figure", "k_sweep_figure"]
