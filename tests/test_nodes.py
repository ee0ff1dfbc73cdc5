"""The nodes called directly, without ComfyUI: metadata, Zoom Crop, Color Fix, SR Step, VLM Prompt,
Zoom Chain (progress, previews, cancellation) and the host adapter's fallbacks."""
import numpy as np
import pytest
import torch
from PIL import Image

from node_fixtures import bhwc, load_pack

pack = load_pack()
from coz_pack.coz_core.color import align_color  # noqa: E402
from coz_pack.coz_core.imageops import resize  # noqa: E402
from coz_pack.coz_core.prompt.base import FixedPrompts  # noqa: E402
from coz_pack.coz_core.zoom import ChainConfig, run_chain  # noqa: E402
from coz_pack.coz_core import policy  # noqa: E402
from coz_pack.nodes import host  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


class LanczosSR:
    """A model-free backbone (Lanczos on the native region) that records its requests."""

    name = "lanczos"
    size_multiple = 1
    uses_prompt = True

    def __init__(self, on_call=None):
        self.requests = []
        self.on_call = on_call

    def __call__(self, request):
        self.requests.append(request)
        if self.on_call:
            self.on_call(len(self.requests))
        return resize(request.region, request.size, "lanczos").clamp(0, 1)


def photo(batch=1, h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, max(1, h // 8), max(1, w // 8), generator=g)
    return resize(base, (h, w), "bicubic").clamp(0, 1)  # smooth, like a picture


@pytest.fixture(autouse=True)
def no_pending_cancel():
    host._cancel.clear()
    yield
    host._cancel.clear()


def test_every_node_is_documented_and_typed():
    assert set(NODES) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for key, cls in NODES.items():
        assert key.startswith("CoZ") and pack.NODE_DISPLAY_NAME_MAPPINGS[key].startswith("CoZ ")
        assert cls.CATEGORY.startswith("CoZ/") and len(cls.DESCRIPTION) > 40
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, (kind, *opts) in spec.get(group, {}).items():
                assert opts and opts[0].get("tooltip"), f"{key}.{name} has no tooltip"
                if isinstance(kind, list) and "default" in opts[0]:
                    assert opts[0]["default"] in kind


def test_zoom_crop_matches_pil_on_the_crop():
    image = photo(h=40, w=60)
    mask = torch.rand(1, 40, 60)
    zoomed, region, box, mask_region = NODES["CoZZoomCrop"]().crop(bhwc(image), 4.0, 0, 0, 0.5, 0.5, mask)
    assert box == ((60 - 15) // 2, (40 - 10) // 2, (60 - 15) // 2 + 15, (40 - 10) // 2 + 10)
    left, top, right, bottom = box
    assert torch.equal(region[0], bhwc(image)[0, top:bottom, left:right])
    assert torch.equal(mask_region, mask[:, top:bottom, left:right])
    # independent reference: Pillow's bicubic on each float channel of the crop
    crop = image[0, :, top:bottom, left:right].numpy()
    ref = np.stack([np.asarray(Image.fromarray(c).resize((60, 40), Image.BICUBIC)) for c in crop], -1)
    assert zoomed.shape == (1, 40, 60, 3)
    assert np.abs(zoomed[0].numpy() - np.clip(ref, 0, 1)).max() < 1e-4


def test_zoom_crop_off_centre_and_resized():
    image = photo(batch=2, h=32, w=32)
    zoomed, region, box, _ = NODES["CoZZoomCrop"]().crop(bhwc(image), 2.0, 24, 16, 1.0, 0.0)
    assert box == (16, 0, 32, 16)  # clamped into the top-right corner
    assert zoomed.shape == (2, 16, 24, 3) and region.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="mask"):
        NODES["CoZZoomCrop"]().crop(bhwc(image), 2.0, 0, 0, 0.5, 0.5, torch.zeros(1, 8, 8))


def test_color_fix_is_coz_core_and_follows_the_reference():
    out, ref = photo(seed=1), photo(seed=2) * 0.5
    fixed = NODES["CoZColorFix"]().fix(bhwc(out), bhwc(ref), "wavelet")[0]
    assert torch.equal(fixed, bhwc(align_color(out, ref, "wavelet")))
    adain = NODES["CoZColorFix"]().fix(bhwc(out), bhwc(ref), "adain")[0]
    assert torch.allclose(adain.mean((0, 1, 2)), bhwc(ref).mean((0, 1, 2)), atol=2e-3)
    # a reference of another size is resized to the result's
    small = NODES["CoZColorFix"]().fix(bhwc(out), bhwc(ref[..., ::2, ::2]), "adain")[0]
    assert small.shape == fixed.shape


def test_sr_step_passes_region_prompts_and_seed():
    sr = LanczosSR()
    zoomed, region = photo(batch=2, h=32, w=32), photo(batch=2, h=8, w=8, seed=3)
    out = NODES["CoZSRStep"]().upscale(sr, bhwc(zoomed), 7, region=bhwc(region), prompt="a cat\na dog")[0]
    request = sr.requests[0]
    assert request.prompts == ["a cat", "a dog"] and request.seed == 7
    assert torch.equal(request.region, region) and torch.equal(request.zoomed, zoomed)
    assert torch.allclose(out, bhwc(resize(region, (32, 32), "lanczos").clamp(0, 1)), atol=1e-6)
    NODES["CoZSRStep"]().upscale(sr, bhwc(zoomed), 0, prompt="same for both")
    assert sr.requests[1].prompts == ["same for both"] * 2 and torch.equal(sr.requests[1].region, zoomed)
    cond = [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}]]
    NODES["CoZSRStep"]().upscale(sr, bhwc(zoomed), 0, conditioning=cond)
    assert sr.requests[2].conditioning is cond  # handed over as ComfyUI made it
    sr.uses_prompt = False
    with pytest.raises(ValueError, match="CONDITIONING"):
        NODES["CoZSRStep"]().upscale(sr, bhwc(zoomed), 0, conditioning=cond)


