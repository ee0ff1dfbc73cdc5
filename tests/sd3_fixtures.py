"""Tiny SD3-medium-shaped models saved in the real file layouts, and CoZ weight files in upstream formats.

- a diffusers folder (``save_pretrained`` of every component, tokenizers, scheduler, model_index);
- Stability's original single-file layout (``model.diffusion_model.joint_blocks...``,
  ``first_stage_model.encoder.down.0.block.0...``, ``text_encoders.clip_l.transformer...``),
  written by inverting diffusers' converters (checked by converting back);
- CoZ's ``model_20001.pkl`` (torch-saved list [up, down, ...] in ``modules()`` order, float16) and
  ``vae_encoder_20001.pt`` (``vae.encoder.state_dict()`` after PEFT injected adapter
  ``default_encoder``, r=4, default alpha), written with torch and peft as upstream did.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers,
)
from peft import LoraConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from coz_core.sr.sd3_loading import SD3Precision

TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                   pooled_projection_dim=24, out_channels=4, pos_embed_max_size=16)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
           norm_num_groups=4, latent_channels=4, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
CLIP_VOCAB = 514  # 256 byte symbols, the same with </w>, then <|startoftext|>, <|endoftext|>


def clip_config(hidden: int, layers: int, act: str) -> CLIPTextConfig:
    # eos_token_id 2 as in the real SD3 configs (legacy: pooled at the argmax token, <|endoftext|>)
    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=2, projection_dim=hidden,
                          max_position_embeddings=77, hidden_act=act, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


T5 = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=8, relative_attention_max_distance=16, tie_word_embeddings=False,
              dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _randomize(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.2) -> None:
    """Random weights with visible effect everywhere (including the zero-initialised ones)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = {
        "transformer": SD3Transformer2DModel(**TRANSFORMER),
        "vae": AutoencoderKL(**VAE),
        "clip_l": CLIPTextModelWithProjection(clip_config(8, 2, "quick_gelu")),
        "clip_g": CLIPTextModelWithProjection(clip_config(16, 2, "gelu")),
        "t5": T5EncoderModel(T5),
    }
    for name, m in parts.items():
        _randomize(m, gen, 0.05 if name == "vae" else 0.2)
        m.eval()
    with torch.no_grad():  # SD3's CLIP-L projection is the identity (its single files carry none)
        parts["clip_l"].text_projection.weight.copy_(torch.eye(8))
    return parts


# --- tokenizers ----------------------------------------------------------------------------------

def save_clip_tokenizer(folder: Path, pad: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())  # "!" first, as in the real CLIP vocabulary
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, model_max_length=77).save_pretrained(str(folder))


