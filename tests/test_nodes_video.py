"""CoZ Zoom Video called directly: the chain's and the loop's boxes, the IMAGE batch it returns,
batches, progress with previews, cancellation."""
import pytest
import torch

from node_fixtures import GraphRun, bhwc, load_pack

pack = load_pack()
from coz_pack.coz_core.video import VideoConfig, ZoomVideo  # noqa: E402
from coz_pack.coz_core.zoom import ChainConfig, run_chain  # noqa: E402
from coz_pack.nodes import host  # noqa: E402

from test_nodes import LanczosSR, photo  # noqa: E402
from test_nodes_loop import coz_graph  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
GEOMETRY = {"steps": 2, "zoom": 2.0, "width": 32, "height": 24, "center_x": 0.3, "center_y": 0.6}
VIDEO = {"frames_per_step": 4, "fps": 24.0, "direction": "zoom_in", "ease": 0.2, "blend": 0.5}


@pytest.fixture(autouse=True)
def no_pending_cancel():
    host._cancel.clear()
    yield
    host._cancel.clear()


def chain_outputs(batch=1):
    return NODES["CoZZoomChain"]().zoom(bhwc(photo(batch=batch, h=40, w=50)), "recursive", **GEOMETRY,
                                        color="wavelet", user_prompt="", seed=0, sr_model=LanczosSR())


def test_returns_an_image_batch_of_the_zoom():
    image = photo(h=40, w=50)
    _, scales, _, boxes, _ = chain_outputs()
    frames, fps = NODES["CoZZoomVideo"]().render(scales, boxes, **VIDEO)
    assert frames.shape == (4 * 2 + 1, 24, 32, 3) and frames.dtype == torch.float32 and fps == 24.0
    # the same frames as the library on the same chain
    config = ChainConfig(mode="recursive", steps=2, zoom=2.0, size=(32, 24), center=(0.3, 0.6))
    ref = run_chain(image, LanczosSR(), config)
    assert [b.as_list() for b in boxes] == [s.box.as_list() for s in ref.steps]
    video = ZoomVideo.from_chain(ref, VideoConfig(frames_per_step=4, ease=0.2, blend=0.5))
    assert torch.allclose(frames, torch.cat([bhwc(f) for f in video]), atol=1e-5)
    assert torch.allclose(frames[0], scales[0], atol=1e-6) and torch.allclose(frames[-1], scales[-1], atol=1e-6)


def test_a_batch_gives_one_video_after_another_and_directions():
    _, scales, _, boxes, _ = chain_outputs(batch=2)  # scale-major: s0 b0, s0 b1, s1 b0, ...
    frames, _ = NODES["CoZZoomVideo"]().render(scales, boxes, **VIDEO)
    assert frames.shape == (2 * 9, 24, 32, 3)
    for b in range(2):
        assert torch.allclose(frames[9 * b], scales[b], atol=1e-6)
        assert torch.allclose(frames[9 * b + 8], scales[4 + b], atol=1e-6)
    back, _ = NODES["CoZZoomVideo"]().render(scales, boxes, **{**VIDEO, "direction": "zoom_out"})
    assert torch.equal(back[:9], frames[:9].flip(0))
    loop, _ = NODES["CoZZoomVideo"]().render(scales, boxes, **{**VIDEO, "direction": "ping_pong"})
    assert loop.shape[0] == 2 * 16 and torch.equal(loop[:16], torch.cat([frames[:9], frames[1:8].flip(0)]))


def test_the_loop_gives_the_chain_s_boxes():
    image = photo(h=40, w=50)
    from coz_pack.coz_core.prompt.base import FixedPrompts

    run = GraphRun(NODES, coz_graph(bhwc(image), LanczosSR(), FixedPrompts(["a"]), steps=3, zoom=2.0,
                                    size=(32, 24), center=(0.4, 0.55)))
    scales, boxes = run.value(["5", 1]), run.value(["5", 4])
    config = ChainConfig(mode="recursive_multiscale", steps=3, zoom=2.0, size=(32, 24), center=(0.4, 0.55))
    ref = run_chain(image, LanczosSR(), config, FixedPrompts(["a"]))
    assert [b.as_list() for b in boxes] == [s.box.as_list() for s in ref.steps]
    frames, _ = NODES["CoZZoomVideo"]().render(scales, boxes, **VIDEO)
    assert frames.shape == (13, 24, 32, 3)


def test_mismatched_inputs_are_refused():
    _, scales, _, boxes, _ = chain_outputs()
    with pytest.raises(ValueError, match="same chain"):
        NODES["CoZZoomVideo"]().render(scales[:2], boxes, **VIDEO)


def test_progress_per_chunk_and_cancel(monkeypatch):
    _, scales, _, boxes, _ = chain_outputs()
    updates = []
    real = host.Progress.update

    def spy(self, value, preview=None):
        updates.append((value, self.total, None if preview is None else tuple(preview.shape)))
        real(self, value, preview)

    monkeypatch.setattr(host.Progress, "update", spy)
    NODES["CoZZoomVideo"]().render(scales, boxes, **{**VIDEO, "frames_per_step": 20})  # 41 frames, chunks of 16
    assert updates == [(1, 3, (1, 24, 32, 3)), (2, 3, (1, 24, 32, 3)), (3, 3, (1, 24, 32, 3))]
    host.request_cancel()
    with pytest.raises(host.Cancelled):
        NODES["CoZZoomVideo"]().render(scales, boxes, **{**VIDEO, "frames_per_step": 20})
