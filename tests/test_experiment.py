"""Experiment grids, reports and class-combined datasets, on tiny synthetic data."""
from __future__ import annotations

import json

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
