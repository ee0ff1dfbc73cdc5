"""The VLM loader node on a tiny Qwen2.5-VL folder placed as in ComfyUI's models/LLM: the model
lists and the full CoZ step graph (VLM Prompt -> SR Step -> Color Fix) in the zoom loop."""
import pytest
import torch

from node_fixtures import GraphRun, bhwc, load_pack
from tests.qwen_fixtures import make_tiny_qwen, write_released_adapter

pack = load_pack()
from test_nodes import LanczosSR, chain_inputs, photo  # noqa: E402
from test_nodes_loop import coz_graph  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_qwen(root / "LLM" / "qwen-tiny")
    write_released_adapter(root / "LLM" / "qwen-tiny", root / "LLM" / "VLM_LoRA" / "checkpoint-10000")
    mp = pytest.MonkeyPatch()
    mp.setenv("COZ_MODELS_DIR", str(root))
    yield root
    mp.undo()


def test_vlm_in_the_loop_body(models):
    assert NODES["CoZLoadVLM"].INPUT_TYPES()["required"]["model"][0] == ["qwen-tiny"]
    vlm, info = NODES["CoZLoadVLM"]().load("qwen-tiny", "none", "fp32", 8)
    assert info == "prompts: vlm_base (qwen-tiny, no adapter), up to 8 new tokens"
    assert [m.name for m in vlm.managed] == ["Qwen2.5-VL"]  # handed to the host's model management
    run = GraphRun(NODES, coz_graph(bhwc(photo(batch=2, h=40, w=50)), LanczosSR(), vlm, steps=2))
    scales, prompts = run.value(["5", 1]), run.value(["5", 2])
    assert scales.shape == (6, 24, 32, 3) and torch.isfinite(scales).all()
    assert len(prompts.splitlines()) == 4  # 2 steps x 2 images
    assert run.executed["CoZVLMPrompt"] == 2


def test_the_grpo_adapter_from_the_list_and_what_ran(models):
    inputs = NODES["CoZLoadVLM"].INPUT_TYPES()["required"]
    assert inputs["adapter"][0] == ["none", "VLM_LoRA/checkpoint-10000"] and inputs["model"][0] == ["qwen-tiny"]
    assert inputs["max_new_tokens"][1]["default"] == 32  # upstream's current prompt length
    vlm, info = NODES["CoZLoadVLM"]().load("qwen-tiny", "VLM_LoRA/checkpoint-10000", "fp32", 6)
    assert info == ("prompts: vlm (qwen-tiny + adapter checkpoint-10000: 14 linears merged, scale 4), "
                    "up to 6 new tokens")  # 2 layers x 7 projections, lora_alpha 32 / r 8
    chain = NODES["CoZZoomChain"]()
    assert chain.RETURN_NAMES == ("image", "scales", "prompts", "boxes", "info")  # new outputs come last
    *_, prompts, _, chain_info = chain.zoom(bhwc(photo(h=40, w=50)), **chain_inputs(steps=1, width=56, height=56),
                                         sr_model=LanczosSR(), vlm=vlm)
    assert chain_info == info and prompts.endswith("detailed,")
