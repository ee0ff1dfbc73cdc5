"""benchmarks/upsample_gpu.py at its tiny CPU sizes (the GPU benchmark imports and calls it):
every row is measured and reported, the reference's rows say why they are skipped."""
import importlib.util
from pathlib import Path

import torch


def test_measure_tiny_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("UPSAMPLE_ANYTHING_PATH", str(tmp_path / "absent"))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "upsample_gpu.py"
    spec = importlib.util.spec_from_file_location("upsample_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(torch.device("cpu"), tiny=True)
    figures = dict(rows)
    assert "reference absent" in figures["upsampler reference"]
    for size, lr, channels in module.TINY:
        name = f"upsampler {size} guide, {lr}x{lr}x{channels}"
        assert figures[f"{name}: reference"].startswith("skipped")
        ours = figures[f"{name}: ours (batched)"]
        assert " s, peak " in ours and "recon" in ours and "error" not in ours, ours
        assert ("PSNR" if channels == 1 else "cos") in ours
