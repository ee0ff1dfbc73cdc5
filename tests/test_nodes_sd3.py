"""The SD3 loader node on a tiny SD3 in the real file layouts, placed as in ComfyUI's models
folder: the model lists, the chain with it, and SR Step with CONDITIONING instead of text."""
import shutil

import pytest
import torch

from node_fixtures import bhwc, load_pack
from tests.sd3_fixtures import shared_tiny_sd3

pack = load_pack()
from coz_pack.coz_core.prompt.base import FixedPrompts  # noqa: E402
from coz_pack.coz_core.sr.coz_sd3 import CoZSD3Backbone  # noqa: E402

from test_nodes import photo  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
OWN = "(from the SD3 model)"


def place_tiny_sd3(tiny, root):
    """models/diffusers/sd3-tiny, models/coz/{model_20001.pkl, vae_encoder_20001.pt},
    models/text_encoders/{clip_l, clip_g, t5xxl_fp16}.safetensors."""
    shutil.copytree(tiny.folder, root / "diffusers" / "sd3-tiny")
    (root / "coz").mkdir(parents=True, exist_ok=True)  # the pack creates its folders when registered
    shutil.copy(tiny.lora_pkl, root / "coz")
    shutil.copy(tiny.vae_pt, root / "coz")
    (root / "text_encoders").mkdir()
    for f in (tiny.clip_l, tiny.clip_g, tiny.t5):
        shutil.copy(f, root / "text_encoders")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    place_tiny_sd3(shared_tiny_sd3(tmp_path_factory), root)
    mp = pytest.MonkeyPatch()
    mp.setenv("COZ_MODELS_DIR", str(root))
    yield root
    mp.undo()


def test_loader_lists_the_model_folders(models):
    spec = NODES["CoZLoadSD3"].INPUT_TYPES()["required"]
    assert spec["sd3"][0] == ["diffusers/sd3-tiny"]
    assert spec["coz_lora"][0] == ["none", "model_20001.pkl"]  # each list offers its own kind
    assert spec["coz_vae_encoder"][0] == ["none", "vae_encoder_20001.pt"]
    assert spec["t5"][0] == [OWN, "clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]


def test_chain_with_the_loaded_model(models):
    sr = NODES["CoZLoadSD3"]().load("diffusers/sd3-tiny", "model_20001.pkl", "vae_encoder_20001.pt",
                                    OWN, OWN, OWN, False, True, "fp32")[0]
    assert sr.name == "coz-sd3" and sr.size_multiple == 16 and isinstance(sr.inner, CoZSD3Backbone)
    # every module goes to the host's model management; T5 was left out
    assert sorted(m.name for m in sr.managed) == ["SD3 VAE", "SD3 clip_g", "SD3 clip_l", "SD3 transformer"]
    final, scales, prompts, *_ = NODES["CoZZoomChain"]().zoom(bhwc(photo(h=48, w=40)), "recursive", 2, 2.0, 32, 32,
                                                          0.5, 0.5, "wavelet", "photo", 3, sr_model=sr,
                                                          vlm=FixedPrompts("a face"))
    assert scales.shape == (3, 32, 32, 3) and torch.isfinite(scales).all()
    assert prompts == "a face, photo,\na face, photo,"


def test_sr_step_takes_comfy_conditioning(models):
    sr = NODES["CoZLoadSD3"]().load("diffusers/sd3-tiny", "model_20001.pkl", "vae_encoder_20001.pt",
                                    "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
                                    True, True, "fp32")[0]
    zoomed = bhwc(photo(h=32, w=32))
    cond = sr.text_encoder(["a cat"])  # what CLIPTextEncode with SD3's encoders gives, packed as ComfyUI does
    comfy_cond = [[cond.prompt_embeds, {"pooled_output": cond.pooled}]]
    by_text = NODES["CoZSRStep"]().upscale(sr, zoomed, 5, prompt="a cat")[0]
    by_cond = NODES["CoZSRStep"]().upscale(sr, zoomed, 5, conditioning=comfy_cond)[0]
    other = NODES["CoZSRStep"]().upscale(sr, zoomed, 5, prompt="a dog")[0]
    assert torch.allclose(by_text, by_cond, atol=1e-5)
    assert not torch.allclose(by_text, other, atol=1e-3)
