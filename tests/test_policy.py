"""One policy (coz_core.policy) and one factory (coz_core.factory) for the CLI and the nodes."""
import argparse

import pytest
import torch

from node_fixtures import load_pack

load_pack()
from coz_pack.coz_core import cli, factory, policy  # noqa: E402
from coz_pack.nodes import host  # noqa: E402
from coz_pack.nodes.upscalers import LoadRealESRGAN  # noqa: E402

CPU = torch.device("cpu")


def test_auto_dtype_follows_the_cpu():
    expected = torch.bfloat16 if policy.cpu_has_bf16() else torch.float32
    assert policy.auto_dtype(CPU) == policy.resolve_dtype("auto", CPU) == policy.resolve_dtype(None, CPU) == expected
    assert policy.auto_dtype(CPU, bf16_ok=False) == torch.float32
    assert policy.resolve_dtype("fp16", CPU) == torch.float16
    assert policy.resolve_dtype(torch.float64, CPU) == torch.float64
    with pytest.raises(ValueError, match="auto, fp32, fp16, bf16"):
        policy.resolve_dtype("fp8", CPU)


def test_devices_are_checked_with_a_clear_message():
    assert policy.parse_device("cpu") == CPU
    assert policy.parse_device(None) == policy.default_device()
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        policy.parse_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here.*--device cpu"):
            policy.parse_device("cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        policy.parse_device("meta")


def test_sd3_presets():
    auto = policy.sd3_precision("auto", CPU)
    assert auto.vae == torch.float32 and auto.transformer == policy.auto_dtype(CPU)
    fp32 = policy.sd3_precision("fp32", CPU)
    assert {fp32.transformer, fp32.vae, fp32.text, fp32.t5} == {torch.float32}
    fp16 = policy.sd3_precision("fp16", CPU)
    # T5 overflows in fp16
    assert fp16.transformer == fp16.vae == fp16.text == torch.float16 and fp16.t5 == torch.bfloat16
    with pytest.raises(ValueError, match="preset"):
        policy.sd3_precision("turbo", CPU)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_cli_and_node_build_the_same_embedded_backbone(tmp_path, monkeypatch, precision):
    monkeypatch.setenv("COZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COZ_MODELS_DIR", str(tmp_path / "models"))
    args = argparse.Namespace(sd3=None, backbone="animevideov3", precision=precision)
    from_cli = cli.build_backbone(args, CPU)
    (from_node,) = LoadRealESRGAN().load("animevideov3", precision, policy.TILE)
    from_node = from_node.inner
    for attribute in ("dtype", "tile", "overlap", "scale", "name", "channels_last"):
        assert getattr(from_cli, attribute) == getattr(from_node, attribute), attribute
    assert from_cli.dtype == policy.resolve_dtype(precision, CPU)
    assert from_cli.tile == policy.TILE and from_cli.overlap == policy.TILE_OVERLAP
    x = torch.rand(1, 3, 24, 24)
    assert torch.equal(from_cli.upscale(x), from_node.upscale(x))


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="neither an embedded model"):
        factory.upscale_backbone("no_such_model", CPU)


def test_the_node_prompt_step_hands_the_user_prompt_to_the_source():
    from coz_pack.nodes.steps import VLMPrompt

    seen = []

    def source(request):
        seen.append(request.user_prompt)
        return ["a cat"]

    image = torch.rand(1, 16, 16, 3)
    (text,) = VLMPrompt().describe(source, image, image, True, "film grain")
    assert seen == ["film grain"] and text == "a cat, film grain,"
    assert host.pick_dtype("auto", CPU) == policy.auto_dtype(CPU)
