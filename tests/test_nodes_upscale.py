"""Upscale-model backbones as nodes: the embedded Real-ESRGAN and ComfyUI's UPSCALE_MODEL adapter."""
import pytest
import torch

from node_fixtures import bhwc, load_pack

pack = load_pack()
from coz_pack.coz_core.sr.realesrgan import load_upscale_state_dict  # noqa: E402

from test_nodes import photo  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models")
    mp = pytest.MonkeyPatch()
    mp.setenv("COZ_MODELS_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def compact(models_dir):
    return NODES["CoZLoadRealESRGAN"]().load("animevideov3", "fp32", 0)[0]


def test_embedded_model_is_converted_into_upscale_models(models_dir, compact):
    path = models_dir / "upscale_models" / "realesr-animevideov3.safetensors"
    assert path.is_file()  # where ComfyUI's Load Upscale Model finds it too
    assert compact.name == "Real-ESRGAN animevideov3" and not compact.uses_prompt
    module = load_upscale_state_dict(path)
    region = photo(h=12, w=16)
    out = NODES["CoZSRStep"]().upscale(compact, bhwc(resize_to(region, 48, 64)), 0, region=bhwc(region))[0]
    with torch.no_grad():
        reference = module(region).clamp(0, 1)
    assert out.shape == (1, 48, 64, 3)
    assert torch.allclose(out, bhwc(reference), atol=1e-5)


def resize_to(image, h, w):
    from coz_pack.coz_core.imageops import resize
    return resize(image, (h, w), "bicubic").clamp(0, 1)


class Descriptor:
    """What ComfyUI's Load Upscale Model returns (a spandrel ImageModelDescriptor): a callable with
    .model and .scale."""

    def __init__(self, model, scale):
        self.model, self.scale = model, scale

    def __call__(self, x):
        return self.model(x)


def test_comfy_upscale_model_becomes_a_backbone_and_stays_shared(models_dir, compact):
    module = load_upscale_state_dict(models_dir / "upscale_models" / "realesr-animevideov3.safetensors")
    descriptor = Descriptor(module, module.scale)
    sr = NODES["CoZUpscaleModelToSR"]().adapt(descriptor, 0)[0]
    assert sr.size_multiple == 1 and not sr.uses_prompt
    image = photo(h=32, w=32)
    # zoom 2 with a x4 model: the model's output is resized to the process size
    final, scales, *_ = NODES["CoZZoomChain"]().zoom(bhwc(image), "recursive", 2, 2.0, 32, 32, 0.5, 0.5, "none",
                                                    "", 0, sr_model=sr)
    assert scales.shape == (3, 32, 32, 3)
    weight = next(module.parameters())
    assert weight.dtype == torch.float32 and weight.is_contiguous()  # the shared model is left as it was
    with pytest.raises(TypeError, match="UPSCALE_MODEL"):
        NODES["CoZUpscaleModelToSR"]().adapt(object(), 0)
