"""The release bytes of small fixed-seed runs, pinned: refactors must not change what is released.

Randomness-only methods are pinned everywhere. Trained methods depend on the CPU's kernels
(oneDNN picks different fp32 convolution code per instruction set), so their hashes are pinned
per machine key: ``torch.backends.cpu.get_cpu_capability()`` and whether the CPU has AMX tiles
(an Intel Sapphire Rapids and an AMD Zen 4 both report AVX512 and round differently); on a CPU
without a recorded entry those cases are skipped with the key named (record it by running this
file on that machine).

SALM's hashes changed once on purpose (issue 9): class-aggregated block masks and a keyed code
that training moves; they were re-recorded then.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from salm_fast import protect
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import make_synthetic


def _loop() -> BiLevelConfig:
    return BiLevelConfig(max_rounds=2, surrogate_steps=2, batch_size=16, min_rounds=1, precision="fp32")


CASES = {
    "random": lambda: dict(method="random"),
    "samplewise": lambda: dict(method="samplewise", loop=_loop(), steps=2),
    "classwise": lambda: dict(method="classwise", loop=_loop(), steps=2),
    "salm": lambda: dict(method="salm", k=0.2, loop=_loop(), mask_epochs=1, generator_steps=2, width=8),
    "salm_pgd": lambda: dict(method="salm", k=0.2, loop=_loop(), mask_epochs=1, noise="pgd", pgd_steps=2),
}
MACHINE_INDEPENDENT = {"random": "a5d92b30a03d65b3"}
#: First 16 hex digits of sha256(train images of the release), per CPU capability.
PINNED = {
    "AVX512/amx": {"samplewise": "700025c0392ce414", "classwise": "7e3bdbd93f1a131e"},
    "AVX512/no-amx": {"samplewise": "670ef7d2e6a6fb10", "classwise": "db35629447b7fcd0", "salm": "34182d3ada904146",
                      "salm_pgd": "3c9b618081654865"},
    "AVX2/no-amx": {"samplewise": "fddd0df731481d1c", "classwise": "7e3bdbd93f1a131e", "salm": "34182d3ada904146",
                    "salm_pgd": "3c9b618081654865"},
}


def machine_key() -> str:
    from salm_fast.runtime import cpu_features

    f = cpu_features()
    return f"{f['capability']}/{'amx' if f['amx'] else 'no-amx'}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_release_bytes_are_pinned(name, tmp_path):
    if name in MACHINE_INDEPENDENT:
        expected = MACHINE_INDEPENDENT[name]
    else:
        key = machine_key()
        if name not in PINNED.get(key, {}):
            pytest.skip(f"no pinned {name} hash for this machine ({key})")
        expected = PINNED[key][name]
    ds = make_synthetic(n_train=48, n_val=8, n_test=8, seed=3)
    r = protect(ds, out=tmp_path / "out", seed=5, splits="train", backend="cpp", figure=False, audit=False, **CASES[name]())
    digest = hashlib.sha256(np.ascontiguousarray(r.release["train"].images).tobytes()).hexdigest()[:16]
    assert digest == expected, f"{name}: release bytes changed ({digest} != {expected})"
