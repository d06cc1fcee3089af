"""Protecting images that arrive later: protect(save_protector=) and apply()."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from salm_fast import apply, load_protector, protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.cli import main
from salm_fast.data import load_dataset, make_synthetic
from salm_fast.protector import FORMAT, KEYS, fingerprint
from salm_fast.release import budget_levels

EPS = 8 / 255
LOOP = BiLevelConfig(max_rounds=1, surrogate_steps=2, batch_size=32, min_rounds=1, precision="fp32")
GENERATOR = dict(generator_steps=2, width=8, loop=LOOP)
SALM_FAST = dict(k=0.2, mask_epochs=1, generator_steps=2, width=8, loop=LOOP)


@pytest.fixture(scope="module")
def ds():
    return make_synthetic(n_train=64, n_val=8, n_test=24, seed=7)


@pytest.fixture(scope="module")
def generator_run(ds, tmp_path_factory):
    """A generator release of every split and its protector (made once for the module)."""
    root = tmp_path_factory.mktemp("gen")
    res = protect(ds, "generator", out=root / "out", eps=EPS, seed=0, figure=False, audit=False,
                  save_protector=root / "p.pt", **GENERATOR)
    return res, root / "p.pt"


def stored_budget_ok(clean: np.ndarray, release: np.ndarray, eps: float, k: int | None) -> None:
    """On the stored bytes: |delta| <= eps in 8-bit levels, at most k pixels an image (masked), [0, 255] (uint8)."""
    assert clean.dtype == release.dtype == np.uint8 and clean.shape == release.shape
    diff = release.astype(np.int16) - clean.astype(np.int16)
    assert int(np.abs(diff).max()) <= budget_levels(eps)
    assert np.abs(diff).max() > 0  # something was perturbed
    if k is not None:
        changed = (diff != 0) if diff.ndim == 3 else (diff != 0).any(-1)
        assert int(changed.reshape(len(diff), -1).sum(1).max()) <= k


# ------------------------------------------------------------------------------ the file
def test_protector_round_trip(ds, generator_run):
    res, path = generator_run
    raw = torch.load(path, weights_only=True)  # no pickled class: loads with weights_only
    assert raw["format"] == FORMAT and raw["version"] == 1 and set(KEYS) <= set(raw)
    p = load_protector(path)
    assert p.method == "generator" and p.eps == EPS and p.k is None
    assert p.shape == (1, 28, 28) and p.n_classes == 2 and p.class_names == tuple(ds.label_names)
    assert p.fit["splits"] == ["train", "val", "test"] and p.fit["images"] == 96
    assert p.fit["fingerprint"] == fingerprint(ds, ("train", "val", "test"))
    assert "seed" not in json.dumps(raw["options"]) and "seed" not in raw["state"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the owner's key
    assert not any(f.suffix == ".pt" for f in res.release_path.parent.iterdir())  # not in the published folder
    m = p.build()
    x, y = ds["test"].to_tensors()
    assert torch.equal(m.perturb(x, y), m.perturb(x, y))


def test_apply_on_the_training_images_gives_the_release_bytes(ds, generator_run, tmp_path):
    """Same generator, same images: protect's release and apply's output are the same bytes (the perturbation is
    one forward pass per batch either way, quantized by the same code)."""
    res, path = generator_run
    out = apply(path, ds, out=tmp_path / "again", figure=False)
    for s in ("train", "val", "test"):
        assert np.array_equal(out.release[s].images, res.release[s].images), s
    assert np.array_equal(np.load(out.release_path)["train_images"], res.release["train"].images)


def test_apply_to_new_images_within_budget_on_the_stored_bytes(generator_run, tmp_path):
    _, path = generator_run
    new = make_synthetic(n_train=40, n_val=4, n_test=8, seed=11)
    out = apply(path, new, out=tmp_path / "new")
    released = load_dataset(out.release_path)
    for s in new.splits:
        stored_budget_ok(new[s].images, released[s].images, EPS, None)
        assert np.array_equal(released[s].labels, new[s].labels)
    names = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert names == ["protection.png", "summary.json", "synthetic.npz"]
    text = (tmp_path / "new" / "summary.json").read_text()
    summary = json.loads(text)
    assert summary["command"] == "apply" and summary["budget"]["linf_levels"] <= budget_levels(EPS)
    assert '"seed"' not in text and str(tmp_path) not in text  # no seed, no directories
    # apply's output is a release folder like protect's: the audit reads it (eps from its summary)
    from salm_fast.audit import audit

    assert audit(tmp_path / "new", new).status != "over budget"


def test_salm_protector_keeps_l0_on_new_images(ds, tmp_path):
    res = protect(ds, "salm", out=tmp_path / "out", eps=EPS, seed=0, figure=False, audit=False,
                  save_protector=tmp_path / "salm.pt", **SALM_FAST)
    k = 157  # round(0.2 * 784)
    again = apply(tmp_path / "salm.pt", ds, out=tmp_path / "again", figure=False)
    for s in ds.splits:  # the class masks and the generator, as in the release
        assert np.array_equal(again.release[s].images, res.release[s].images), s
    new = make_synthetic(n_train=40, n_val=4, n_test=8, seed=12)
    out = apply(tmp_path / "salm.pt", new, out=tmp_path / "new", figure=False)
    for s in new.splits:
        stored_budget_ok(new[s].images, out.release[s].images, EPS, k)


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("spec", "match"), [
    ("synthetic:n_train=30,n_val=4,n_test=4,size=32", r"1 x 32 x 32 .* made for 1 x 28 x 28"),
    ("synthetic:n_train=30,n_val=4,n_test=4,channels=3", r"3 x 28 x 28 .* made for 1 x 28 x 28"),
    ("synthetic:n_train=30,n_val=4,n_test=4,classes=3", r"label 2 is not a class of the protector"),
])
def test_apply_refuses_other_images(generator_run, tmp_path, spec, match):
    _, path = generator_run
    with pytest.raises(ValueError, match=match):
        apply(path, spec, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("method", "options"), [
    ("samplewise", dict(steps=1, loop=LOOP)),
    ("classwise", dict(steps=1, loop=LOOP)),
    ("random", {}),
    ("salm", dict(noise="pgd", pgd_steps=1, mask_epochs=1, loop=LOOP)),
])
def test_methods_without_a_protector_are_refused_before_any_work(ds, tmp_path, method, options):
    with pytest.raises(ValueError, match="cannot save a protector"):
        protect(ds, method, out=tmp_path / "out", eps=EPS, seed=0, save_protector=tmp_path / "p.pt", **options)
    assert sorted(tmp_path.iterdir()) == []  # no release, no work folder, no protector


def test_protector_path_is_checked_up_front(ds, tmp_path, generator_run):
    kw = dict(eps=EPS, seed=0, figure=False, audit=False, **GENERATOR)
    with pytest.raises(ValueError, match="inside the output folder"):
        protect(ds, "generator", out=tmp_path / "out", save_protector=tmp_path / "out" / "p.pt", **kw)
    with pytest.raises(ValueError, match="inside the work folder"):
        protect(ds, "generator", out=tmp_path / "out", workdir=tmp_path / "w", save_protector=tmp_path / "w" / "p.pt",
                **kw)
    (tmp_path / "old.pt").write_bytes(b"the owner's previous key")
    with pytest.raises(FileExistsError, match="overwrite"):
        protect(ds, "generator", out=tmp_path / "out", save_protector=tmp_path / "old.pt", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]
    # apply: a protector inside the folder it would publish (and replace) is refused too
    _, path = generator_run
    (tmp_path / "out2").mkdir()
    inside = tmp_path / "out2" / "p.pt"
    inside.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="inside the output folder"):
        apply(inside, ds, out=tmp_path / "out2")


def test_a_failed_run_leaves_no_protector(ds, tmp_path, monkeypatch):
    import salm_fast.api as api

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(api, "save_medmnist", broken)
    with pytest.raises(OSError, match="disk full"):
        protect(ds, "generator", out=tmp_path / "out", eps=EPS, seed=0, figure=False, audit=False,
                save_protector=tmp_path / "p.pt", **GENERATOR)
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.pt")]  # no temporary file left


def _bad_files(tmp_path, good: dict):
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({**good, "version": 2}, tmp_path / "v2.pt")
    torch.save({k: v for k, v in good.items() if k != "state"}, tmp_path / "partial.pt")
    torch.save({**good, "norm": {"mean": 0.0, "std": 1.0}}, tmp_path / "norm.pt")
    torch.save(BiLevelConfig(), tmp_path / "pickled.pt")  # a pickled class: never unpickled
    return [("noise.pt", "not a salm-fast protector"), ("other.pt", "not a salm-fast protector"),
            ("v2.pt", "format version 2"), ("partial.pt", "missing 'state'"), ("norm.pt", "input scaling"),
            ("pickled.pt", "not a salm-fast protector"), ("absent.pt", "no such protector file")]


def test_bad_protector_files_are_refused_in_one_line(generator_run, tmp_path, capsys):
    _, path = generator_run
    cases = _bad_files(tmp_path, torch.load(path, weights_only=True))
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            load_protector(tmp_path / name)
        assert main(["apply", "--protector", str(tmp_path / name), "--data", "synthetic:n=20",
                     "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_cli_protect_then_apply(tmp_path, capsys):
    data = "synthetic:n_train=40,n_val=4,n_test=8,seed=3"
    assert main(["protect", "--data", data, "--method", "salm", "--noise", "pgd", "--out", str(tmp_path / "o"),
                 "--save-protector", str(tmp_path / "p.pt"), "--quiet"]) == 2
    assert "cannot save a protector" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # a tiny generator through the API, then the CLI applies it
    protect(data, "generator", out=tmp_path / "o", eps=EPS, seed=0, figure=False, audit=False,
            save_protector=tmp_path / "p.pt", **GENERATOR)
    new = "synthetic:n_train=30,n_val=4,n_test=8,seed=9"
    assert main(["apply", "--protector", str(tmp_path / "p.pt"), "--data", new, "--out", str(tmp_path / "n"),
                 "--no-figure", "--quiet"]) == 0
    assert "L-inf (stored bytes)" in capsys.readouterr().out
    assert main(["apply", "--protector", str(tmp_path / "p.pt"), "--data", new, "--out", str(tmp_path / "n"),
                 "--quiet"]) == 2  # a previous output: only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["apply", "--protector", str(tmp_path / "p.pt"), "--data", "synthetic:n=40,size=32",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "made for 1 x 28 x 28" in capsys.readouterr().err
