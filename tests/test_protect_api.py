"""protect() and evaluate(): complete outputs, a release medmnist loads, and bad input that writes nothing."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import pickle
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from salm_fast import evaluate, protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import (
    DataError, Dataset, load_image_folder, load_medmnist, make_synthetic, save_image_folder, save_medmnist,
)
from salm_fast.release import budget_levels

EPS = 8 / 255
SALM_FAST = dict(mask_epochs=1, generator_steps=2, width=8)


def tiny_loop(rounds: int = 1) -> BiLevelConfig:
    return BiLevelConfig(max_rounds=rounds, surrogate_steps=2, batch_size=32, min_rounds=1)




@pytest.fixture(scope="module")
def ds():
    return make_synthetic(n_train=64, n_val=8, n_test=24, seed=7)


@pytest.fixture
def breast_file(ds, tmp_path):
    """A tiny MedMNIST-format file named like the real BreastMNIST (28 px, 2 classes)."""
    (tmp_path / "in").mkdir()
    return save_medmnist(Dataset("breastmnist", dict(ds.splits), 2), tmp_path / "in" / "breastmnist.npz")


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def is_png(path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


# ------------------------------------------------------------------------------ outputs
def test_protect_writes_a_complete_set_of_outputs(breast_file, ds, tmp_path):
    out = tmp_path / "out"
    res = protect(breast_file, "salm", out=out, eps=EPS, k=0.1, seed=0, splits="train", loop=tiny_loop(), **SALM_FAST)
    assert res.release_path == out / "breastmnist.npz"
    assert sorted(snapshot(out)) == ["audit.json", "breastmnist.npz", "protection.png", "rounds.jsonl", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no work folder, lock or staging left
    assert is_png(out / "protection.png")

    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res.summary))
    for key in ("method", "options", "budget", "quality", "seconds", "images_per_second", "machine"):
        assert key in summary, key
    assert summary["method"] == "salm" and summary["options"]["k"] == 0.1 and summary["options"]["eps"] == EPS
    assert summary["budget"]["linf_levels"] <= budget_levels(EPS) == summary["budget_levels"]
    assert summary["budget"]["l0_max_per_image"] <= round(0.1 * 28 * 28)
    assert summary["budget"]["changed_images"] == summary["images"] == 64
    assert summary["seconds"] > 0 and summary["images_per_second"] > 0
    assert {"cpu", "threads", "torch"} <= set(summary["machine"])
    assert summary["quality"]["psnr_db"] > 30 and 0.9 < summary["quality"]["ssim"] <= 1
    assert "history" not in summary["protection"]
    assert len((out / "rounds.jsonl").read_text().splitlines()) == summary["protection"]["rounds"] == 1
    assert summary["files"] == {"release": "breastmnist.npz", "figure": "protection.png", "round_log": "rounds.jsonl"}
    assert summary["dataset"]["source"] == "breastmnist.npz"  # the file name, no directories
    assert str(tmp_path) not in (out / "summary.json").read_text()
    assert summary["precision"]["used"] in ("fp32", "bf16") and summary["precision"]["requested"] == "auto"
    assert summary["precision"]["reason"] and "not reported" not in summary["precision"]["reason"]

    with np.load(res.release_path, allow_pickle=False) as z:  # images and labels only: no noise, seed, clean copy
        assert sorted(z.files) == sorted(f"{s}_{kind}" for s in ("train", "val", "test")
                                         for kind in ("images", "labels"))
        assert all(z[f].dtype == np.uint8 for f in z.files)
    assert "ProtectResult" not in res.table() and "L-inf (stored bytes)" in res.table()


def test_release_loads_with_medmnists_own_class(breast_file, tmp_path):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # medmnist prints a notice about optional packages
            from medmnist.dataset import BreastMNIST
    except ImportError as exc:
        pytest.skip(f"medmnist is not importable: {exc}")
    out = tmp_path / "out"
    res = protect(breast_file, "random", out=out, eps=EPS, seed=0, figure=False)
    clean = load_medmnist(breast_file)
    for split in ("train", "test"):
        theirs = BreastMNIST(split=split, root=str(out), download=False)  # (its len() insists on 546 images)
        assert theirs.imgs.shape == clean[split].images.shape
        np.testing.assert_array_equal(theirs.imgs, res.release[split].images)
        np.testing.assert_array_equal(theirs.labels, clean[split].labels)
        img, label = theirs[0]
        assert img.size == (28, 28) and int(label[0]) == int(clean[split].labels[0, 0])
    assert not np.array_equal(BreastMNIST(split="train", root=str(out)).imgs, clean["train"].images)


def test_checkpoint_lives_in_the_work_folder_and_is_deleted_unless_kept(ds, tmp_path):
    opts = dict(eps=EPS, seed=0, steps=1, loop=tiny_loop(), figure=False)
    protect(ds, "samplewise", out=tmp_path / "a", **opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # the work folder went with the checkpoint
    protect(ds, "samplewise", out=tmp_path / "b", keep_checkpoint=True, **opts)
    work = tmp_path / ".b.salm-work"
    assert (work / "checkpoint.pt").is_file() and stat.S_IMODE(work.stat().st_mode) == 0o700
    for out in (tmp_path / "a", tmp_path / "b"):
        assert "checkpoint.pt" not in snapshot(out)


def test_a_chosen_work_folder_keeps_its_other_files(ds, tmp_path):
    work = tmp_path / "scratch"
    work.mkdir()
    (work / "mine.txt").write_text("not salm-fast's")
    opts = dict(eps=EPS, seed=0, steps=1, loop=tiny_loop(), figure=False, workdir=work)
    protect(ds, "samplewise", out=tmp_path / "out", keep_checkpoint=True, **opts)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "mine.txt", "rounds.jsonl"]
    protect(ds, "samplewise", out=tmp_path / "out", overwrite=True, resume=True, **opts)
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    with pytest.raises(ValueError, match="outside the output folder"):
        protect(ds, "samplewise", out=tmp_path / "out", overwrite=True, **{**opts, "workdir": tmp_path / "out" / "w"})


def test_overwrite_replaces_an_existing_release(ds, tmp_path):
    protect(ds, "random", out=tmp_path, eps=EPS, seed=0, figure=False)
    first = load_medmnist(tmp_path / "synthetic.npz")["train"].images
    protect(ds, "random", out=tmp_path, eps=EPS, seed=1, figure=False, overwrite=True)
    second = load_medmnist(tmp_path / "synthetic.npz")["train"].images
    assert not np.array_equal(first, second)


def test_resume_without_a_checkpoint_does_not_replace_a_finished_release(ds, tmp_path):
    protect(ds, "samplewise", out=tmp_path, eps=EPS, seed=0, steps=1, loop=tiny_loop(), figure=False)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):  # the checkpoint is gone: nothing to resume
        protect(ds, "samplewise", out=tmp_path, eps=4 / 255, seed=0, steps=1, loop=tiny_loop(), figure=False,
                resume=True)
    assert snapshot(tmp_path) == before


def test_image_folder_in_image_folder_out(ds, tmp_path):
    src = save_image_folder(ds, tmp_path / "in")
    res = protect(src, "random", out=tmp_path / "out", eps=EPS, k=30, seed=0, splits="train", figure=False)
    assert res.release_path == tmp_path / "out" / "images"
    rel, clean = load_image_folder(res.release_path), load_image_folder(src)
    for split in ("val", "test"):
        np.testing.assert_array_equal(rel[split].images, clean[split].images)
    diff = np.abs(rel["train"].images.astype(np.int16) - clean["train"].images.astype(np.int16))
    assert 1 <= diff.max() <= budget_levels(EPS)
    assert (diff > 0).reshape(len(diff), -1).sum(1).max() <= 30
    np.testing.assert_array_equal(rel["train"].labels, clean["train"].labels)


# ------------------------------------------------------------------------------ the output is published whole
def _fail(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["figure", "summary"])
def test_a_failure_after_the_release_publishes_nothing_and_resume_finishes(where, ds, tmp_path, monkeypatch):
    opts = dict(eps=EPS, seed=0, steps=1, loop=tiny_loop(2))
    full = protect(ds, "samplewise", out=tmp_path / "full", **opts)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if where == "figure":
            m.setattr("salm_fast.figures.protection_figure", _fail)
        else:
            m.setattr("salm_fast.api.atomic_write_json", _fail)
        with pytest.raises(OSError, match="No space left"):
            protect(ds, "samplewise", out=out, **opts)
    assert not out.exists()  # no release without its summary, no checkpoint beside a release
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.salm-work", "full"]  # no staging, no lock
    assert (tmp_path / ".out.salm-work" / "checkpoint.pt").is_file()

    resumed = protect(ds, "samplewise", out=out, resume=True, **opts)
    assert resumed.summary["protection"]["rounds"] == 2
    assert load_medmnist(resumed.release_path)["train"].images.tobytes() == full.release["train"].images.tobytes()
    assert sorted(snapshot(out)) == ["audit.json", "protection.png", "rounds.jsonl", "summary.json", "synthetic.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "out"]


def test_a_failed_overwrite_leaves_the_previous_output_untouched(ds, tmp_path, monkeypatch):
    protect(ds, "random", out=tmp_path / "out", eps=EPS, seed=0)
    before = snapshot(tmp_path / "out")
    monkeypatch.setattr("salm_fast.api.atomic_write_json", _fail)
    with pytest.raises(OSError, match="No space left"):
        protect(ds, "random", out=tmp_path / "out", eps=EPS, seed=1, overwrite=True)
    assert snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_runs_staging_folder_is_cleared_by_the_next_run(ds, tmp_path):
    stale = tmp_path / ".out.salm-staging-dead"  # what a SIGKILL during the write leaves
    stale.mkdir()
    (stale / "synthetic.npz").write_bytes(b"partial")
    protect(ds, "random", out=tmp_path / "out", eps=EPS, figure=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_folder_holding_other_files_is_refused(ds, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a salm-fast output .*notes.txt"):
            protect(ds, "random", out=out, eps=EPS, overwrite=overwrite)
    assert snapshot(out) == {"notes.txt": b"mine"} and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="symbolic link"):
        protect(ds, "random", out=tmp_path / "link", eps=EPS)


def test_a_second_run_into_the_same_output_refuses_while_the_first_holds_it(breast_file, tmp_path, monkeypatch):
    import salm_fast.api as api

    out = tmp_path / "out"
    started, finish = threading.Event(), threading.Event()
    real_fit = api.fit

    def slow_fit(job):
        started.set()
        assert finish.wait(120)
        return real_fit(job)

    monkeypatch.setattr(api, "fit", slow_fit)
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(result=protect(breast_file, "random", out=out, eps=EPS,
                                                                          seed=0, figure=False)))
    runner.start()
    try:
        assert started.wait(120)
        second = subprocess.run([sys.executable, "-m", "salm_fast.cli", "protect", "--data", str(breast_file),
                                 "--method", "random", "--seed", "1", "--out", str(out), "--quiet", "--no-figure"],
                                capture_output=True, text=True, timeout=300)
    finally:
        finish.set()
        runner.join(300)
    assert second.returncode == 2 and second.stdout == ""
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salm-fast: error: ") and "another run is writing" in lines[0]
    summary = json.loads((out / "summary.json").read_text())  # the first run's, describing its own release
    assert summary == json.loads(json.dumps(first["result"].summary))
    np.testing.assert_array_equal(load_medmnist(out / "breastmnist.npz")["train"].images,
                                  first["result"].release["train"].images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # the lock file went with the run


# ------------------------------------------------------------------------------ arguments said one way
def test_eps_as_a_fraction_string_and_the_precision_used_are_recorded(ds, tmp_path):
    res = protect(ds, "samplewise", out=tmp_path / "a", eps="4/255", seed=0, steps=1, loop=tiny_loop(),
                  precision="fp32", figure=False)
    assert res.summary["eps"] == 4 / 255 and res.summary["budget_levels"] == 4
    assert res.summary["precision"]["used"] == "fp32" and res.summary["precision"]["requested"] == "fp32"
    assert res.summary["options"]["loop"]["precision"] == "fp32"
    res = protect(ds, "random", out=tmp_path / "b", eps=0.02, seed=0, figure=False)
    assert res.summary["precision"] == {"requested": "auto", "used": "fp32",
                                        "reason": "random has no bi-level loop; it computes in fp32"}


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_the_summary_holds_no_seed(ds, tmp_path):
    res = protect(ds, "salm", out=tmp_path / "out", eps=EPS, k=0.1, seed=4321, loop=tiny_loop(), figure=False,
                  **SALM_FAST)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "seed" not in _keys(saved) and "seed" not in _keys(res.summary)
    assert "4321" not in (tmp_path / "out" / "summary.json").read_text()


def test_evaluate_refuses_non_integer_seed_and_epochs(ds):
    for bad in (dict(seed=1.5), dict(epochs=1.5), dict(epochs=0), dict(seed=True)):
        with pytest.raises(ValueError, match="must be an integer") as info:
            evaluate(ds, ds, **{**FAST_VICTIM, **bad})
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ bad input writes nothing
BAD = {
    "unknown method": (dict(method="nope"), ValueError, "unknown method"),
    "eps 0": (dict(eps=0.0), ValueError, "eps"),
    "eps < 0": (dict(eps=-8 / 255), ValueError, "eps"),
    "eps > 1": (dict(eps=1.5), ValueError, "eps"),
    "eps < 1 level": (dict(eps=0.5 / 255), ValueError, "eps"),
    "k 0": (dict(k=0), ValueError, "k"),
    "k 1.5": (dict(k=1.5), ValueError, "k"),
    "k > H*W": (dict(k=28 * 28 + 1), ValueError, "k must be between 1 and H\\*W=784"),
    "k for unmasked": (dict(method="samplewise", k=10), ValueError, "k"),
    "unknown split": (dict(splits="train2"), ValueError, "train2"),
    "unknown split in list": (dict(splits=["train", "bogus"]), ValueError, "bogus"),
    "unknown option": (dict(bogus=1), ValueError, "bogus"),
    "classes out of range": (dict(classes=[5]), ValueError, "classes"),
    "unknown backend": (dict(backend="cuda-magic"), ValueError, "cuda-magic"),
    "ambiguous eps 1": (dict(eps="1"), ValueError, "ambiguous"),
    "ambiguous eps 2": (dict(eps="2"), ValueError, "2/255"),
    "seed 1.5": (dict(seed=1.5), ValueError, "seed must be an integer"),
    "unknown precision": (dict(precision="fp8"), ValueError, "precision"),
    "precision vs loop": (dict(precision="bf16", loop=BiLevelConfig(precision="fp32")), ValueError, "contradicts"),
    "bf16 without a loop": (dict(method="random", precision="bf16"), ValueError, "no bi-level loop"),
    "workdir inside out": (dict(workdir="OUT/work"), ValueError, "outside the output folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_raise_before_anything_is_written(case, ds, tmp_path):
    args, exc, match = BAD[case]
    method = args.pop("method", "salm")
    out = tmp_path / "out"
    if "workdir" in args:
        args["workdir"] = out / "work"
    with pytest.raises(exc, match=match) as info:
        protect(ds, method, out=out, **{"eps": EPS, "seed": 0, **args})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_release_is_not_replaced_without_overwrite(ds, tmp_path):
    protect(ds, "random", out=tmp_path / "out", eps=EPS, seed=0)
    before = snapshot(tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        protect(ds, "random", out=tmp_path / "out", eps=EPS, seed=1)
    assert snapshot(tmp_path / "out") == before


def test_unwritable_output_fails_before_any_work(ds, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for out in (blocker / "sub", blocker):
        with pytest.raises(DataError, match="not a directory"):
            protect(ds, "random", out=out, eps=EPS, seed=0)
    assert sorted(snapshot(tmp_path)) == ["file.txt"] and blocker.read_text() == "not a folder"


def test_unreadable_inputs_raise_data_error_and_write_nothing(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    pickled = tmp_path / "pickled.npz"
    arrays = {"train_images": np.array([object()] * 4, dtype=object), "train_labels": np.zeros((4, 1), np.uint8)}
    with open(pickled, "wb") as fh:
        np.savez(fh, **arrays)
    raw_pickle = tmp_path / "raw.npz"
    raw_pickle.write_bytes(pickle.dumps({"train_images": np.zeros((4, 28, 28), np.uint8)}))
    nan_file = tmp_path / "nan.npz"
    with open(nan_file, "wb") as fh:
        np.savez(fh, train_images=np.full((4, 28, 28), np.nan, np.float32), train_labels=np.zeros((4, 1), np.uint8))
    for path, match in ((corrupt, "not a readable"), (pickled, "pickled"), (raw_pickle, "not a readable"),
                        (nan_file, "uint8"), (tmp_path / "missing.npz", "no such file")):
        out = tmp_path / f"out-{path.stem}"
        with pytest.raises(DataError, match=match):
            protect(path, "random", out=out, eps=EPS)
        assert not out.exists()


# ------------------------------------------------------------------------------ evaluate
FAST_VICTIM = dict(victim="cnn", epochs=1, precision="fp32", batch_size=32, augment="none")


def test_evaluate_writes_the_table_json_and_curves(ds, tmp_path):
    res = protect(ds, "random", out=tmp_path / "p", eps=EPS, k=40, seed=0, figure=False)
    out = tmp_path / "eval"  # a new folder: created once everything is checked
    report = evaluate(ds, res.release_path, out=out, **FAST_VICTIM)
    table = report.table()
    rows = {line.split()[0] for line in table.splitlines()}
    assert {"clean", "release"} <= rows
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["victim"] == "cnn" and set(saved["clean"]["test"]) >= {"acc", "auc", "balanced_acc"}
    assert saved["perturbation"]["linf_255"] <= budget_levels(EPS) and saved["perturbation"]["l0"] > 0
    assert is_png(out / "learning_curves.png")
    for run in (report.clean, report.release):
        assert 0 <= run["test"]["acc"] <= 1 and 0 <= run["test"]["auc"] <= 1


def test_evaluate_refuses_a_release_of_another_dataset(ds, tmp_path):
    relabelled = Dataset(ds.name, {**ds.splits, "train": type(ds["train"])(ds["train"].images,
                                                                           1 - ds["train"].labels)}, ds.n_classes)
    with pytest.raises(DataError, match="labels"):
        evaluate(ds, relabelled, out=tmp_path / "e", **FAST_VICTIM)
    other = make_synthetic(n_train=32, n_val=8, n_test=24, seed=7)
    with pytest.raises(DataError, match="do not match"):
        evaluate(ds, other, **FAST_VICTIM)
    with pytest.raises(ValueError, match="unknown victim"):
        evaluate(ds, ds, **{**FAST_VICTIM, "victim": "alexnet"})
    with pytest.raises(ValueError, match="defense"):
        evaluate(ds, ds, defense="voodoo", **FAST_VICTIM)
    assert not (tmp_path / "e").exists()
