"""Experiment grids, reports and class-combined datasets, on tiny synthetic data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from salm_fast.data import DataError, combine, load_dataset, make_synthetic
from salm_fast.experiment import Grid, MethodSpec, load_results
from salm_fast.report import build_report

DATA = "synthetic:n=120,seed=3"
QUICK = "salm:k=0.1,rounds=1"


def test_method_spec_round_trips_and_rejects_bad_specs():
    spec = MethodSpec.parse("salm:noise=pgd,k=0.05,classes=0|2")
    assert spec.name == "salm" and spec.option("k") == 0.05 and spec.option("classes") == [0, 2]
    assert MethodSpec.parse(str(spec)) == spec
    assert "/" not in spec.tag and ":" not in spec.tag
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        MethodSpec.parse("bogus")
    with pytest.raises(ValueError, match="expected key=value"):
        MethodSpec.parse("salm:k")
    with pytest.raises(ValueError, match="clean baseline takes no options"):
        MethodSpec.parse("clean:k=1")


def test_grid_runs_caches_resumes_and_reports(tmp_path):
    root = tmp_path / "grid"
    methods = ["clean", "random", QUICK, "salm:k=0.2,rounds=1"]
    grid = Grid(root, [DATA], methods, ["cnn"], ["none", "jpeg-50"], [0], epochs=1, precision="fp32")
    # An "interrupted" grid: only part of it ran.
    Grid(root, [DATA], methods[:2], ["cnn"], ["none"], [0], epochs=1, precision="fp32").run(progress=False, log=None)
    done = {p: p.stat().st_mtime_ns for p in (root / "cells").rglob("*.json")}
    assert len(done) == 2
    rows = grid.run(progress=False, log=None)
    assert len(rows) == len(methods) * 2
    for p, mtime in done.items():  # finished cells were not recomputed
        assert p.stat().st_mtime_ns == mtime
    table = load_results(root)
    assert len(table) == len(rows)
    for r in table:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_auc"] <= 1.0
        assert r["command"].startswith("salm-fast experiment --root ")
        assert f"--methods {r['method']}" in r["command"] or f"--methods '{r['method']}'" in r["command"]
        if r["method_name"] != "clean":
            assert r["linf_255"] <= 8 and r["protect_seconds"] > 0
        else:
            assert r["linf_255"] == 0 and r["l0"] == 0
    salm = [r for r in table if r["method_name"] == "salm"]
    assert {r["k"] for r in salm} == {0.1, 0.2}
    assert all(r["l0"] <= r["k"] + 1e-9 for r in salm)
    assert (root / "results.csv").read_text().count("\n") == len(rows) + 1
    # Releases are shared by the cells that use them: one protection per (method, seed).
    assert len(list((root / "releases").rglob("summary.json"))) == 3
    report = build_report(root)
    text = report.read_text()
    assert "methods x victims" in text and "counter-measures" in text and "`clean`" in text
    assert (report.parent / "k_sweep_cnn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grids_sharing_a_root_grow_one_table_and_epochs_key_the_cells(tmp_path):
    root = tmp_path / "grid"
    first = Grid(root, [DATA], ["clean"], ["cnn"], epochs=1, precision="fp32").run(progress=False, log=None)
    second = Grid(root, [DATA], ["clean"], ["cnn"], epochs=2, precision="fp32").run(progress=False, log=None)
    assert [r["epochs"] for r in first] == [1] and [r["epochs"] for r in second] == [2]  # not the cached 1-epoch cell
    table = load_results(root)
    assert sorted(r["epochs"] for r in table) == [1, 2]
    assert all(r["clean_test_auc_same_victim"] == r["test_auc"] for r in table)  # each joined to its own epochs
    assert len(list((root / "cells").rglob("*.json"))) == 2


def test_grid_rejects_unknown_victims_and_defenses(tmp_path):
    with pytest.raises(ValueError, match="unknown victims"):
        Grid(tmp_path, [DATA], ["clean"], ["alexnet"])
    with pytest.raises(ValueError):
        Grid(tmp_path, [DATA], ["clean"], ["cnn"], ["jpeg-500"])


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="salm-fast experiment"):
        build_report(tmp_path)


def test_combine_offsets_labels_and_checks_shapes():
    a = make_synthetic(n_train=20, n_val=4, n_test=6, seed=1)
    b = make_synthetic(n_train=10, n_val=2, n_test=4, n_classes=3, seed=2)
    c = combine([a, b])
    assert c.n_classes == 5 and len(c["train"]) == 30
    np.testing.assert_array_equal(c["train"].labels[:20], a["train"].labels)
    np.testing.assert_array_equal(c["train"].labels[20:], b["train"].labels + 2)
    np.testing.assert_array_equal(c["test"].images[6:], b["test"].images)
    assert c.label_names[2].startswith("synthetic:")
    with pytest.raises(DataError, match="combine"):
        combine([a, make_synthetic(n_train=10, n_val=2, n_test=2, channels=3)])
    with pytest.raises(DataError, match="two or more sources"):
        load_dataset("combine:only.npz")


def test_combine_spec_loads_files(tmp_path):
    from salm_fast.data import save_medmnist

    a = make_synthetic(n_train=12, n_val=2, n_test=4, seed=4)
    pa = save_medmnist(a, tmp_path / "a.npz")
    pb = save_medmnist(make_synthetic(n_train=8, n_val=2, n_test=2, seed=5), tmp_path / "b.npz")
    c = load_dataset(f"combine:{pa}+{pb}")
    assert c.n_classes == 4 and len(c["train"]) == 20
    json.dumps(c.label_names)


def test_one_dataset_file_has_one_canonical_name(tmp_path, monkeypatch):
    from salm_fast.experiment import canonical_dataset

    f = tmp_path / "d" / "breastmnist.npz"
    f.parent.mkdir()
    f.write_bytes(b"")
    monkeypatch.chdir(tmp_path / "d")
    assert canonical_dataset("breastmnist.npz") == canonical_dataset(str(f)) == canonical_dataset("../d/breastmnist.npz")
    assert canonical_dataset("synthetic:n=10") == "synthetic:n=10"


def test_class_selection_specs_build_their_methods():
    from salm_fast.methods import make_method

    for text, want in (("salm:classes=0", [0]), ("salm:k=0.2,classes=0|2", [0, 2])):
        spec = MethodSpec.parse(text)
        m = make_method(spec.name, **dict(spec.options))
        assert m.classes == want


def test_dataset_specs_are_not_mistaken_for_their_last_file(tmp_path):
    from salm_fast.experiment import canonical_dataset, dataset_tag

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"")
    b.write_bytes(b"")
    spec = f"combine:{a}+{b}"
    assert dataset_tag(spec).startswith("combine-") and dataset_tag(spec) != dataset_tag(str(b)) == "b"
    assert canonical_dataset(spec) == spec


def test_report_escapes_pipes_in_method_specs():
    from salm_fast.report import _code

    assert _code("salm:classes=0|1") == "`salm:classes=0\\|1`"


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from salm_fast.figures import learning_curves, protection_figure
    from salm_fast.report import k_sweep_figure

    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # e.g. a notebook's own backend
    try:
        clean = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
        protection_figure(clean, clean + 1, np.ones((4, 1, 8, 8)), np.array([0, 1, 0, 1]), tmp_path / "p.png")
        learning_curves({"clean": [{"epoch": 1, "train_acc": 0.5, "test_acc": 0.5}]}, tmp_path / "c.png")
        rows = [dict(dataset=DATA, victim="cnn", defense="none", method=f"salm:k={k}", k=k, test_acc=0.6,
                     test_auc=0.7) for k in (0.1, 0.2)]
        assert k_sweep_figure(rows, tmp_path / "k.png", "cnn")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    for name in ("p.png", "c.png", "k.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ cache keys, epochs, shards
def _files(tmp_path, **seeds) -> dict[str, str]:
    from salm_fast.data import save_medmnist

    out = {}
    for name, seed in seeds.items():
        folder = tmp_path / name
        folder.mkdir()
        data = make_synthetic(n_train=20, n_val=4, n_test=6, seed=seed)
        out[name] = str(save_medmnist(data, folder / "synthetic.npz"))
    return out


def test_cache_keys_hash_every_setting_that_changes_a_result(tmp_path):
    files = _files(tmp_path, a=1, b=2, c=1)  # b: same file name, other content; c: a's content elsewhere

    def where(data="a", method="salm", **kw):
        grid = Grid(tmp_path / "grid", [files[data]], [method], ["cnn"], **{"epochs": 1, **kw})
        cell = grid.cells()[0]
        return grid.cell_path(cell), grid.release_dir(cell.dataset, cell.method, cell.seed)

    cell, release = where()
    for other in (dict(augment="none"), dict(precision="fp32"), dict(epochs=2), dict(defenses=["jpeg-10"])):
        changed = where(**other)
        assert changed[0] != cell and changed[1] == release, other
    for other in (dict(data="b"), dict(eps=4 / 255), dict(method="salm:k=0.1"), dict(seeds=[1])):
        changed = where(**other)
        assert changed[0] != cell and changed[1] != release, other
    assert where(data="c")[0].name == cell.name  # the content, not the path, names the data
    from salm_fast.methods import SALM

    SALM.default_k, saved = 0.1, SALM.default_k  # a changed default is a new release, not a stale cache
    try:
        changed = where()
    finally:
        SALM.default_k = saved
    assert changed[0] != cell and changed[1] != release


def test_purify_settings_key_the_purify_cells_only(tmp_path):
    from salm_fast.api import PurifySettings

    def paths(purify):
        grid = Grid(tmp_path, [DATA], ["salm"], ["cnn"], ["none", "purify"], purify=purify)
        return [grid.cell_path(c) for c in grid.cells()]

    default, quick = paths(None), paths(PurifySettings(steps=5))
    assert default[0] == quick[0] and default[1] != quick[1]


def test_epochs_per_dataset(tmp_path):
    from salm_fast.experiment import parse_epochs

    files = _files(tmp_path, a=1, b=2)
    paths = [files["a"].replace("synthetic.npz", "alpha.npz"), files["b"].replace("synthetic.npz", "beta.npz")]
    for src, dst in zip(files.values(), paths):
        Path(src).rename(dst)
    grid = Grid(tmp_path / "grid", paths, ["clean"], ["cnn"], epochs="alpha=3,beta=5")
    assert [grid.epochs_for(p) for p in paths] == [3, 5]
    assert [c.split("--epochs ")[1].split()[0] for c in map(grid.command, grid.cells())] == ["3", "5"]
    assert parse_epochs("15") == 15 and parse_epochs({"alpha": 2}) == {"alpha": 2} and parse_epochs(None) is None
    for bad, match in (("alpha=3", "no value for beta"), ("alpha=3,beta=5,gamma=1", "no dataset named gamma")):
        with pytest.raises(ValueError, match=match):
            Grid(tmp_path / "grid", paths, ["clean"], ["cnn"], epochs=bad)
    for bad in ("0", "alpha=x", "alpha=", "=3", "1.5"):
        with pytest.raises(ValueError, match="epochs"):
            parse_epochs(bad)


def test_shards_split_the_cells_and_every_shard_writes_the_whole_table(tmp_path, monkeypatch):
    root = tmp_path / "grid"
    args = (root, [DATA], ["clean"], ["cnn"], ["none"], [0, 1, 2])
    first = Grid(*args, epochs=1, precision="fp32", shard="0/2")
    assert [c.seed for c in first.my_cells()] == [0, 2]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    second = Grid(*args, epochs=1, precision="fp32")
    assert second.shard == (1, 2) and [c.seed for c in second.my_cells()] == [1]
    assert [r["seed"] for r in second.run(progress=False, log=None)] == [1]
    first.run(progress=False, log=None)
    assert sorted(r["seed"] for r in load_results(root)) == [0, 1, 2]
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            Grid(*args, shard=bad)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE"):
        Grid(*args)


def test_a_release_another_shard_is_writing_is_waited_for(tmp_path, monkeypatch):
    import salm_fast.api as api
    from salm_fast.data import OutputInUseError

    grid = Grid(tmp_path / "grid", [DATA], ["random"], ["cnn"], epochs=1)
    grid.poll_s = 0.0
    real, calls = api.protect, []

    def busy(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) > 1:
            raise AssertionError("the release was computed twice")
        real(*args, **kwargs)  # the other shard publishes it ...
        raise OutputInUseError("another run is writing this output")  # ... while this one found it locked

    monkeypatch.setattr(api, "protect", busy)
    release, summary = grid.protection(DATA, grid.methods[0], 0, progress=False)
    assert calls == [0] and summary["method"] == "random" and summary["splits"] == ["train", "val", "test"]
    assert release["train"].images.shape == grid.dataset(DATA)["train"].images.shape


# ------------------------------------------------------------------------------ the attacker's counter-measures
def test_grid_cells_run_the_attackers_counter_measures(tmp_path):
    from salm_fast.api import PurifySettings

    root = tmp_path / "grid"
    grid = Grid(root, [DATA], ["clean", "random", "random:splits=train"], ["cnn"],
                ["none", "best-val", "clean-splits", "purify"], [0], epochs=2, precision="fp32",
                purify=PurifySettings(method="random", rounds=None, steps=2))
    rows = {(r["method"], r["defense"]): r for r in grid.run(progress=False, log=None)}
    assert len(rows) == 12
    for r in rows.values():
        assert r["test_auc_protection"] == max(r["test_auc"], 1 - r["test_auc"])
        assert (r["best_epoch"] in (1, 2)) == (r["defense"] == "best-val")
    assert rows[("random", "clean-splits")]["trained_on"] == ["train", "val"]
    assert any("no clean split released" in n for n in rows[("random", "clean-splits")]["notes"])
    assert any("released clean" in n for n in rows[("random:splits=train", "clean-splits")]["notes"])
    assert rows[("random:splits=train", "none")]["released_splits"] == ["train"]
    assert any(n.startswith("purify") for n in rows[("random", "purify")]["notes"])
    header = (root / "results.csv").read_text().splitlines()[0].split(",")
    assert header.index("test_auc_protection") == header.index("test_auc") + 1 and "best_epoch" in header
    text = build_report(root).read_text()
    assert "| method | none | best-val | clean-splits | purify |" in text
    assert "† no clean split released" in text


# ------------------------------------------------------------------------------ the report's tables
def _row(method, victim="resnet18", defense="none", seed=0, auc=0.8, **extra):
    from salm_fast.experiment import MethodSpec

    return {"dataset": "synthetic:n=10", "method": method, "method_name": MethodSpec.parse(method).name,
            "victim": victim, "defense": defense, "seed": seed, "test_acc": 0.7, "test_auc": auc,
            "test_auc_protection": max(auc, 1 - auc), "epochs": 30, "psnr_db": 37.0, "ssim": 0.98,
            "k": None, "history": [{"epoch": 1, "train_acc": 0.5, "test_acc": 0.5}], "command": "salm-fast ...",
            **extra}


def _report(tmp_path, rows) -> str:
    (tmp_path / "results.json").write_text(json.dumps(rows))
    return build_report(tmp_path).read_text()


def test_report_shows_protection_auc_mean_std_over_seeds_and_quality(tmp_path):
    rows = [_row("clean", seed=s, auc=0.9, psnr_db=float("inf"), ssim=1.0) for s in (0, 1, 2)]
    rows += [_row("salm", seed=s, auc=a) for s, a in ((0, 0.4), (1, 0.6), (2, 0.5))]
    text = _report(tmp_path, rows)
    assert "| method | resnet18 | PSNR dB | SSIM |" in text
    assert "| `salm` | 0.567 ± 0.058 (3) · 0.500 | 37.0 | 0.9800 |" in text  # max(AUC, 1 - AUC): 0.6, 0.6, 0.5
    assert "| `clean` | 0.900 ± 0.000 (3) · 0.900 | - | - |" in text
    lines = text.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("| `clean`"))) < lines.index(
        next(x for x in lines if x.startswith("| `salm`")))


def test_report_leaves_out_cells_made_under_a_former_default(tmp_path):
    from salm_fast.experiment import MethodSpec, resolved_options

    now = resolved_options(MethodSpec.parse("salm"), None)
    former = {**now, "code_scale": now["code_scale"] + 1}  # as if the default had changed since
    rows = [_row("salm", seed=0, auc=0.6, key={"eps": None, "resolved": now}),
            _row("salm", seed=1, auc=0.9, key={"eps": None, "resolved": former}),
            {**_row("salm", seed=0, auc=0.9, key={"eps": None, "resolved": now}), "method": "salm:bogus=1"}]
    # the last: an option removed since
    text = _report(tmp_path, rows)
    assert "| `salm` | 0.600 (1) · 0.600 |" in text  # the former default's seed is not pooled with it
    # ... it is listed under the spec that reproduces it today
    assert f"| `salm:code_scale={former['code_scale']}` | 0.900 (1) · 0.900 |" in text
    assert f"`salm` as `salm:code_scale={former['code_scale']}`" in text
    assert "Left out: 1 cells" in text and "`salm:bogus=1`" in text
    assert "| `salm:bogus=1` |" not in text
    loop = {**now, "loop": {**now["loop"], "min_rounds": 1}}  # a former loop default: written as min_rounds=
    text = _report(tmp_path, [_row("salm", seed=0, auc=0.7, key={"eps": None, "resolved": loop})])
    assert "| `salm:min_rounds=1` | 0.700 (1) · 0.700 |" in text
    odd = {**now, "loop": {**now["loop"], "surrogate_lr": 0.5}}  # no spec option sets it: left out
    text = _report(tmp_path, [_row("salm", seed=0, auc=0.7, key={"eps": None, "resolved": odd})])
    assert "Left out: 1 cells" in text


def test_report_says_where_a_baseline_beats_the_default_salm_by_protection_auc(tmp_path):
    rows = [_row("salm", auc=0.62), _row("tap", auc=0.30), _row("classwise", auc=0.58), _row("salm:k=0.1", auc=0.7)]
    text = _report(tmp_path, rows)
    beats = next(x for x in text.splitlines() if x.startswith("- resnet18: lower protection AUC"))
    assert "`classwise` 0.580" in beats and "tap" not in beats  # tap's 0.30 flips to 0.70


def test_report_counter_measures_in_protocol_order_and_rounds_table(tmp_path):
    rows = [_row(m, defense=d, auc=0.6, **({"best_epoch": 2} if d == "best-val" else {}))
            for m in ("clean", "salm") for d in ("adv-8", "purify", "best-val", "jpeg-10", "none", "mixup")]
    rows += [_row("salm:rounds=1", auc=0.8), _row("salm:rounds=5,min_rounds=5", auc=0.7),
             _row("salm", victim="cnn", auc=0.65), _row("salm:min_rounds=1", auc=0.75)]
    text = _report(tmp_path, rows)
    assert "| method | none | jpeg-10 | mixup | best-val | purify | adv-8 |" in text
    assert "(best ep. 2.0)" in text
    assert "| method | victim | rounds 1 | rounds >= 1, until fit | rounds 5 | rounds default |" in text
    cells = "0.800 (1) · 0.800 | 0.750 (1) · 0.750 | 0.700 (1) · 0.700 | 0.600 (1) · 0.600"
    assert f"| `salm` | resnet18 | {cells} |" in text
    sections = [x for x in text.splitlines() if x.startswith("### ") and "counter-measures" in x]
    assert sections and "(resnet18)" in sections[0]
