"""The VLM loader node on a tiny Qwen2.5-VL folder placed as in ComfyUI's models/LLM: the model
lists and the full CoZ step graph (VLM Prompt -> SR Step -> Color Fix) in the zoom loop."""
import pytest
import torch

from node_fixtures import GraphRun, bhwc, load_pack
from tests.qwen_fixtures import make_tiny_qwen

pack = load_pack()
from test_nodes import LanczosSR, photo  # noqa: E402
from test_nodes_loop import coz_graph  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_qwen(root / "LLM" / "qwen-tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("COZ_MODELS_DIR", str(root))
    yield root
    mp.undo()


def test_vlm_in_the_loop_body(models):
    assert NODES["CoZLoadVLM"].INPUT_TYPES()["required"]["model"][0] == ["qwen-tiny"]
    vlm = NODES["CoZLoadVLM"]().load("qwen-tiny", "none", "fp32", 8)[0]
    assert [m.name for m in vlm.managed] == ["Qwen2.5-VL"]  # handed to the host's model management
    run = GraphRun(NODES, coz_graph(bhwc(photo(batch=2, h=40, w=50)), LanczosSR(), vlm, steps=2))
    scales, prompts = run.value(["5", 1]), run.value(["5", 2])
    assert scales.shape == (6, 24, 32, 3) and torch.isfinite(scales).all()
    assert len(prompts.splitlines()) == 4  # 2 steps x 2 images
    assert run.executed["CoZVLMPrompt"] == 2