def test_vlm_prompt_asks_with_both_scales_and_appends_the_user_text():
    seen = []

    def vlm(request):
        seen.append(request)
        return [f"thing {i}" for i in range(request.batch)]

    prev, zoomed = photo(batch=2), photo(batch=2, seed=5)
    text = NODES["CoZVLMPrompt"]().describe(vlm, bhwc(prev), bhwc(zoomed), True, "sharp", step=3)[0]
    assert text == "thing 0, sharp,\nthing 1, sharp,"
    assert seen[0].step == 3 and seen[0].multiscale and torch.equal(seen[0].previous, prev)
    fixed = NODES["CoZVLMPrompt"]().describe(FixedPrompts(["a", "b"]), bhwc(prev[:1]), bhwc(zoomed[:1]), False, "")
    assert fixed == ("a",)


def chain_inputs(**over):
    args = dict(mode="recursive_multiscale", steps=3, zoom=2.0, width=32, height=24, center_x=0.3,
                center_y=0.6, color="wavelet", user_prompt="detailed", seed=5)
    args.update(over)
    return args


def test_zoom_chain_equals_run_chain_for_every_batch_element():
    image = photo(batch=2, h=40, w=50)
    args = chain_inputs()
    final, scales, prompts, _, info = NODES["CoZZoomChain"]().zoom(bhwc(image), **args, sr_model=LanczosSR(),
                                                                   vlm=FixedPrompts(["one", "two"]))
    config = ChainConfig(mode="recursive_multiscale", steps=3, zoom=2.0, size=(32, 24), center=(0.3, 0.6),
                         color="wavelet", user_prompt="detailed", seed=5)
    ref = run_chain(image, LanczosSR(), config, FixedPrompts(["one", "two"]))
    assert final.shape == (2, 24, 32, 3) and scales.shape == (8, 24, 32, 3)
    assert torch.allclose(final, bhwc(ref.final), atol=1e-6)
    assert torch.allclose(scales, torch.cat([bhwc(s) for s in ref.images]), atol=1e-6)
    assert prompts.splitlines() == ["one, detailed,"] * 2 + ["two, detailed,"] * 4
    assert info == "prompts: fixed (2 per-step texts, the last repeats)"


def test_zoom_chain_without_model_and_its_progress():
    updates = []
    original = host.Progress.update

    def spy(self, value, preview=None):
        updates.append((value, self.total, None if preview is None else tuple(preview.shape)))
        original(self, value, preview)

    host.Progress.update = spy
    try:
        final, scales, prompts, _, info = NODES["CoZZoomChain"]().zoom(bhwc(photo()), **chain_inputs(mode="bicubic"))
    finally:
        host.Progress.update = original
    assert updates == [(k, 3, (1, 24, 32, 3)) for k in (1, 2, 3)]
    assert scales.shape[0] == 4 and prompts == "\n\n" and info.startswith("prompts: none")
    with pytest.raises(ValueError, match="backbone"):
        NODES["CoZZoomChain"]().zoom(bhwc(photo()), **chain_inputs())


def test_zoom_chain_stops_when_cancelled_and_keeps_the_finished_scales():
    sr = LanczosSR(on_call=lambda n: host.request_cancel() if n == 2 else None)
    node = NODES["CoZZoomChain"]
    before = node.IS_CHANGED()
    final, scales, prompts, boxes, _ = node().zoom(bhwc(photo()), **chain_inputs(steps=6), sr_model=sr)
    assert len(sr.requests) == 2  # stopped before step 3
    assert scales.shape[0] == 3 and torch.equal(final, scales[2:])  # scales 0, 1, 2
    assert len(boxes) == 3
    assert prompts.splitlines()[-1] == "# cancelled: 2 of 6 steps done, these scales are returned"
    assert node.IS_CHANGED() != before  # ComfyUI's cache will not hand the partial result out again


def test_host_fallbacks(tmp_path, monkeypatch):
    assert not host.IN_COMFY
    monkeypatch.setenv("COZ_MODELS_DIR", str(tmp_path))
    (tmp_path / "coz" / "sub").mkdir(parents=True)
    (tmp_path / "coz" / "sub" / "lora.safetensors").write_bytes(b"x")
    (tmp_path / "coz" / "notes.txt").write_text("x")
    (tmp_path / "LLM" / "qwen").mkdir(parents=True)
    (tmp_path / "LLM" / "qwen" / "config.json").write_text("{}")
    assert host.list_files("coz") == ["sub/lora.safetensors"]
    assert host.list_model_dirs("LLM") == ["qwen"]
    assert host.resolve("LLM", "qwen") == tmp_path / "LLM" / "qwen"
    with pytest.raises(FileNotFoundError, match="coz"):
        host.resolve("coz", "missing.pt")
    assert host.pick_dtype("bf16") == torch.bfloat16
    # one policy: the nodes' auto is the CLI's auto
    assert host.pick_dtype("auto", torch.device("cpu")) == policy.auto_dtype(torch.device("cpu"))
    with pytest.raises(ValueError):
        host.pick_dtype("fp8")
    layer = torch.nn.Linear(2, 2)
    host.load_all([host.ManagedModule(layer)])
    assert layer.weight.device == host.torch_device()
