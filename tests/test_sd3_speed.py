"""SD3 speed and memory switches: per-row scaled fp8 storage, the bf16 VAE, compilation, presets.

References: float32 ``F.linear`` for the fp8 storage, the float32 backbone for the bf16 VAE and
the uncompiled backbone for compilation (torch.compile's "eager" backend on CPU: the same graph
capture of diffusers' and transformers' modules, without inductor's compile time).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from coz_core import policy
from coz_core.policy import AUTO_MEMORY_TIERS, SD3_SPEED_PRESETS, sd3_precision, sd3_setup
from coz_core.sr.base import SRRequest
from coz_core.sr.coz_sd3 import CoZSD3Backbone
from coz_core.sr.sd3_loading import FP8, SD3Precision, UpcastLinear, store_linears
from tests.sd3_fixtures import FP32

PROMPT = ["a cat"]


def _image(size: int = 32) -> torch.Tensor:
    base = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def test_scaled_fp8_rows_keep_small_weights():
    torch.manual_seed(0)
    # rows of very different magnitude, as in SD3's adaLN and attention projections
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 0, 32)[:, None])
    x = torch.randn(8, 64)
    exact = torch.nn.functional.linear(x, linear.weight, linear.bias)
    plain, scaled = (store_linears(torch.nn.Sequential(_copy(linear)), FP8, scaled=s) for s in (False, True))
    assert type(scaled[0]).__name__ == "ScaledUpcastLinear" and isinstance(scaled[0], UpcastLinear)
    assert scaled[0].weight is None and scaled[0].stored_weight.dtype == FP8
    rel = lambda y: ((y - exact).norm(dim=0) / exact.norm(dim=0))  # noqa: E731  per output channel
    with torch.no_grad():
        e_plain, e_scaled = rel(plain(x)), rel(scaled(x))
    assert e_scaled.max() < 0.08  # e4m3's 3 mantissa bits, on every row
    assert e_plain[:8].mean() > 5 * e_scaled[:8].mean()  # unscaled flushes the small rows


def _copy(linear: torch.nn.Linear) -> torch.nn.Linear:
    out = torch.nn.Linear(linear.in_features, linear.out_features)
    out.load_state_dict(linear.state_dict())
    return out


def test_bf16_vae_difference_is_small(tiny, backbone):
    """The ``fast`` preset's bf16 VAE against float32 (everything else float32): measured here on the
    tiny model, at full size in benchmarks/bench_gpu.py."""
    bf16_vae = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, latent_mode="mean",
                                         precision=SD3Precision(torch.float32, torch.bfloat16, torch.float32,
                                                                torch.float32))
    x = _image()
    ref = backbone(SRRequest(x, x, PROMPT))
    out = bf16_vae(SRRequest(x, x, PROMPT))
    diff = (out - ref).abs()
    assert out.dtype == torch.float32 and 0 < diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_compiled_backbone_gives_the_same_step(tiny, backbone, caplog):
    compiled = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean")
    with caplog.at_level(logging.INFO, logger="coz_core"):
        compiled.enable_compile(backend="eager")
    # the wait is announced
    assert [r.getMessage() for r in caplog.records if "compiled on first use" in r.getMessage()]
    assert compiled.compiled and not backbone.compiled
    x = _image()
    torch.testing.assert_close(compiled(SRRequest(x, x, PROMPT)), backbone(SRRequest(x, x, PROMPT)),
                               rtol=1e-5, atol=1e-5)
    # same modules and weights: what offloading moves and what loaders fill
    assert compiled.modules()[0] is compiled.transformer and len(compiled.modules()) == 5


def test_transformer_fp8_is_scaled_and_runs_close(tiny, backbone):
    fp8 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, latent_mode="mean", transformer_fp8=True,
                                    precision=FP32)
    assert type(fp8.transformer.transformer_blocks[0].attn.to_q).__name__ == "ScaledUpcastLinear"
    x = _image()
    diff = (fp8(SRRequest(x, x, PROMPT)) - backbone(SRRequest(x, x, PROMPT))).abs().mean()
    assert diff < 0.02, diff


@pytest.mark.parametrize("device, triton", [("cpu", True), ("cuda", True), ("cuda", False)])
def test_speed_presets(device, triton, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no GPU here
    monkeypatch.setattr(policy, "compiles", lambda d, fp8=False: d.type == "cuda" and triton)
    dev = torch.device(device)
    auto = sd3_setup("auto", dev)
    assert not auto.compile and not auto.transformer_fp8 and auto.precision.vae == torch.float32
    for preset in SD3_SPEED_PRESETS:
        setup = sd3_setup(preset, dev)
        assert setup.precision.transformer == auto.precision.transformer
        assert setup.compile == (device == "cuda" and triton and preset != "lowvram")
        assert bool(setup.not_compiled) == (device == "cuda" and not triton and preset != "lowvram")  # said why
        assert setup.transformer_fp8 == (preset != "fast") and setup.take_turns == (preset == "lowvram")
        assert setup.text_fp8 == setup.transformer_fp8 and setup.precision.t5_fp8 == (preset != "fast" or None)
    if device == "cuda":
        assert sd3_setup("fast", dev).precision.vae == torch.bfloat16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a Turing GPU: fp16
        old = sd3_setup("fast", dev)
        assert old.precision.transformer == torch.float16 and old.precision.vae == torch.float32


def test_apple_gpus_get_no_float8():
    mps = torch.device("mps")
    assert all(sd3_precision(preset, mps).t5_fp8 is False for preset in ("auto", "reference", "fp16", "bf16", "fp32"))
    assert sd3_precision("auto", torch.device("cpu")).t5_fp8 is None  # elsewhere: as the file stores T5
    fast = sd3_setup("fast", mps)
    assert not fast.transformer_fp8 and fast.precision.t5_fp8 is False and not fast.compile and not fast.not_compiled
    for preset in ("compact", "lowvram"):
        with pytest.raises(ValueError, match="float8.*MPS.*auto or fast"):
            sd3_setup(preset, mps)


def test_compiling_needs_triton_and_for_float8_an_ada_gpu(monkeypatch):
    import torch.utils._triton as triton_check

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not policy.compiles(cpu) and policy.compile_backend("inductor", cpu) == "inductor"  # CPU callers choose
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here
    # (Triton usable, compute capability) -> (compiles, compiles float8 upcasts); e.g. Windows without
    # triton-windows, an RTX 3090, an RTX 4090, an H100
    for triton, capability, plain, fp8 in [(False, (9, 0), False, False), (True, (8, 6), True, False),
                                           (True, (8, 9), True, True), (True, (9, 0), True, True)]:
        monkeypatch.setattr(triton_check, "has_triton", lambda: triton)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert (policy.compiles(cuda), policy.compiles(cuda, fp8=True)) == (plain, fp8)
        assert policy.compile_backend("inductor", cuda) == ("inductor" if plain else "eager")
        assert policy.compile_backend("eager", cuda) == "eager" and policy.compile_backend(None, cuda) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own inductor imports
def test_float8_models_stay_uncompiled_where_inductor_cannot_compile_them(tiny, monkeypatch, caplog):
    fp8 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean",
                                    transformer_fp8=True)
    monkeypatch.setattr(CoZSD3Backbone, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(policy, "compiles", lambda device, fp8=False: not fp8)  # e.g. an RTX 3090
    with caplog.at_level(logging.INFO, logger="coz_core"):
        fp8.enable_compile()  # inductor, compiled lazily: nothing runs here

    def compiled(model):
        return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())

    assert not compiled(fp8.transformer) and compiled(fp8.vae.decoder) and compiled(fp8.text_encoder.models["clip_l"])
    assert "SD3Transformer2DModel not compiled" in caplog.text
    monkeypatch.setattr(policy, "compiles", lambda device, fp8=False: True)  # e.g. an RTX 4090
    again = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean",
                                      transformer_fp8=True)
    assert compiled(again.enable_compile().transformer)


def test_auto_on_a_gpu_fits_every_model_into_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no GPU here
    cuda = torch.device("cuda")
    plain = sd3_setup("auto", cuda, memory_gib=80)
    assert plain.precision == sd3_precision("auto", cuda) and not plain.transformer_fp8
    assert plain.precision.vae == torch.float32 and plain.precision.t5_fp8 is None and plain.chosen.startswith("auto ")
    card24 = sd3_setup("auto", cuda, memory_gib=24)
    assert card24.precision.t5_fp8 is True and not card24.transformer_fp8 and card24.chosen == "auto+t5fp8 (24 GiB GPU)"
    card16 = sd3_setup("auto", cuda, memory_gib=16)
    assert card16 == replace(sd3_setup("compact", cuda), chosen=card16.chosen)
    assert card16.chosen == "compact (16 GiB GPU)" and card16.transformer_fp8 and card16.text_fp8
    card12 = sd3_setup("auto", cuda, memory_gib=12)
    assert card12.take_turns and card12.chosen.startswith("lowvram")
    # every tier is reachable, in falling order; the CPU and explicit presets ignore the memory
    assert [f for f, _ in AUTO_MEMORY_TIERS] == sorted((f for f, _ in AUTO_MEMORY_TIERS), reverse=True)
    assert sd3_setup("auto", torch.device("cpu"), memory_gib=4) == sd3_setup("auto", torch.device("cpu"))
    assert sd3_setup("fast", cuda, memory_gib=4) == sd3_setup("fast", cuda)
    if not torch.cuda.is_available():
        assert sd3_setup("auto", cuda).chosen == ""  # no GPU to ask: the plain auto precision


class _Spy(torch.nn.Linear):
    """A module that records where it was sent (the machine has no accelerator to send it to)."""

    def __init__(self, log: list, name: str) -> None:
        super().__init__(2, 2)
        self.log, self.tag = log, name

    def to(self, *args, **kwargs):
        self.log.append((self.tag, str(args[0])))
        return super().to(*args, **kwargs)


def test_take_turns_moves_one_group_at_a_time(backbone):
    from coz_core.prompt.base import FixedPrompts
    from coz_core.residency import Turns, take_turns
    from coz_core.zoom import ChainConfig, run_chain

    log: list = []
    turns = Turns("cpu", {"sr": [_Spy(log, "sr")], "prompt": [_Spy(log, "vlm")]})
    turns.activate("prompt")
    turns.activate("prompt")  # already there: nothing moves
    turns.activate("sr")
    assert log == [("sr", "cpu"), ("vlm", "cpu"), ("vlm", "cpu"), ("sr", "cpu")]

    source = FixedPrompts("a cat")
    released: list = []  # what take_turns moves by default, and what drops its caches as it leaves
    source.vlm = type("VLM", (), {"model": torch.nn.Linear(2, 2), "release": lambda self: released.append(1)})()
    turned, wrapped = take_turns(backbone, source, "cpu")
    assert turned.device == torch.device("cpu") and turned.uses_prompt and turned.size_multiple == 16
    assert turned.turns.groups["sr"] == backbone.modules() and turned.turns.groups["prompt"] == [source.vlm.model]
    x = _image(64)
    config = ChainConfig(steps=2, size=(32, 32), color="none")
    ours = run_chain(x, turned, config, wrapped)
    torch.testing.assert_close(ours.final, run_chain(x, backbone, config, FixedPrompts("a cat")).final)
    assert turned.turns.active == "sr" and len(released) == 2  # the prompt group left once per step
    with pytest.raises(TypeError, match="source_modules"):
        take_turns(backbone, FixedPrompts(""), "cpu")


def test_text_fp8_stores_clip_linears_scaled_and_encodes_close(tiny, backbone):
    fp8 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, latent_mode="mean", text_fp8=True,
                                    precision=FP32)
    models = fp8.text_encoder.models
    for name in ("clip_l", "clip_g"):
        linears = [m for m in models[name].modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m).__name__ == "ScaledUpcastLinear" for m in linears)
    assert not any(type(m).__name__ == "ScaledUpcastLinear" for m in models["t5"].modules())  # T5: its own switch
    ours, ref = fp8.text_encoder(PROMPT), backbone.text_encoder(PROMPT)
    for a, b in ((ours.prompt_embeds, ref.prompt_embeds), (ours.pooled, ref.pooled)):
        rel = (a - b).norm() / b.norm()
        assert 0 < rel < 0.08, rel  # changed, by about e4m3's precision


def test_a_preset_that_cannot_compile_here_says_so(tiny, monkeypatch, caplog):
    from coz_core import factory

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no GPU here
    monkeypatch.setattr(policy, "compiles", lambda device, fp8=False: False)  # e.g. Windows without triton-windows
    with caplog.at_level(logging.INFO, logger="coz_core"):
        backbone = factory.sd3_backbone(tiny.folder, tiny.lora_pkl, tiny.vae_pt, torch.device("cuda"), "fast",
                                        latent_mode="mean", load_device=torch.device("cpu"))
    assert not backbone.compiled
    assert ("SD3 fast: torch.compile cannot generate code for this GPU" in caplog.text
            and "triton-windows" in caplog.text)
    monkeypatch.setattr(policy, "device_memory_gib", lambda device: 16.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="coz_core"):  # auto's choice for the card is said where it is made
        factory.sd3_backbone(tiny.folder, tiny.lora_pkl, tiny.vae_pt, torch.device("cuda"), "auto",
                             latent_mode="mean", load_device=torch.device("cpu"))
    assert "SD3 precision auto on this GPU: compact (16 GiB GPU)" in caplog.text
