"""Zoom Loop Start / End run through an executor with ComfyUI's expansion and caching semantics:
the loop equals the chain, any body works, nothing is copied per iteration."""
import pytest
import torch

from node_fixtures import GraphRun, bhwc, load_pack

pack = load_pack()
from coz_pack.coz_core.prompt.base import FixedPrompts  # noqa: E402
from coz_pack.coz_core.zoom import ChainConfig, run_chain  # noqa: E402

from test_nodes import LanczosSR, photo  # noqa: E402


def coz_graph(image, sr, vlm, steps=3, zoom=2.0, size=(32, 24), center=(0.4, 0.55)):
    """Zoom Loop Start -> VLM Prompt -> SR Step -> Color Fix -> Zoom Loop End (workflow 2's shape)."""
    return {
        "1": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": image, "steps": steps, "zoom": zoom, "width": size[0], "height": size[1],
            "center_x": center[0], "center_y": center[1]}},
        "2": {"class_type": "CoZVLMPrompt", "inputs": {
            "vlm": vlm, "previous": ["1", 1], "zoomed": ["1", 2], "multiscale": True, "user_prompt": "",
            "step": ["1", 4]}},
        "3": {"class_type": "CoZSRStep", "inputs": {
            "sr_model": sr, "zoomed": ["1", 2], "region": ["1", 3], "prompt": ["2", 0], "seed": 0}},
        "4": {"class_type": "CoZColorFix", "inputs": {"image": ["3", 0], "reference": ["1", 2], "method": "wavelet"}},
        "5": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["1", 0], "image": ["4", 0], "prompt": ["2", 0]}},
    }


def test_loop_equals_the_chain():
    image = photo(batch=2, h=40, w=50)
    run = GraphRun(pack.NODE_CLASS_MAPPINGS, coz_graph(bhwc(image), LanczosSR(), FixedPrompts(["a", "b", "c"])))
    final, scales, prompts = (run.value(["5", i]) for i in range(3))
    config = ChainConfig(mode="recursive_multiscale", steps=3, zoom=2.0, size=(32, 24), center=(0.4, 0.55),
                         color="wavelet")
    ref = run_chain(image, LanczosSR(), config, FixedPrompts(["a", "b", "c"]))
    assert torch.allclose(final, bhwc(ref.final), atol=1e-6)
    assert torch.allclose(scales, torch.cat([bhwc(s) for s in ref.images]), atol=1e-6)
    assert prompts == "a\na\nb\nb\nc\nc"
    assert run.executed["CoZSRStep"] == 3 and run.executed["CoZZoomLoopEnd"] == 3
    assert run.executed["CoZZoomLoopStart"] == 3


def test_loop_body_of_other_nodes_and_a_size_change():
    class Half:  # a body node of another pack: halves the image (the loop resizes it back)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}

        def run(self, image):
            return (image[:, ::2, ::2],)

    classes = dict(pack.NODE_CLASS_MAPPINGS, Half=Half)
    graph = {
        "10": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": bhwc(photo()), "steps": 2, "zoom": 3.0, "width": 24, "height": 24,
            "center_x": 0.5, "center_y": 0.5}},
        "11": {"class_type": "Half", "inputs": {"image": ["10", 2]}},
        "12": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["10", 0], "image": ["11", 0]}},
    }
    run = GraphRun(classes, graph)
    assert run.value(["12", 1]).shape == (3, 24, 24, 3)
    assert run.value(["12", 2]) == "\n"
    # expanded copies show on the user's nodes
    assert {run.get_display_node_id(n) for n in run.prompt} == {"10", "11", "12"}


def test_loop_keeps_one_tensor_per_scale():
    """Held memory grows per iteration by the scale it must keep, the body's intermediates that
    ComfyUI caches (SR output, zoomed, region) and the scale's share of the final batch; the
    state itself shares the body's tensors."""
    size = (64, 64)
    per_image = 64 * 64 * 3 * 4
    held = {}
    for steps in (2, 6):
        run = GraphRun(pack.NODE_CLASS_MAPPINGS, coz_graph(bhwc(photo(h=64, w=64)), LanczosSR(),
                                                           FixedPrompts(""), steps=steps, size=size))
        scales = run.value(["5", 1])
        held[steps] = run.held_bytes()
        # the scales the state kept are the very tensors the Color Fix nodes returned
        fixes = [out[0] for node, out in run.outputs.items() if run.get_node(node)["class_type"] == "CoZColorFix"]
        state = next(out[0] for node, out in run.outputs.items()
                     if run.get_node(node)["class_type"] == "CoZZoomLoopStart" and out[0].step == steps)
        assert all(any(s is f for f in fixes) for s in state.scales[1:])
        assert scales.shape[0] == steps + 1
    per_iteration = (held[6] - held[2]) / 4
    # scale + SR output + zoomed + its slice of the scales batch (the region is a view of the scale)
    assert per_iteration == pytest.approx(4 * per_image, rel=0.02)


def test_loop_errors_name_the_problem():
    graph = {
        "1": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": bhwc(photo()), "steps": 2, "zoom": 2.0, "width": 16, "height": 16,
            "center_x": 0.5, "center_y": 0.5}},
        "2": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["1", 0], "image": bhwc(photo(batch=3))}},
    }
    with pytest.raises(ValueError, match="3 images for a batch of 1"):
        GraphRun(pack.NODE_CLASS_MAPPINGS, graph).value(["2", 0])
    graph["1"]["inputs"]["zoom"] = 64.0  # a 16-pixel image cannot be zoomed 64x
    with pytest.raises(ValueError, match="too small"):
        GraphRun(pack.NODE_CLASS_MAPPINGS, graph).value(["2", 0])


def test_loop_carries_a_mask_through_the_zoom():
    """A mask equal to the red channel, zoomed by the body like the image, stays equal to it."""
    from coz_pack.coz_core.imageops import resize

    class MaskZoom:  # the body's mask path: the crop resized to the process size (bicubic)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"mask": ("MASK",)}}

        def run(self, mask):
            return (resize(mask, (24, 32), "bicubic").clamp(0, 1),)

    image = photo(h=40, w=50)
    classes = dict(pack.NODE_CLASS_MAPPINGS, MaskZoom=MaskZoom)
    graph = {
        "1": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": bhwc(image), "mask": image[:, 0], "steps": 3, "zoom": 2.0, "width": 32, "height": 24,
            "center_x": 0.3, "center_y": 0.7}},
        "2": {"class_type": "MaskZoom", "inputs": {"mask": ["1", 5]}},
        "3": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["1", 0], "image": ["1", 2], "mask": ["2", 0]}},
    }
    run = GraphRun(classes, graph)
    scales, masks = run.value(["3", 1]), run.value(["3", 3])
    assert masks.shape == (4, 24, 32)
    assert torch.allclose(masks, scales[..., 0], atol=1e-5)
    # without a mask the output is an all-zero batch that costs no memory
    del graph["1"]["inputs"]["mask"], graph["3"]["inputs"]["mask"]
    empty = GraphRun(classes, graph).value(["3", 3])
    assert empty.shape == (4, 24, 32) and not empty.any() and empty.untyped_storage().nbytes() == 4
