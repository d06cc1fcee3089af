"""Smoke test of the kernel benchmark (bench/kernels.py) on a tiny configuration: it runs,
writes JSON with every expected row and field, and rewrites only its own RESULTS.md section."""
from __future__ import annotations

import json

import pytest

from bench import __main__ as cli
from bench import kernels

TINY = kernels.Config(n=2, channels=(1,), sizes=(8,), repeats=1, warmup=1, copy_mib=1, cuda=False)
OPS = ["grad_magnitude p=1", "topk_mask", "saliency_topk_mask p=1", "masked_linf_project", "pgd_step",
       "pgd_step (alloc)"]


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    return kernels.run(TINY)


def test_kernel_bench_json_has_every_row_and_field(tiny_result, tmp_path):
    path = tmp_path / "results_kernels.json"
    kernels.write_json(tiny_result, path)
    data = json.loads(path.read_text())
    assert [r["op"] for r in data["rows"]] == OPS
    for row in data["rows"]:
        assert row["device"] == "cpu" and row["native"] == "cpp"
        assert row["shape"] == [2, 1, 8, 8] and row["k"] == 6 and row["bytes"] > 0
        assert set(row["timings"]) == {"eager", "torch", "cpp"}
        for t in row["timings"].values():
            assert t["n"] == 1 and t["median_ms"] > 0
        assert set(row["gbps"]) == set(row["frac_copy"]) == {"eager", "torch", "cpp"}
        assert set(row["speedup_vs_eager"]) == {"torch", "cpp"}
    # pgd_step reads x, delta, g and the mask and writes out: 4 tensors of 2*1*8*8 float32 + the mask.
    assert data["rows"][4]["bytes"] == 4 * 512 + 512
    assert data["copy_bandwidth"]["cpu"]["gbps"] > 0
    machine = data["machine"]
    assert machine["cpu"] and machine["torch"] and machine["cpp_threads"] >= 1
    assert data["git_commit"] and data["date"] and data["config"]["n"] == 2


def test_markdown_section_replaces_only_itself(tiny_result, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## End-to-end\nkeep me\n")
    section = kernels.markdown(tiny_result)
    assert section.startswith("## Kernels (CPU)") and section.count("| pgd_step") == 2
    kernels.write_markdown_section(md, section)
    once = md.read_text()
    kernels.write_markdown_section(md, section.replace("## Kernels (CPU)", "## Kernels (CPU)\n\nrerun"))
    twice = md.read_text()
    assert "keep me" in once and "keep me" in twice
    assert twice.count("## Kernels (CPU)") == 1 and "rerun" in twice and twice.count(kernels.MD_BEGIN) == 1


def test_cli_runs_the_kernel_subcommand(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kernels, "QUICK", TINY)
    out, md = tmp_path / "quick.json", tmp_path / "R.md"
    assert cli.main(["kernels", "--quick", "--out", str(out), "--md", str(md)]) == 0
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == OPS
    assert "## Kernels (CPU)" in md.read_text()
    assert "| topk_mask |" in capsys.readouterr().out
    assert cli.main(["no-such-benchmark"]) == 2


def test_generator_throughput_bench_writes_its_section(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("# Benchmark results\n\nkeep me\n")
    out = tmp_path / "results_speed.json"
    assert cli.main(["speed", "--generator-only", "--dataset", "synthetic:n=120", "--out", str(out),
                     "--md", str(md)]) == 0
    data = json.loads((tmp_path / "results_generator.json").read_text())
    assert data["images"] > 0 and data["images_per_s"] > 0 and data["images_per_s_with_mask"] > 0
    assert data["images_per_s_bf16"] > 0
    text = md.read_text()
    assert "keep me" in text and "SALM generator on new images" in text and text.count("bench:generator:begin") == 1


def test_compat_bench_quick_writes_json(tmp_path):
    out = tmp_path / "results_compat.json"
    assert cli.main(["compat", "--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["plain PyTorch", "salm_fast.compat"]
    assert all(r["n"] == 1 and r["mean_s"] > 0 for r in data["rows"]) and data["speedup"] > 0
    assert data["max_abs_noise_diff"] <= 1e-6 and data["max_abs_loss_diff"] <= 1e-5  # same numbers
    assert data["includes"] and data["excludes"] and data["machine"]["cpu"]
