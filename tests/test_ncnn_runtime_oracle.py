"""The converted Real-ESRGAN models against the ncnn runtime itself (the `ncnn` wheel) running the
packaged .param/.bin files: an oracle independent of our ncnn reader and converter. Skipped where
the wheel is not installed (pip install ncnn)."""
import numpy as np
import pytest
import torch

from coz_core.sr.realesrgan import EMBEDDED_MODELS, convert, package_models_dir

ncnn = pytest.importorskip("ncnn")


def ncnn_upscale(name: str, image: np.ndarray) -> np.ndarray:
    """[3, H, W] float32 RGB 0..1 -> [3, 4H, 4W] by ncnn in float32 on the CPU."""
    spec = EMBEDDED_MODELS[name]
    net = ncnn.Net()
    for flag in ("use_vulkan_compute", "use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                 "use_bf16_storage", "use_int8_inference"):
        if hasattr(net.opt, flag):
            setattr(net.opt, flag, False)
    net.opt.num_threads = 1
    folder = package_models_dir()
    assert net.load_param(str(folder / f"{spec.stem}.param")) == 0
    assert net.load_model(str(folder / f"{spec.stem}.bin")) == 0
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(np.ascontiguousarray(image)))
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out)


@pytest.mark.parametrize("name", ["animevideov3", "x4plus"])
def test_converted_model_equals_the_ncnn_runtime(name):
    spec = EMBEDDED_MODELS[name]
    state, _ = convert(name)
    module = spec.build("cpu")
    module.load_state_dict(state)
    image = np.random.default_rng(0).random((3, 12, 16), dtype=np.float32)
    with torch.no_grad():
        ours = module.eval()(torch.from_numpy(image)[None])[0].numpy()
    theirs = ncnn_upscale(name, image)
    assert theirs.shape == ours.shape == (3, 48, 64)
    # measured: 4e-6 (animevideov3); one weight off by 0.05 moves the output by 6e-4
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()
