"""CoZ Upscale Image as a node: outputs, prompts STRING, progress with previews, and workflow 05."""
import json
from pathlib import Path

import torch

from node_fixtures import bhwc, load_pack

pack = load_pack()
from coz_pack.nodes import host  # noqa: E402
from coz_pack.coz_core.imageops import load_image, resize  # noqa: E402
from coz_pack.coz_core.sr.upscale import UpscaleModelBackbone  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
ROOT = Path(__file__).resolve().parents[1]


def tiny_model() -> UpscaleModelBackbone:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Upsample(scale_factor=2),
                                torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Sigmoid()).eval()
    return UpscaleModelBackbone(model, 2, tile=None, dtype=torch.float32, device="cpu")


def test_node_upscales_with_tile_prompts_and_previews(monkeypatch):
    previews = []
    monkeypatch.setattr(host.Progress, "update", lambda self, value, preview=None: previews.append(preview))
    image = bhwc(resize(load_image(ROOT / "coz_core" / "data" / "sample.png"), (40, 72), "lanczos").clamp(0, 1))
    rgba = torch.cat([image, torch.ones(1, 40, 72, 1)], dim=-1)
    out, prompts = NODES["CoZUpscaleImage"]().upscale(
        rgba, tiny_model(), "2", 64, 16, "wavelet", "cosine", "photo", 1, tile_prompts="sky\nsuit\n")
    assert out.shape == (1, 80, 144, 4) and torch.allclose(out[..., 3], torch.ones(1, 80, 144))
    lines = prompts.split("\n")
    assert len(lines) == 6 and lines[0].endswith(": sky, photo,") and lines[-1].endswith(": suit, photo,")
    tiles = [p for p in previews if p is not None]
    assert len(previews) == 12 and len(tiles) == 6 and tiles[-1].shape == (1, 80, 144, 3)


def test_workflow_05_api_copy_runs_offline(default_backbone):
    """The API copy of workflow 05 with its image loader replaced by the sample, smaller."""
    graph = json.loads((ROOT / "workflows" / "api" / "CoZ 5 - Whole image upscale.json").read_text())
    assert [graph[k]["class_type"] for k in sorted(graph)] == [
        "LoadImage", "CoZLoadRealESRGAN", "CoZUpscaleImage", "SaveImage", "PreviewAny"]
    inputs = graph["3"]["inputs"]
    image = bhwc(resize(load_image(ROOT / "coz_core" / "data" / "sample.png"), (32, 48), "lanczos").clamp(0, 1))
    settings = {k: v for k, v in inputs.items() if k not in ("image", "sr_model")}
    settings.update(tile=128, overlap=32)
    out, prompts = NODES["CoZUpscaleImage"]().upscale(image, default_backbone, **settings)
    assert out.shape == (1, 128, 192, 3) and len(prompts.split("\n")) == 2
    ui = json.loads((ROOT / "workflows" / "CoZ 5 - Whole image upscale.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "CoZUpscaleImage")
    assert node["widgets_values"][:7] == [inputs[k] for k in ("factor", "tile", "overlap", "color", "blend",
                                                             "user_prompt", "seed")]


def test_node_asks_the_vlm_per_tile_with_upstreams_token_limit(tmp_path, monkeypatch):
    from tests.qwen_fixtures import make_tiny_qwen

    make_tiny_qwen(tmp_path / "LLM" / "qwen-tiny")
    monkeypatch.setenv("COZ_MODELS_DIR", str(tmp_path))
    vlm = NODES["CoZLoadVLM"]().load("qwen-tiny", "none", "fp32", 64)[0]
    image = bhwc(resize(load_image(ROOT / "coz_core" / "data" / "sample.png"), (32, 88), "lanczos").clamp(0, 1))
    runs = []
    for batch in (1, 3):  # one tile per VLM call, then three tiles per (left-padded) batch
        vlm.inner.records.clear()
        out, prompts = NODES["CoZUpscaleImage"]().upscale(image, tiny_model(), "2", 64, 16, "wavelet", "cosine",
                                                          "", 0, vlm=vlm, prompt_tokens=3, prompt_batch=batch)
        runs.append([(r.index, r.raw, r.new_tokens) for r in vlm.inner.records])
        records = vlm.inner.records
        assert out.shape == (1, 64, 176, 3) and len(records) == len(prompts.split("\n")) == 4  # one per tile
        assert [line.split(": ", 1)[1] for line in prompts.split("\n")] == [r.prompt for r in records]
    assert all(0 < n <= 3 for _, _, n in runs[0]) and vlm.inner.max_new_tokens == 64  # restored
    assert vlm.inner.batch_size == 1
    assert [raw for _, raw, _ in runs[0]] == [raw for _, raw, _ in runs[1]]  # batching changes no answer
    assert [i for i, _, _ in runs[1]] == [0, 1, 2, 0]  # two requests: tiles 1-3, then tile 4