def save_t5_tokenizer(folder: Path) -> None:
    words = ["<pad>", "</s>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["a", "cat", "dog", "zoom"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(str(folder))


# --- layouts -------------------------------------------------------------------------------------

def save_diffusers_folder(parts: dict[str, torch.nn.Module], folder: Path) -> Path:
    parts["transformer"].save_pretrained(folder / "transformer")
    parts["vae"].save_pretrained(folder / "vae")
    for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        parts[name].save_pretrained(folder / sub)
    save_clip_tokenizer(folder / "tokenizer", "<|endoftext|>")
    save_clip_tokenizer(folder / "tokenizer_2", "!")
    save_t5_tokenizer(folder / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def transformer_to_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> Stability's original MMDiT keys (inverse of diffusers' converter)."""
    o = {"pos_embed": sd["pos_embed.pos_embed"]}
    simple = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
              "proj_out": "final_layer.linear"}
    for new, old in simple.items():
        for p in ("weight", "bias"):
            o[f"{old}.{p}"] = sd[f"{new}.{p}"]
    for p in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        b, j, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == num_layers - 1
        for p in ("weight", "bias"):
            o[f"{j}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.to_{x}.{p}"] for x in "qkv"])
            o[f"{j}.context_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            o[f"{j}.x_block.attn.proj.{p}"] = sd[f"{b}.attn.to_out.0.{p}"]
            o[f"{j}.x_block.adaLN_modulation.1.{p}"] = sd[f"{b}.norm1.linear.{p}"]
            ctx = sd[f"{b}.norm1_context.linear.{p}"]
            o[f"{j}.context_block.adaLN_modulation.1.{p}"] = _swap_halves(ctx) if last else ctx
            o[f"{j}.x_block.mlp.fc1.{p}"] = sd[f"{b}.ff.net.0.proj.{p}"]
            o[f"{j}.x_block.mlp.fc2.{p}"] = sd[f"{b}.ff.net.2.{p}"]
            if not last:
                o[f"{j}.context_block.attn.proj.{p}"] = sd[f"{b}.attn.to_add_out.{p}"]
                o[f"{j}.context_block.mlp.fc1.{p}"] = sd[f"{b}.ff_context.net.0.proj.{p}"]
                o[f"{j}.context_block.mlp.fc2.{p}"] = sd[f"{b}.ff_context.net.2.{p}"]
    return o


def _vae_key_to_ldm(key: str, n_up: int) -> str:
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    parts = k.split(".")
    if parts[1] == "down_blocks":
        i = parts[2]
        rest = ".".join(parts[3:])
        rest = rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
        return f"{parts[0]}.down.{i}.{rest}"
    if parts[1] == "up_blocks":
        i = n_up - 1 - int(parts[2])
        rest = ".".join(parts[3:]).replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
        return f"{parts[0]}.up.{i}.{rest}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        rest = ".".join(parts[4:])
        rest = {"group_norm.weight": "norm.weight", "group_norm.bias": "norm.bias", "to_q.weight": "q.weight",
                "to_q.bias": "q.bias", "to_k.weight": "k.weight", "to_k.bias": "k.bias", "to_v.weight": "v.weight",
                "to_v.bias": "v.bias", "to_out.0.weight": "proj_out.weight", "to_out.0.bias": "proj_out.bias"}[rest]
        return f"{parts[0]}.mid.attn_1.{rest}"
    return k


def vae_to_ldm(sd: dict[str, torch.Tensor], n_up: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM keys (attention projections as 1x1 convs, as in the originals)."""
    out = {}
    for key, value in sd.items():
        new = _vae_key_to_ldm(key, n_up)
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def save_single_file(parts: dict[str, torch.nn.Module], path: Path, text: tuple[str, ...] = (),
                     t5_dtype: torch.dtype | None = None) -> Path:
    t_sd = {k: v.clone() for k, v in parts["transformer"].state_dict().items()}
    original = transformer_to_original(t_sd, TRANSFORMER["num_layers"])
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(t_sd) and all(torch.equal(back[k], t_sd[k]) for k in t_sd), "transformer inversion"
    v_sd = parts["vae"].state_dict()
    ldm = vae_to_ldm(v_sd, len(VAE["up_block_types"]))
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, VAE)
    assert set(back) == set(v_sd) and all(torch.equal(back[k], v_sd[k]) for k in v_sd), "VAE inversion"
    out = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    out.update({f"first_stage_model.{k}": v for k, v in ldm.items()})
    prefixes = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                "t5": "text_encoders.t5xxl.transformer."}
    for name in text:
        sd = parts[name].state_dict()
        if name == "clip_l":
            sd.pop("text_projection.weight")
        if name == "t5":
            sd.pop("encoder.embed_tokens.weight", None)
            sd = {k: v.to(t5_dtype) if t5_dtype and v.ndim == 2 and "shared" not in k and "relative" not in k else v
                  for k, v in sd.items()}
        out.update({prefixes[name] + k: v for k, v in sd.items()})
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def save_text_encoder_file(model: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("embed_tokens.weight")}
    save_file(sd, str(path))
    return path


# --- CoZ weights ------------------------------------------------------------------------------------

