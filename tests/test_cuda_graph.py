"""The shared CUDA-graph capture: what fails to capture is told apart from running out of memory."""
import pytest
import torch

from coz_core import cuda_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_work_is_captured_replayed_and_its_failures_told_apart():
    x = torch.ones(4, device="cuda")
    y = cuda_graph.warm_up(lambda: x * 2, times=2)
    graph, out = cuda_graph.capture(lambda: x * 3)
    torch.cuda.synchronize()
    assert torch.equal(y, x * 2) and torch.equal(out, x * 3)  # replayed once by capture
    x.fill_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full((4,), 6.0, device="cuda"))
    with pytest.raises(cuda_graph.CaptureError):
        cuda_graph.capture(lambda: x.sum().item())  # a host sync cannot be captured
    torch.cuda.synchronize()  # the device is still usable

    def too_big():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        cuda_graph.capture(too_big)
