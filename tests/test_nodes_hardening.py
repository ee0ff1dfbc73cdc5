"""Inside-ComfyUI defects of issue 12, on the node classes without ComfyUI: empty (never None)
optional outputs, sub-categories, help pages for every node, Load Image's placeholder mask,
separate SD3 file lists, seeds that cannot overflow torch.manual_seed."""
import re
from pathlib import Path

import pytest
import torch

from coz_core.zoom import ChainConfig, run_chain
from node_fixtures import load_pack

pack = load_pack()

ROOT = Path(__file__).resolve().parent.parent


def test_unconnected_upsampler_outputs_are_empty_batches_not_none():
    node = pack.NODE_CLASS_MAPPINGS["CoZBilateralUpsampler"]()
    guide = torch.rand(1, 32, 48, 3)
    image, mask, latent = node.upsample(guide, "fixed", 1, mask=torch.rand(1, 8, 12))
    assert image.shape == (0, 32, 48, 3) and image.dtype == torch.float32
    assert latent["samples"].shape == (0, 4, 4, 6)
    assert mask.shape == (1, 32, 48)
    for tensor in (image, latent["samples"]):
        assert tensor[:1].numel() == 0  # what a preview node does with it: subscript, iterate
        assert list(tensor) == []


def test_every_node_has_a_sub_category_and_a_help_page():
    text = (ROOT / "__init__.py").read_text()
    web = re.search(r'WEB_DIRECTORY = "(.+)"', text).group(1)
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert re.fullmatch(r"CoZ/(loaders|steps|chain|upscaling|video)", cls.CATEGORY), key
        page = (ROOT / web / "docs" / f"{key}.md").read_text()
        assert page.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[key]}\n")
        inputs = cls.INPUT_TYPES()
        for name in [*inputs.get("required", {}), *inputs.get("optional", {}), *cls.RETURN_NAMES]:
            assert f"**{name}**" in page, (key, name)


def test_load_images_placeholder_mask_counts_as_no_mask():
    start = pack.NODE_CLASS_MAPPINGS["CoZZoomLoopStart"]()
    image = torch.rand(1, 96, 80, 3)
    args = dict(image=image, steps=2, zoom=2.0, width=32, height=32, center_x=0.5, center_y=0.5, unique_id="1")
    state, *_, mask_region = start.start(**args, mask=torch.zeros(1, 64, 64))
    assert state.masks is None and not mask_region.any()
    with pytest.raises(ValueError, match="mask is 64x64"):  # a real mask of the wrong size is still an error
        start.start(**args, mask=torch.ones(1, 64, 64))


def test_sd3_loader_lists_loras_and_vae_encoders_apart():
    from coz_pack.nodes.sd3 import coz_file_lists as split

    files = ["model_20001.pkl", "SR_VAE/vae_encoder_20001.pt", "x4plus.safetensors"]
    assert split(files) == (["model_20001.pkl", "x4plus.safetensors"], ["SR_VAE/vae_encoder_20001.pt"])
    assert split(["renamed.pt"]) == (["renamed.pt"], ["renamed.pt"])


def test_largest_seed_wraps_instead_of_overflowing():
    seen = []

    class Seeded:
        name, size_multiple, uses_prompt = "seeded", 1, False

        def __call__(self, request):
            torch.Generator().manual_seed(request.seed)  # raises past 2^64 - 1
            seen.append(request.seed)
            return request.zoomed

    run_chain(torch.rand(1, 3, 16, 16), Seeded(), ChainConfig(mode="recursive", steps=2, zoom=2, size=16,
                                                              seed=2**64 - 1))
    assert seen == [0, 1]


def test_precision_tooltips_state_the_one_policy():
    """auto is coz_core.policy's everywhere; no tooltip may promise fp32 on every CPU."""
    found = 0
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        entry = cls.INPUT_TYPES().get("required", {}).get("precision")
        if entry:
            found += 1
            tip = entry[1]["tooltip"]
            assert "one policy" in tip and "fp32 on the CPU" not in tip, key
    assert found == 3  # Real-ESRGAN, VLM, SD3 loaders
