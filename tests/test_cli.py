"""The command line: a tiny protect run, one-line errors with exit status 2, the value parsers."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from salm_fast.cli import main, parse_classes, parse_eps, parse_k
from salm_fast.data import load_medmnist, make_synthetic, save_medmnist
from salm_fast.release import budget_levels

TINY = "synthetic:n=120,seed=1"




def assert_one_line_error(capsys, rc: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salm-fast: error: "), captured.err
    for needle in needles:
        assert needle in lines[0]
    assert captured.out == ""
    return lines[0]


# ------------------------------------------------------------------------------ value parsers
@pytest.mark.parametrize(("text", "value"), [("8/255", 8 / 255), (" 4/255 ", 4 / 255), ("0.03", 0.03),
                                             ("255/255", 1.0), ("1/1", 1.0)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["abc", "8/0", "", "8/255/2"])
def test_parse_eps_refuses_non_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="8/255"):
        parse_eps(text)


@pytest.mark.parametrize("text", ["1", "2", "1.5", "8"])
def test_parse_eps_refuses_a_bare_number_of_one_or_more(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"ambiguous: write {text}/255 .* below 1"):
        parse_eps(text)


@pytest.mark.parametrize(("text", "value"), [("80", 80), ("10%", 0.1), ("0.1", 0.1), ("100%", 1.0), ("1", 1)])
def test_parse_k(text, value):
    k = parse_k(text)
    assert k == pytest.approx(value) and type(k) is type(value)  # '1' is one pixel, '1.0' would be all of them


@pytest.mark.parametrize("text", ["ten", "10 %%", "%"])
def test_parse_k_refuses_non_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="k must be"):
        parse_k(text)


def test_parse_classes():
    assert parse_classes("0,2") == [0, 2] and parse_classes("1") == [1]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_classes("a,b")


# ------------------------------------------------------------------------------ commands
def test_protect_runs_prints_the_table_and_writes_the_release(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["protect", "--data", TINY, "--method", "salm", "--noise", "pgd", "--rounds", "1", "--eps", "8/255",
               "--k", "10%", "--out", str(out), "--quiet", "--no-figure", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "L-inf (stored bytes)" in captured.out and "summary:" in captured.out
    assert "K (L0 budget)" in captured.out and "10% of the pixels (78 of 784)" in captured.out
    assert captured.err == ""  # --quiet: no progress bar
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "salm" and summary["options"]["noise"] == "pgd"
    assert summary["protection"]["rounds"] == 1 and "seed" not in summary["options"]
    assert summary["budget"]["linf_levels"] <= budget_levels(8 / 255)
    assert summary["budget"]["l0_max_per_image"] <= round(0.1 * 28 * 28)
    assert load_medmnist(out / "synthetic.npz")["train"].images.shape == (84, 28, 28)
    assert not (out / "protection.png").exists()


def test_demo_prints_and_uses_salm_default_k(tmp_path, capsys, monkeypatch):
    import salm_fast.api
    from salm_fast import ops
    from salm_fast.methods import SALM

    seen = {}

    def stop(data, method, **kw):  # the demo's settings, without its minutes of work
        seen.update(kw, method=method)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(salm_fast.api, "protect", stop)
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 2 and seen["method"] == "salm" and seen["k"] == SALM.default_k and seen["eps"] == SALM.default_eps
    k = SALM.default_k
    expected = f"SALM: K = {100 * k:g}% of the pixels ({ops.resolve_k(k, 784)} of 784), eps = 8/255"
    assert expected in out.splitlines()


def test_k_help_and_words_follow_the_default():
    from salm_fast.api import describe_eps, describe_k
    from salm_fast.cli import build_parser
    from salm_fast.methods import SALM

    protect = next(a for a in build_parser()._subparsers._group_actions[0].choices["protect"]._actions
                   if "--k" in a.option_strings)
    assert f"SALM default {SALM.default_k:g}" in protect.help
    assert describe_k(0.2, 784) == "20% of the pixels (157 of 784)" and describe_k(80, 784) == "80 of 784 pixels"
    assert describe_k(0.125, 64) == "12.5% of the pixels (8 of 64)"
    assert describe_eps(8 / 255) == "8/255" and describe_eps(0.03) == "0.03"


def test_protect_failure_publishes_nothing_and_resume_continues(tmp_path, capsys, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["protect", "--data", TINY, "--method", "samplewise", "--rounds", "2", "--eps", "8/255", "--out", str(out),
            "--workdir", str(work), "--precision", "fp32", "--quiet"]
    with monkeypatch.context() as m:
        def blocked(*a, **kw):
            raise PermissionError(13, "Permission denied", "protection.png")

        m.setattr("salm_fast.figures.protection_figure", blocked)
        assert_one_line_error(capsys, main(args), "Permission denied")
    assert not out.exists() and (work / "checkpoint.pt").is_file()
    rc = main([*args, "--resume", "--keep-checkpoint"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "protection.png", "rounds.jsonl", "summary.json",
                                                     "synthetic.npz"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protection"]["rounds"] == 2 and summary["precision"]["used"] == "fp32"
    assert (work / "checkpoint.pt").is_file()  # kept on request, outside OUT
    rc = main([*args, "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    assert list(work.iterdir()) == []  # a chosen work folder stays, without the checkpoint


def test_protect_defaults_to_every_split_and_a_secret_seed(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["protect", "--data", TINY, "--method", "random", "--out", str(out), "--quiet", "--no-figure"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == ["train", "val", "test"] and summary["seed_source"] == "os"
    rc = main(["protect", "--data", TINY, "--method", "random", "--out", str(out), "--quiet", "--no-figure",
               "--overwrite", "--seed", "4", "--splits", "train"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == ["train"] and summary["seed_source"] == "user"


def test_experiment_shards_per_dataset_epochs_and_report(tmp_path, capsys):
    root = tmp_path / "grid"
    base = ["experiment", "--root", str(root), "--datasets", TINY, "--methods", "clean", "--victims", "cnn",
            "--seeds", "0", "1", "--epochs", "synthetic=1", "--precision", "fp32", "--augment", "none", "--quiet"]
    assert main([*base, "--shard", "1/2"]) == 0, capsys.readouterr().err
    rows = json.loads((root / "results.json").read_text())
    assert [(r["seed"], r["epochs"]) for r in rows] == [(1, 1)]
    assert main([*base, "--shard", "0/2", "--report"]) == 0, capsys.readouterr().err
    assert sorted(r["seed"] for r in json.loads((root / "results.json").read_text())) == [0, 1]
    assert "protection AUC" in (root / "report" / "report.md").read_text()
    capsys.readouterr()
    assert_one_line_error(capsys, main([*base, "--shard", "2/2"]), "shard", "2/2")
    grid = base[:base.index("--epochs")]
    assert_one_line_error(capsys, main([*grid, "--epochs", "synthetic=0"]), "--epochs")
    assert_one_line_error(capsys, main([*grid, "--epochs", "other=1"]), "no dataset named other")


def test_evaluate_prints_both_rows(tmp_path, capsys):
    ds = make_synthetic(n_train=48, n_val=8, n_test=24, seed=2)
    clean = save_medmnist(ds, tmp_path / "synthetic.npz")
    rng = np.random.default_rng(0)
    noisy = ds.replace_split("train", np.clip(ds["train"].images.astype(np.int16)
                                              + rng.integers(-2, 3, ds["train"].images.shape), 0, 255).astype(np.uint8))
    (tmp_path / "rel").mkdir()
    release = save_medmnist(noisy, tmp_path / "rel" / "synthetic.npz")
    rc = main(["evaluate", "--clean", str(clean), "--release", str(release), "--victim", "cnn", "--epochs", "1",
               "--precision", "fp32", "--augment", "none", "--out", str(tmp_path / "eval"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [line.split()[0] for line in captured.out.splitlines() if line.strip()]
    assert "clean" in rows and "release" in rows
    assert (tmp_path / "eval" / "evaluation.json").exists()


def test_backends_lists_every_backend(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpp", "triton"):
        assert name in out


# ------------------------------------------------------------------------------ bad input: one line, exit 2
@pytest.mark.parametrize(("args", "needles"), [
    (["--eps", "-1"], ["eps"]),
    (["--eps", "0"], ["eps"]),
    (["--eps", "300"], ["eps"]),
    (["--eps", "abc"], ["--eps", "8/255"]),
    (["--eps", "1"], ["--eps", "ambiguous", "1/255"]),
    (["--eps", "2"], ["--eps", "ambiguous", "2/255"]),
    (["--eps", "1.5"], ["--eps", "ambiguous", "1.5/255"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--method", "random", "--precision", "bf16"], ["no bi-level loop"]),
    (["--seed", "1.5"], ["--seed"]),
    (["--k", "2.0"], ["k"]),
    (["--k", "0"], ["k"]),
    (["--k", "785"], ["k", "784"]),
    (["--k", "ten"], ["--k"]),
    (["--method", "samplewise", "--k", "10"], ["k"]),
    (["--method", "random", "--noise", "pgd"], ["--noise"]),
    (["--method", "random", "--rounds", "2"], ["rounds"]),
    (["--rounds", "0"], ["rounds"]),
    (["--classes", "7"], ["classes"]),
    (["--splits", "train,bogus"], ["bogus"]),
    (["--method", "nope"], ["--method"]),
    (["--backend", "cuda-magic"], ["--backend"]),
])
def test_protect_bad_input_is_one_line_and_writes_nothing(args, needles, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["protect", "--data", TINY, "--out", str(out), "--quiet", *args])
    assert_one_line_error(capsys, rc, *needles)
    assert not out.exists()


def test_protect_missing_data_and_unwritable_output(tmp_path, capsys):
    rc = main(["protect", "--data", str(tmp_path / "nonexistent.npz"), "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(capsys, rc, "nonexistent.npz")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc = main(["protect", "--data", TINY, "--out", str(blocker / "sub"), "--quiet"])
    assert_one_line_error(capsys, rc, "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize(("args", "needles"), [
    (["--victim", "alexnet"], ["--victim", "alexnet"]),
    (["--defense", "voodoo"], ["voodoo"]),
    (["--epochs", "many"], ["--epochs"]),
])
def test_evaluate_bad_input_is_one_line(args, needles, tmp_path, capsys):
    rc = main(["evaluate", "--clean", TINY, "--release", TINY, "--out", str(tmp_path / "e"), "--quiet", *args])
    assert_one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "e").exists()


def test_usage_errors_are_one_line(capsys):
    assert_one_line_error(capsys, main([]), "command")
    assert_one_line_error(capsys, main(["frobnicate"]), "frobnicate")
    assert_one_line_error(capsys, main(["bench", "kernels"]), "bench")  # python -m bench, from a checkout
    assert_one_line_error(capsys, main(["protect", "--data", TINY]), "--out")
    with pytest.raises(SystemExit) as exc:  # --help still prints help and exits 0
        main(["protect", "--help"])
    assert exc.value.code == 0
    assert "--eps" in capsys.readouterr().out
