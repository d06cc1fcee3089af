"""The bi-level loop: determinism, checkpoint + resume to the same bytes, the round log, the stop rule."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from salm_fast import protect
from salm_fast.bilevel import BiLevelConfig, BiLevelTrainer, RoundLog
from salm_fast.data import load_medmnist, make_synthetic
from salm_fast.generator import NoiseGenerator
from salm_fast.methods import SALM, SampleWiseEM, make_method
from salm_fast import noise as noise_module
from salm_fast.noise import GeneratorNoise, SampleWiseNoise
from salm_fast.surrogate import build_surrogate

EPS = 8 / 255
LOG_FIELDS = {f.name for f in fields(RoundLog)}


class Killed(Exception):
    """Stands in for a kill -9 in the middle of a run."""


def loop(rounds: int = 3, **kw) -> BiLevelConfig:
    return BiLevelConfig(**{"max_rounds": rounds, "surrogate_steps": 2, "batch_size": 32, "min_rounds": 1,
                            "stop_accuracy": 2.0, **kw})  # 2.0: never stop early unless a test says so


# Each case exercises a different piece of checkpointed state: a PGD buffer; a generator with its Adam
# state, crop + flip inside the loop, a surrogate reset and a refreshed mask.
CASES = {
    "samplewise": lambda seed=5: make_method("samplewise", eps=EPS, seed=seed, steps=2, loop=loop()),
    "salm": lambda seed=5: make_method("salm", eps=EPS, seed=seed, k=0.1, mask_epochs=1, generator_steps=2, width=8,
                                          mask_refresh=2, loop=loop(surrogate_reset_every=2, augment=True)),
}




@pytest.fixture(scope="module")
def data():
    ds = make_synthetic(n_train=64, n_val=8, n_test=16, seed=2)
    x, y = ds["train"].to_tensors()
    return ds, x, y


def kill_at(monkeypatch, cls, at_round: int) -> None:
    """Make every fit of ``cls`` die right after round ``at_round`` (before its checkpoint is written)."""
    original = cls.round_hooks

    def hooks(self):
        def kill(trainer):
            if trainer.round == at_round:
                raise Killed(f"killed after round {at_round}")
        return [*original(self), kill]

    monkeypatch.setattr(cls, "round_hooks", hooks)


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_gives_bit_identical_noise(case, data):
    _, x, y = data
    a = CASES[case]().fit(x, y, 2)
    b = CASES[case]().fit(x, y, 2)
    assert torch.equal(a.delta, b.delta) and torch.equal(a.mask, b.mask)
    assert [h["surrogate_loss"] for h in a.info["history"]] == [h["surrogate_loss"] for h in b.info["history"]]
    other = CASES[case](seed=6).fit(x, y, 2)
    assert not torch.equal(a.delta, other.delta)  # the seed matters


# ------------------------------------------------------------------------------ checkpoint and resume
@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(case, data, tmp_path, monkeypatch):
    _, x, y = data
    full = CASES[case]().fit(x, y, 2, workdir=tmp_path / "full")

    cls = type(CASES[case]())
    with monkeypatch.context() as m:
        kill_at(m, cls, 2)  # rounds 0 and 1 ran; the checkpoint holds round 0 only
        with pytest.raises(Killed):
            CASES[case]().fit(x, y, 2, workdir=tmp_path / "killed")
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 1 and not ckpt["finished"]
    assert len(read_log(tmp_path / "killed" / "rounds.jsonl")) == 1

    resumed = CASES[case]().fit(x, y, 2, workdir=tmp_path / "killed", resume=True)
    assert torch.equal(resumed.delta, full.delta)
    assert torch.equal(resumed.mask, full.mask)
    assert resumed.info["rounds"] == full.info["rounds"] == 3

    log = read_log(tmp_path / "killed" / "rounds.jsonl")
    assert [r["round"] for r in log] == [0, 1, 2]
    assert all(set(r) == LOG_FIELDS for r in log)
    assert without_times(log) == without_times(read_log(tmp_path / "full" / "rounds.jsonl"))
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["history"] == log  # the log matches the checkpoint it belongs to


def test_log_is_rewritten_from_the_checkpoint_on_resume(data, tmp_path):
    _, x, y = data
    work = tmp_path / "w"
    make_method("samplewise", eps=EPS, seed=5, steps=1, loop=loop(2)).fit(x, y, 2, workdir=work)
    with open(work / "rounds.jsonl", "a") as fh:  # a line the checkpoint never saw (killed in between)
        fh.write('{"round": 99}\n')
    make_method("samplewise", eps=EPS, seed=5, steps=1, loop=loop(2)).fit(x, y, 2, workdir=work, resume=True)
    assert [r["round"] for r in read_log(work / "rounds.jsonl")] == [0, 1]
    # A fresh (non-resumed) run starts a fresh log
    make_method("samplewise", eps=EPS, seed=5, steps=1, loop=loop(1)).fit(x, y, 2, workdir=work)
    assert [r["round"] for r in read_log(work / "rounds.jsonl")] == [0]


@pytest.mark.parametrize(("change", "match"), [
    (dict(loop=loop(surrogate_steps=3)), "surrogate_steps"),
    (dict(eps=4 / 255), "eps"),
    (dict(steps=3), "steps"),
    (dict(seed=6), "seed"),
])
def test_resume_with_other_settings_is_a_clear_error(change, match, data, tmp_path):
    _, x, y = data
    base = dict(eps=EPS, seed=5, steps=1, loop=loop(2))
    make_method("samplewise", **base).fit(x, y, 2, workdir=tmp_path)
    with pytest.raises(ValueError, match=f"different settings.*{match}"):
        make_method("samplewise", **{**base, **change}).fit(x, y, 2, workdir=tmp_path, resume=True)


def test_resume_refuses_another_method_or_other_data(data, tmp_path):
    _, x, y = data
    make_method("samplewise", eps=EPS, seed=5, steps=1, loop=loop(1)).fit(x, y, 2, workdir=tmp_path)
    with pytest.raises(ValueError, match="different settings.*method"):
        make_method("classwise", eps=EPS, seed=5, steps=1, loop=loop(1)).fit(x, y, 2, workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different settings.*data"):
        make_method("samplewise", eps=EPS, seed=5, steps=1, loop=loop(1)).fit(x.flip(0), y.flip(0), 2,
                                                                              workdir=tmp_path, resume=True)


def test_protect_resume_reaches_the_same_release_bytes(data, tmp_path, monkeypatch):
    ds, _, _ = data
    opts = dict(eps=EPS, k=0.1, seed=3, mask_epochs=1, noise="pgd", pgd_steps=2, loop=loop(3), figure=False)
    full = protect(ds, "salm", out=tmp_path / "full", **opts)

    with monkeypatch.context() as m:
        kill_at(m, SALM, 2)
        with pytest.raises(Killed):
            protect(ds, "salm", out=tmp_path / "killed", **{**opts, "loop": loop(3)})
    assert not (tmp_path / "killed" / full.release_path.name).exists()  # no release from a killed run
    assert (tmp_path / ".killed.salm-work" / "checkpoint.pt").exists()

    resumed = protect(ds, "salm", out=tmp_path / "killed", resume=True, keep_checkpoint=True,
                      **{**opts, "loop": loop(3)})
    a, b = load_medmnist(full.release_path), load_medmnist(resumed.release_path)
    for split in ds.splits:
        assert a[split].images.tobytes() == b[split].images.tobytes()
        assert a[split].labels.tobytes() == b[split].labels.tobytes()
    assert (tmp_path / ".killed.salm-work" / "checkpoint.pt").exists()  # kept on request
    assert not (tmp_path / ".full.salm-work" / "checkpoint.pt").exists()  # deleted by default

    # Resuming a finished run does no more rounds and gives the same bytes again
    again = protect(ds, "salm", out=tmp_path / "killed", resume=True, keep_checkpoint=True,
                    **{**opts, "loop": loop(3)})
    assert again.summary["protection"]["rounds"] == 3
    assert again.release["train"].images.tobytes() == a["train"].images.tobytes()


def test_round_log_counts_the_images_really_processed(data):
    """A generator step on a set smaller than the batch processes the set, not batch_size images."""
    _, x, y = data
    x, y = x[:20], y[:20]
    noise = GeneratorNoise(NoiseGenerator(1, 2, EPS, width=8), EPS, steps=3)
    trainer = BiLevelTrainer(lambda: build_surrogate("cnn-half", 1, 2, 28), noise, x, y,
                             torch.ones(20, 1, 28, 28), loop(1))
    _, n_images, _ = noise.optimize(trainer.view)
    assert n_images == 3 * 20


# ------------------------------------------------------------------------------ the seams: noise <-> trainer
def test_trainer_applies_the_mask_a_round_hook_returns(data):
    _, x, y = data
    new = torch.zeros(len(x), 1, 28, 28)
    new[:, :, :, :14] = 1  # the left half
    calls = []

    def hook(trainer):
        calls.append(trainer.round)
        return new if trainer.round == 1 else None  # after round 0 only; None keeps the mask

    noise = SampleWiseNoise(tuple(x.shape), EPS, steps=1, step_size=EPS)
    trainer = BiLevelTrainer(lambda: build_surrogate("cnn-half", 1, 2, 28), noise, x, y,
                             torch.ones(len(x), 1, 28, 28), loop(2), round_hooks=[hook])
    trainer.run()
    assert calls == [1, 2]
    # Applied by the trainer (kept as uint8 on the loop's device), seen by the noise.
    assert trainer.mask.dtype == torch.uint8 and torch.equal(trainer.mask, new) and trainer.view.mask is trainer.mask
    assert bool((noise.buffer[:, :, :, 14:] == 0).all())  # the stored noise moved inside the new mask
    assert bool((noise.buffer[:, :, :, :14] != 0).any())

    bad = BiLevelTrainer(lambda: build_surrogate("cnn-half", 1, 2, 28), noise, x, y, torch.ones(len(x), 1, 28, 28),
                         loop(1), round_hooks=[lambda trainer: new[:3]])
    with pytest.raises(RuntimeError, match="round hook returned a mask of shape"):
        bad.run()


def test_noise_does_not_know_the_trainer():
    """noise.py imports nothing of bilevel.py, not even for type checking; at run time neither does what it imports."""
    source = Path(noise_module.__file__).read_text()
    imported = [node.module or "" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if "bilevel" in m or "methods" in m]
    # The package's __init__ imports the API (and with it the trainer): load noise.py without it.
    probe = ("import sys, types; pkg = types.ModuleType('salm_fast'); pkg.__path__ = [sys.argv[1]]; "
             "sys.modules['salm_fast'] = pkg; import salm_fast.noise; "
             "print(sorted(m for m in sys.modules if m.startswith('salm_fast')))")
    out = subprocess.run([sys.executable, "-c", probe, str(Path(noise_module.__file__).parent)], check=True,
                         capture_output=True, text=True).stdout
    assert "salm_fast.noise" in out and "salm_fast.bilevel" not in out and "salm_fast.methods" not in out


# ------------------------------------------------------------------------------ the stop rule
def _rounds(data, **kw) -> tuple[int, str, list[float]]:
    _, x, y = data
    p = SampleWiseEM(EPS, seed=1, steps=1, loop=loop(**kw)).fit(x, y, 2)
    return p.info["rounds"], p.info["stopped_because"], [h["surrogate_accuracy"] for h in p.info["history"]]


def test_stop_rule_threshold_min_and_max_rounds(data):
    n, why, _ = _rounds(data, rounds=4, stop_accuracy=0.0, min_rounds=2)
    assert n == 2 and "surrogate accuracy" in why  # reached at once, but not before min_rounds
    n, why, _ = _rounds(data, rounds=3, stop_accuracy=0.0, min_rounds=0)
    assert n == 1  # a round is needed to measure anything
    n, why, _ = _rounds(data, rounds=3, stop_accuracy=1.5)
    assert n == 3 and "round cap 3" in why  # never reached: the cap


def test_stop_rule_stops_at_the_first_round_that_reaches_the_threshold(data):
    n, why, acc = _rounds(data, rounds=6, stop_accuracy=0.6, min_rounds=1)
    assert len(acc) == n
    assert all(a < 0.6 for a in acc[:-1])  # it did not run past a round that reached it
    assert acc[-1] >= 0.6 or (n == 6 and "round cap" in why)


def test_config_is_validated():
    for bad in (dict(max_rounds=0), dict(batch_size=0), dict(surrogate_steps=0), dict(min_rounds=4, max_rounds=3),
                dict(max_rounds=2.5), dict(surrogate_lr=0.0), dict(stop_accuracy=-0.1)):
        with pytest.raises(ValueError, match="loop"):
            BiLevelConfig(**bad).validate()
    BiLevelConfig().validate()
