"""The release protocol: every split perturbed, a secret per-release seed, and the attacker's counter-measures
(best-val early stopping, training on clean splits, known-pattern removal, flipped rankings), on tiny data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from salm_fast import evaluate, protect
from salm_fast.api import PurifySettings, attacker_data, checkpoint_seed, counter_measure_name, split_counter_measures
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import DataError, Dataset, load_medmnist, make_synthetic
from salm_fast.victims import train_victim

EPS = 8 / 255
FAST_VICTIM = dict(victim="cnn", epochs=1, precision="fp32", batch_size=32, augment="none")
QUICK_PURIFY = PurifySettings(method="random", rounds=None, steps=3)


def tiny_loop(rounds: int = 1) -> BiLevelConfig:
    return BiLevelConfig(max_rounds=rounds, surrogate_steps=2, batch_size=32, min_rounds=1, precision="fp32")


@pytest.fixture(scope="module")
def ds():
    return make_synthetic(n_train=64, n_val=16, n_test=24, seed=5)


# ------------------------------------------------------------------------------ defaults of protect
def test_the_default_release_perturbs_every_split_under_a_secret_seed(ds, tmp_path):
    res = protect(ds, "samplewise", out=tmp_path / "out", eps=EPS, steps=1, loop=tiny_loop(), figure=False,
                  keep_checkpoint=True)
    released = load_medmnist(res.release_path)
    for name in ds.splits:
        assert not np.array_equal(released[name].images, ds[name].images), name
    assert res.summary["splits"] == ["train", "val", "test"] and res.summary["seed_source"] == "os"
    seed = checkpoint_seed(tmp_path / ".out.salm-work" / "checkpoint.pt")  # the owner's private copy
    for name in ("summary.json", "rounds.jsonl"):
        assert str(seed) not in (tmp_path / "out" / name).read_text(), name
    with np.load(res.release_path, allow_pickle=False) as z:
        assert all(z[f].dtype == np.uint8 for f in z.files)


def test_two_default_releases_differ_and_a_given_seed_reproduces(ds, tmp_path):
    runs = {name: protect(ds, "random", out=tmp_path / name, eps=EPS, figure=False, **kw)
            for name, kw in (("a", {}), ("b", {}), ("c", dict(seed=3)), ("d", dict(seed=3)))}
    bytes_of = {name: r.release["train"].images.tobytes() for name, r in runs.items()}
    assert bytes_of["a"] != bytes_of["b"]  # two fresh OS seeds
    assert bytes_of["c"] == bytes_of["d"]
    assert [runs[n].summary["seed_source"] for n in "abcd"] == ["os", "os", "user", "user"]
    assert "seed" not in json.dumps(runs["c"].summary["options"]) and '"seed":' not in json.dumps(runs["c"].summary)


def test_a_resumed_run_reuses_the_seed_in_its_checkpoint(ds, tmp_path, monkeypatch):
    opts = dict(eps=EPS, steps=1, loop=tiny_loop(2), splits="train", figure=True)
    out, work = tmp_path / "out", tmp_path / ".out.salm-work"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("salm_fast.figures.protection_figure", no_space)
        with pytest.raises(OSError, match="No space"):
            protect(ds, "samplewise", out=out, **opts)
    seed = checkpoint_seed(work / "checkpoint.pt")
    resumed = protect(ds, "samplewise", out=out, resume=True, **opts)  # no seed given: the checkpoint's
    assert resumed.summary["seed_source"] == "checkpoint" and resumed.summary["protection"]["rounds"] == 2
    fresh = protect(ds, "samplewise", out=tmp_path / "fresh", seed=seed, **opts)
    assert resumed.release["train"].images.tobytes() == fresh.release["train"].images.tobytes()


def test_a_checkpoint_without_a_seed_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "config": {"max_rounds": 2}}, path)
    with pytest.raises(ValueError, match="records no seed"):
        checkpoint_seed(path)


# ------------------------------------------------------------------------------ counter-measure names
def test_counter_measure_names_split_into_attacker_steps_and_victim_defenses():
    assert split_counter_measures("jpeg-10+purify+best-val") == (("best-val", "purify"), "jpeg-10")
    assert split_counter_measures("none") == ((), None)
    assert counter_measure_name("mixup+crop_flip+clean-splits") == "clean-splits+crop_flip+mixup"
    assert counter_measure_name(None) == "none"
    with pytest.raises(ValueError, match="given twice"):
        split_counter_measures("best-val+best-val")
    with pytest.raises(ValueError, match="unknown defense 'voodoo'.*best-val, clean-splits, purify"):
        split_counter_measures("voodoo")
    x = torch.zeros((8, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(ValueError, match="step of the attacker's protocol"):
        train_victim("cnn", x, torch.arange(8) % 2, x, torch.arange(8) % 2, defense="best-val", epochs=1)


# ------------------------------------------------------------------------------ the attacker's training set
def _release(ds: Dataset, splits: tuple[str, ...]) -> Dataset:
    """``ds`` with +1 grey level on every image of ``splits``."""
    out = ds
    for s in splits:
        out = out.replace_split(s, np.minimum(ds[s].images.astype(np.int16) + 1, 255).astype(np.uint8))
    return out


def test_clean_splits_adds_a_split_released_clean(ds):
    data = attacker_data(ds, _release(ds, ("train",)), ("clean-splits",))
    assert data.splits == ["train", "val"] and len(data.train_x) == 80
    np.testing.assert_array_equal(data.train_x[64:, 0].numpy(), ds["val"].images)  # val as released: clean
    assert "released clean" in data.notes[0]
    data = attacker_data(ds, _release(ds, ("train", "val", "test")), ("clean-splits",))
    assert data.splits == ["train", "val"] and "no clean split released" in data.notes[0]
    assert data.select == "last" and data.val_x is None


def test_best_val_early_stops_on_the_owners_clean_val_split(ds):
    data = attacker_data(ds, _release(ds, ("train", "val", "test")), ("best-val",))
    assert data.select == "best_val" and data.splits == ["train"]
    np.testing.assert_array_equal(data.val_x[:, 0].numpy(), ds["val"].images)  # the owner's, not the release's
    without_val = Dataset(ds.name, {k: v for k, v in ds.splits.items() if k != "val"}, ds.n_classes)
    with pytest.raises(DataError, match="clean val split"):
        attacker_data(without_val, without_val, ("best-val",))


def test_purify_filters_what_was_released_perturbed_and_leaves_clean_splits_alone(ds):
    release = _release(ds, ("train",))
    data = attacker_data(ds, release, ("clean-splits", "purify"), purify=QUICK_PURIFY)
    np.testing.assert_array_equal(data.train_x[64:, 0].numpy(), ds["val"].images)
    assert any(n.startswith("purify: random re-protection") and n.endswith("on train") for n in data.notes)


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_shows_the_protection_auc_beside_the_auc(ds, tmp_path):
    release = _release(ds, ("train", "val", "test"))
    res = evaluate(ds, release, out=tmp_path / "e", **FAST_VICTIM)
    for run in ("clean", "release"):
        auc = getattr(res, run)["test"]["auc"]
        assert res.protection_auc(run) == max(auc, 1 - auc)
    header = res.table().splitlines()[1]
    assert header.index("test AUC") < header.index("protection AUC")
    saved = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert saved["protection_auc"]["release"] == res.protection_auc("release")


def test_evaluate_runs_the_attackers_steps_on_both_runs(ds):
    release = _release(ds, ("train",))  # val and test released clean
    res = evaluate(ds, release, defense="best-val+clean-splits", **{**FAST_VICTIM, "epochs": 2})
    assert res.defense == "best-val+clean-splits"
    for run in (res.clean, res.release):
        assert run["best_epoch"] in (1, 2) and run["settings"]["select"] == "best_val"
        assert run["settings"]["n_train"] == 80  # train + the val split released clean
    assert any("released clean" in n for n in res.notes["release"])
    assert "best epoch" in res.table()
    res = evaluate(ds, release, defense="purify", purify=QUICK_PURIFY, **FAST_VICTIM)
    assert res.settings["purify"]["method"] == "random" and any("purify" in n for n in res.notes["release"])
    with pytest.raises(TypeError, match="PurifySettings"):
        evaluate(ds, release, defense="purify", purify={"steps": 3}, **FAST_VICTIM)
