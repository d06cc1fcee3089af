"""The quick audit: the verdict's thresholds, the budget checks (8-bit and stored values), the brief
victims (fixed epochs, held-out test images, the timing probe), audit.json beside the summary of
every protect, a failing audit that publishes nothing, and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import salm_fast.audit as audit_module
from salm_fast import protect
from salm_fast.audit import CLEAN_MIN_AUC, MIN_VICTIM_IMAGES, RETAINED_MAX, _verdict, audit
from salm_fast.cli import main
from salm_fast.data import Dataset, load_dataset, make_synthetic, save_medmnist
from tests.test_folders16 import LEVELS_16, make_folder16

EPS = 8 / 255
STATUSES = ("protected", "NOT protected", "inconclusive", "over budget")


@pytest.fixture(scope="module")
def small():
    """Fewer train images than a victim needs: the audit is the budget and quality alone (fast)."""
    return make_synthetic(n_train=40, n_val=4, n_test=12, seed=2)


@pytest.fixture(scope="module")
def victim_sized():
    return make_synthetic(n_train=MIN_VICTIM_IMAGES, n_val=4, n_test=40, seed=3)


def _moved(ds: Dataset, levels: int, pixels: int) -> Dataset:
    """``ds`` with ``pixels`` pixels of every train image moved up by ``levels`` (a hand-made release)."""
    images = ds["train"].images.astype(np.int64).copy()
    flat = images.reshape(len(images), -1)
    flat[:, :pixels] = np.clip(flat[:, :pixels] + levels, 0, 255)
    return ds.replace_split("train", images.astype(np.uint8))


# ------------------------------------------------------------------------------ the verdict
def test_verdict_thresholds():
    assert _verdict(0.95, 0.55, [], None)[0] == "protected"
    status, line, retained = _verdict(0.95, 0.5 + RETAINED_MAX * 0.45 + 0.01, [], None)
    assert status == "NOT protected" and line.startswith("NOT protected: a victim trained on the release reaches "
                                                         "protection AUC 0.62 vs 0.95 on clean data")
    assert retained == pytest.approx(RETAINED_MAX + 0.01 / 0.45)
    assert _verdict(1.0, 0.5 + RETAINED_MAX * 0.5, [], None)[0] == "protected"  # the bound itself (exact in binary)
    assert _verdict(CLEAN_MIN_AUC - 0.01, 0.5, [], None)[0] == "inconclusive"  # the clean victim learned too little
    assert _verdict(0.95, 0.55, ["train: L-inf 9/255 exceeds eps 8/255"], None)[1] == \
        "over budget: train: L-inf 9/255 exceeds eps 8/255"
    status, line, _ = _verdict(math.nan, math.nan, [], "40 train images, fewer than 200")
    assert status == "inconclusive" and "no victim trained (40 train images" in line
    assert "\n" not in line


# ------------------------------------------------------------------------------ the budget
def test_budget_quality_and_over_budget_without_victims(small):
    ok = audit(_moved(small, 8, 100), small, eps=EPS, k=100)
    assert ok.status == "inconclusive" and ok.settings["epochs"] == 0 and ok.victims == {}
    train = ok.budget["per_split"]["train"]
    assert train["linf_levels"] == 8 and train["l0_max_per_image"] <= 100 and ok.budget["over"] == []
    assert ok.budget["per_split"]["test"]["linf_levels"] == 0
    assert 30 < ok.quality["psnr_db"] < 60 and 0.5 < ok.quality["ssim"] < 1
    over = audit(_moved(small, 9, 100), small, eps=EPS)
    assert over.status == "over budget" and over.verdict.startswith("over budget: train: L-inf 9/255 exceeds eps 8/255")
    too_many = audit(_moved(small, 2, 101), small, eps=EPS, k=100)
    assert too_many.status == "over budget" and "101 pixels changed in an image, more than K = 100" in too_many.verdict
    unchecked = audit(_moved(small, 9, 100), small)  # no eps given or known: measured, not judged
    assert unchecked.status == "inconclusive" and unchecked.budget["per_split"]["train"]["linf_levels"] == 9


def test_stored_budget_of_16bit_folders(tmp_path):
    src = make_folder16(tmp_path / "in", ".png", "I;16")
    protect(src, "random", eps=EPS, out=tmp_path / "out", figure=False, audit=False)
    res = audit(tmp_path / "out", src)  # the output folder: its summary gives eps
    assert res.settings["eps"] == pytest.approx(EPS)
    per_bits = res.stored_budget["train"]["per_bits"]["16"]
    assert per_bits["budget_levels"] == LEVELS_16 and 255 < per_bits["linf_levels"] <= LEVELS_16
    assert res.status == "inconclusive"  # 16 images: no victim, and within budget
    with Image.open(tmp_path / "out" / "images" / "train-0.png") as im:  # one pixel pushed past the budget
        a = np.array(im).astype(np.int64)
    with Image.open(src / "train-0.png") as im:
        a[0, 0] = np.array(im)[0, 0] + LEVELS_16 + 1 if np.array(im)[0, 0] < 60000 else 0
    Image.fromarray(a.astype(np.uint16)).save(tmp_path / "out" / "images" / "train-0.png")
    res = audit(tmp_path / "out", src)
    assert res.status == "over budget"
    assert f"exceeds eps {LEVELS_16}/65535 (16-bit images)" in res.verdict


# ------------------------------------------------------------------------------ the victims
def test_victims_on_an_unperturbed_release_learn_the_same(victim_sized, tmp_path):
    res = audit(victim_sized, victim_sized, eps=EPS, epochs=1, out=tmp_path)
    assert res.settings["epochs"] == 1 and res.settings["epochs_chosen_by"] == "given"
    assert res.settings["n_train"] == MIN_VICTIM_IMAGES and res.settings["test"] == "clean test split"
    assert res.victims["clean"]["test"] == res.victims["release"]["test"]  # same data, seed, settings: same run
    assert 0.5 <= res.clean_auc <= 1 and res.release_auc == res.clean_auc
    assert res.retained == pytest.approx(1.0) or res.clean_auc == 0.5
    assert res.status == ("NOT protected" if res.clean_auc >= CLEAN_MIN_AUC else "inconclusive")
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["verdict"] == res.verdict and written["settings"]["victim"] == "cnn"
    assert written["budget"]["per_split"]["train"]["linf_levels"] == 0


def test_without_a_test_split_a_part_of_clean_train_is_held_out(victim_sized):
    clean = Dataset("notest", {"train": victim_sized["train"]}, victim_sized.n_classes)
    release = _moved(clean, 4, 50)
    res = audit(release, clean, epochs=1)
    held = round(0.2 * MIN_VICTIM_IMAGES)
    assert res.settings["n_test"] == held and res.settings["n_train"] == MIN_VICTIM_IMAGES - held
    assert res.settings["test"] == f"{held} images held out of the clean train split (no test split)"
    assert res.status in STATUSES


def test_timing_probe_fits_the_training_into_the_time_budget(victim_sized):
    res = audit(victim_sized, victim_sized, time_budget_s=1e-3)  # far too little for one epoch: a subset
    assert res.settings["epochs"] == 1 and res.settings["n_train"] == 2
    assert res.settings["epochs_chosen_by"].startswith("timing probe: ")
    assert res.settings["epochs_chosen_by"].endswith(f"one epoch on 2 of {MIN_VICTIM_IMAGES} train images")


def test_bad_arguments_are_refused_in_one_line(small, tmp_path):
    for kwargs, message in ((dict(victim="alexnet"), "unknown victim 'alexnet'"),
                            (dict(epochs=0), "epochs must be an integer >= 1"),
                            (dict(time_budget_s=0), "time_budget_s must be a number of seconds > 0"),
                            (dict(out=tmp_path / "nope"), "no such folder for audit.json")):
        with pytest.raises(ValueError, match=message):
            audit(small, small, **kwargs)
    other = make_synthetic(n_train=40, n_val=4, n_test=12, seed=9)
    with pytest.raises(ValueError, match="release train labels differ from the clean labels"):
        audit(other, small)


# ------------------------------------------------------------------------------ inside protect
def test_protect_audits_the_release_before_publishing(small, tmp_path):
    out = tmp_path / "out"
    result = protect(small, "random", eps=EPS, out=out, figure=False)
    assert (out / "audit.json").is_file()
    assert result.summary["audit"]["file"] == "audit.json"
    assert result.summary["audit"]["status"] == "inconclusive"  # 40 images: the budget alone
    written = json.loads((out / "audit.json").read_text())
    assert written["verdict"] == result.summary["audit"]["verdict"]
    assert written["budget"]["per_split"]["train"] == result.summary["budget_per_split"]["train"]
    assert json.loads((out / "summary.json").read_text())["audit"] == result.summary["audit"]
    protect(small, "random", eps=EPS, out=tmp_path / "quiet", figure=False, audit=False)
    assert not (tmp_path / "quiet" / "audit.json").exists()


def test_a_failing_audit_publishes_nothing(small, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("audit broke")

    monkeypatch.setattr(audit_module, "audit", broken)
    with pytest.raises(RuntimeError, match="audit broke"):
        protect(small, "random", eps=EPS, out=tmp_path / "out", figure=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, staging folder, lock or work folder


# ------------------------------------------------------------------------------ the CLI
def test_cli_audit_of_an_output_folder(small, tmp_path, capsys):
    data = save_medmnist(Dataset("breastmnist", dict(small.splits), 2), tmp_path / "breastmnist.npz")
    out = tmp_path / "out"
    assert main(["protect", "--data", str(data), "--method", "random", "--out", str(out), "--quiet",
                 "--no-figure", "--no-audit"]) == 0
    assert not (out / "audit.json").exists()
    capsys.readouterr()
    report = tmp_path / "report"
    report.mkdir()
    assert main(["audit", str(out), "--clean", str(data), "--out", str(report), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train  L-inf 8/255, L0 ")
    assert lines[-2].startswith("inconclusive: no victim trained (40 train images")
    assert lines[-1] == f"results: {report / 'audit.json'}"
    assert json.loads((report / "audit.json").read_text())["settings"]["eps"] == pytest.approx(EPS)
    # Over budget: exit status 1 (a check a script can use before sharing).
    released = load_dataset(out / "breastmnist.npz")
    (tmp_path / "over").mkdir()
    save_medmnist(_moved(released, 20, 1), tmp_path / "over" / "breastmnist.npz")
    assert main(["audit", str(tmp_path / "over" / "breastmnist.npz"), "--clean", str(data), "--eps", "8/255",
                 "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("over budget: train: L-inf")
    assert main(["audit", str(out), "--clean", str(data), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "salm-fast: error: epochs must be an integer >= 1, got 0"
