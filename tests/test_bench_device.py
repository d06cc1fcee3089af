"""Smoke tests of ``python -m bench gpu`` (no CUDA here: its one line; ``--device cpu --quick``: the same
code on the CPU) and ``python -m bench memory`` (one tiny row, measured in a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu, memory

REPO = Path(__file__).resolve().parents[1]
OPS = ["grad_magnitude p=1", "topk_mask", "saliency_topk_mask p=1", "masked_linf_project",
       "masked_linf_project fwd+bwd", "pgd_step", "pgd_step (alloc)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA line is for machines without CUDA")
def test_bench_gpu_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench", "gpu", "--out", str(tmp_path / "r.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.splitlines() == [gpu.no_cuda_line()] and res.stderr == ""
    assert "no CUDA device here" in res.stdout and not (tmp_path / "r.json").exists()


def test_bench_gpu_code_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "results_gpu.json"
    assert gpu.main(["--device", "cpu", "--quick", "--sizes", "8", "--data", str(tmp_path / "absent.npz"),
                     "--synthetic-n", "40", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["op"] for r in data["ops"]] == OPS
    for row in data["ops"]:
        assert row["errors"] == {} and set(row["timings"]) == {"eager", "copy", "torch", "cpp"}
        assert all(t["median_ms"] > 0 and t["blocks"] == 2 for t in row["timings"].values())
        assert set(row["frac_copy"]) == {"eager", "torch", "cpp"} and set(row["speedup_vs_eager"]) == {"torch", "cpp"}
    n = data["ops"][0]["shape"][0]
    full, plane = n * 3 * 8 * 8 * 4, n * 8 * 8 * 4
    assert data["ops"][4]["bytes"] == 7 * full + 2 * plane  # the projection forward + backward
    skipped, synthetic = data["end_to_end"]
    assert "no file at" in skipped["skipped"]
    assert synthetic["images"] == 40 and synthetic["linf_levels"] <= 8 and synthetic["device"] == "cpu"
    assert data["versions"]["torch"] == torch.__version__ and data["device"]["type"] == "cpu"
    printed = capsys.readouterr().out
    assert "protect PneumoniaMNIST: skipped" in printed and "| pgd_step |" in printed


def test_a_failing_op_reports_its_error_in_its_row_and_the_rest_continue(monkeypatch):
    import bench.kernels as kernels

    real = kernels._cases

    def cases(*args):
        out = real(*args)
        out[1].eager = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # topk_mask's eager variant fails
        return out

    monkeypatch.setattr(kernels, "_cases", cases)
    rows = gpu.op_rows(torch.device("cpu"), [8], 1, 0.01, gpu.Timer(torch.device("cpu"), 1, 0), lambda line: None)
    assert [r["op"] for r in rows] == OPS
    assert rows[1]["errors"] == {"eager": "RuntimeError: boom"} and "cpp" in rows[1]["timings"]
    assert all(not r["errors"] for r in rows if r["op"] != "topk_mask")


def test_bench_memory_measures_one_row_in_a_fresh_process(tmp_path):
    row = memory.measure(30, 16, 1, rounds=1, batch_size=8, threads=1, pythonpath=None, workdir=tmp_path,
                         log=lambda line: None)
    assert "error" not in row, row
    assert row["data_bytes"] == 30 * 16 * 16 and row["release_bytes"] == 21 * 16 * 16 and row["train_images"] == 21
    assert row["peak_bytes"] >= row["baseline_bytes"] > 0 and row["seconds"] > 0
    assert row["beyond_data_bytes"] == row["peak_bytes"] - row["baseline_bytes"] - 30 * 256
    assert 0 < row["peak_anon_bytes"] <= row["peak_bytes"]
    assert not list(tmp_path.glob("*.npz"))  # the data file went with the row


def test_bench_memory_children_import_the_code_asked_for(tmp_path):
    """--pythonpath measures another checkout even when the bench runs from this one (python -c puts its working
    directory first on the path: the children run in a scratch folder)."""
    other = tmp_path / "other" / "salm_fast"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    row = memory.measure(20, 16, 1, rounds=1, batch_size=8, threads=1, pythonpath=str(other.parent),
                         workdir=tmp_path, log=lambda line: None)
    assert "the other checkout" in row["error"]


def test_bench_memory_measures_other_methods_and_the_noise_storage(tmp_path):
    row = memory.measure(30, 16, 1, rounds=1, batch_size=8, threads=1, pythonpath=None, workdir=tmp_path,
                         log=lambda line: None, method="samplewise", noise_storage="int8")
    assert "error" not in row, row
    assert row["method"] == "samplewise" and row["noise_storage"] == "int8" and row["train_images"] == 21


def test_bench_memory_growth_per_image_and_the_table():
    def row(n, beyond, method="salm", **kw):
        return {"label": "this", "method": method, "noise_storage": None, "size": 224, "channels": 3, "n": n,
                "train_images": round(0.7 * n), "data_bytes": 0, "release_bytes": 0, "baseline_bytes": 0,
                "peak_bytes": beyond, "beyond_data_bytes": beyond, "seconds": 1.0, "load_average": 1.0, **kw}

    rows = [row(2000, 100 << 20), row(8000, (100 << 20) + 4200 * 50176), row(2000, 90 << 20, "classwise"),
            row(8000, 90 << 20, "classwise"), row(10, 0, "samplewise", error="boom")]
    slopes = memory.growth(rows)
    assert slopes[("this", "salm", None, 224, 3, None)] == 50176 and slopes[("this", "classwise", None, 224, 3, None)] == 0
    table = memory.markdown({"rows": rows, "command": "c", "date": "d", "git_commit": "x", "machine": "m",
                             "config": {"batch_size": 32, "threads": 1, "size": 224, "channels": 3}})
    assert "| 49.0 (grows) |" in table and "| 0.0 (flat) |" in table and "failed: boom" in table
    assert all(line.count("|") == 16 for line in table.splitlines() if line.startswith("| this"))