def adaln_linears(transformer: torch.nn.Module) -> list[torch.nn.Linear]:
    """Upstream's search: Linears under modules whose class name is AdaLayerNormZero, modules() order."""
    found = []
    for module in transformer.modules():
        if module.__class__.__name__ == "AdaLayerNormZero":
            found += [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return found


def make_lora_list(transformer: torch.nn.Module, seed: int = 1, rank: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for linear in adaln_linears(transformer):
        tensors.append((0.3 * torch.randn(linear.out_features, rank, generator=gen)).half())
        tensors.append((0.3 * torch.randn(rank, linear.in_features, generator=gen)).half())
    return tensors


def vae_lora_targets(vae: torch.nn.Module) -> list[str]:
    patterns = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    targets = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name or "encoder" not in name:
            continue
        if any(p in name for p in patterns):
            targets.append(name.replace(".weight", ""))
    return sorted(set(targets))


def make_peft_vae(vae: AutoencoderKL, seed: int = 2) -> AutoencoderKL:
    """Inject CoZ's encoder LoRA with peft (through diffusers' add_adapter) and give it random weights."""
    vae.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=vae_lora_targets(vae)),
                    adapter_name="default_encoder")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return vae


# every component in float32: the tests' reference precision
FP32 = SD3Precision(transformer=torch.float32, vae=torch.float32, text=torch.float32, t5=torch.float32)


@dataclass
class TinySD3:
    root: Path
    parts: dict[str, torch.nn.Module]
    folder: Path  # diffusers layout
    single: Path  # transformer + VAE only (sd3_medium.safetensors)
    single_clips: Path  # + CLIP-L/G (sd3_medium_incl_clips)
    single_fp8: Path  # + CLIPs + T5 in float8 (sd3_medium_incl_clips_t5xxlfp8)
    clip_l: Path
    clip_g: Path
    t5: Path
    lora_pkl: Path
    vae_pt: Path
    peft_vae: AutoencoderKL  # the VAE with its LoRA unmerged (PEFT), float32
    lora_list: list[torch.Tensor]


def build_tiny_sd3(root: Path) -> TinySD3:
    parts = build_models()
    folder = save_diffusers_folder(parts, root / "sd3-diffusers")
    single = save_single_file(parts, root / "sd3_medium.safetensors")
    clips = save_single_file(parts, root / "sd3_medium_incl_clips.safetensors", ("clip_l", "clip_g"))
    fp8 = save_single_file(parts, root / "sd3_medium_incl_clips_t5xxlfp8.safetensors", ("clip_l", "clip_g", "t5"),
                           t5_dtype=torch.float8_e4m3fn)
    clip_l = save_text_encoder_file(parts["clip_l"], root / "clip_l.safetensors")
    clip_g = save_text_encoder_file(parts["clip_g"], root / "clip_g.safetensors")
    t5 = save_text_encoder_file(parts["t5"], root / "t5xxl_fp16.safetensors")
    lora = make_lora_list(parts["transformer"])
    lora_pkl = root / "model_20001.pkl"
    torch.save(lora, lora_pkl)
    peft_vae = AutoencoderKL(**VAE)
    peft_vae.load_state_dict(parts["vae"].state_dict())
    make_peft_vae(peft_vae)
    vae_pt = root / "vae_encoder_20001.pt"
    torch.save({k: v.half() for k, v in peft_vae.encoder.state_dict().items()}, vae_pt)
    # the reference loads the float16 file into the float32 PEFT model: do the same
    peft_vae.encoder.load_state_dict(torch.load(vae_pt, weights_only=True))
    return TinySD3(root, parts, folder, single, clips, fp8, clip_l, clip_g, t5, lora_pkl, vae_pt, peft_vae.eval(), lora)


_BUILT: dict[Path, TinySD3] = {}


def shared_tiny_sd3(tmp_path_factory) -> TinySD3:
    """One tiny SD3 per test session (its files are only read by the tests)."""
    base = Path(tmp_path_factory.getbasetemp())
    if base not in _BUILT:
        _BUILT[base] = build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))
    return _BUILT[base]
