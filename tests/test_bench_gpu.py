"""Smoke test of benchmarks/bench_gpu.py at tiny sizes on CPU: every section runs and reports."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_gpu.json"
    bench.main(["--device", "cpu", "--steps", "1", "--time-scale", "5", "--out", str(out)])  # slow CI: no cut-offs
    data = json.loads(out.read_text())
    assert data["tiny"] and data["device"].startswith("CPU")
    rows = data["rows"]
    failed = [r for r in rows if "FAILED" in r["what"]]
    assert not failed, failed
    sections = {r["section"] for r in rows}
    assert {"build", "vlm", "sd3", "chain", "upsample", "wholeimage"} <= sections
    same = [r for r in rows if r["what"].startswith("fast path tokens == plain")]
    assert same and same[0]["identical"]
    presets = {r["what"].split(":")[0] for r in rows if r["section"] == "chain"}
    assert presets == {"default (auto)", "fast", "compact", "lowvram (compact + VLM/SD3 take turns)",
                       "what auto chooses on a 16 / 24 / 80 GiB GPU"}
    vae = [r for r in rows if r["what"].startswith("VAE bf16 vs fp32")]
    assert vae and 0 < vae[0]["max"] < 0.05
    printed = capsys.readouterr().out
    assert printed.count("=" * 100) == 2  # the one table at the end
    assert torch.get_default_dtype() == torch.float32
