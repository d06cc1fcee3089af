"""Test configuration: CPU only; Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e.
before ``salm_fast.kernels`` is first imported, hence at the top of conftest.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("SALM_FAST_BACKEND", None)  # tests choose backends explicitly

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tests' tensors are tiny (threads only add overhead), results do not
# depend on the machine's core count, and on a shared 2-core machine two contending OpenMP
# threads made small training steps up to ~40x slower.
torch.set_num_threads(1)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, exact: bool = False,
                        rtol: float = 0.0, atol: float = 0.0, what: str = "") -> None:
    """Compare two tensors; on mismatch say how many elements differ and show the first few."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if exact:
        bad = a != e
        if a.is_floating_point():
            bad &= ~(torch.isnan(a) & torch.isnan(e))
    else:
        bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:5].tolist()
        pairs = ", ".join(f"{tuple(i)}: {a[tuple(i)].item()!r} vs {e[tuple(i)].item()!r}" for i in idx)
        pytest.fail(f"{what}: {n_bad} of {a.numel()} elements differ; first: {pairs}")


@pytest.fixture
def real_data_dir() -> Path:
    if not (REAL_DATA / "breastmnist.npz").exists():
        pytest.skip(f"real MedMNIST data not found at {REAL_DATA}")
    return REAL_DATA
