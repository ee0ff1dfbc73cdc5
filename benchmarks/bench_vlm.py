"""Qwen2.5-VL-3B as CoZ's prompt extractor: per-step latency, tokens/s and memory.

The model has the published Qwen2.5-VL-3B-Instruct architecture with random weights (nothing to
download); the tokenizer is the tests' small byte-level one with Qwen's special tokens, the
vocabulary (embedding and output head) keeps the full 151,936 rows. One step is what the chain
asks of the prompt source: a multi-scale chat with two 512x512 images (resized to 504x504, 324
tokens each) through ``QwenPromptSource``. Random weights never stop early: every step generates
exactly the requested number of tokens (the reference's worst case is 128).

On a CPU the full model is not built: the script builds the same architecture with a fraction
``s`` of its layers (text 36*s, vision 32*s with one full-attention block per eight, as in the
real model), times two fractions and extrapolates linearly to s = 1 (every layer costs the same;
embeddings, head, patch embedding and merger are the intercept). On CUDA it builds the whole model.

    python benchmarks/bench_vlm.py                        # CPU: s = 1/4 and 1/2, 8 new tokens, bf16
    python benchmarks/bench_vlm.py --device cuda          # GPU: full model, 128 new tokens, bf16 and fp16
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from qwen_fixtures import CHAT_TEMPLATE, PREPROCESSOR, build_tokenizer  # noqa: E402

from coz_core.prompt.attention import use_fast_vision_attention  # noqa: E402
from coz_core.prompt.base import PromptRequest  # noqa: E402
from coz_core.prompt.qwen import MULTISCALE_SYSTEM, QwenPromptSource, QwenVL  # noqa: E402
from coz_core.prompt.vision import prepare_images  # noqa: E402

# config.json of Qwen2.5-VL-3B-Instruct (architecture values; token ids are set from the tokenizer)
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl", "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
    "max_position_embeddings": 128000, "max_window_layers": 70, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_config(scale: float, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    values = {**QWEN25_VL_3B, "vision_config": dict(QWEN25_VL_3B["vision_config"])}
    values["num_hidden_layers"] = max(1, round(36 * scale))
    depth = max(1, round(32 * scale))
    values["vision_config"]["depth"] = depth
    values["vision_config"]["fullatt_block_indexes"] = [i for i in (7, 15, 23, 31) if i < depth]
    values.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  vision_token_id=ids["<|vision_pad|>"], bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"])
    return Qwen2_5_VLConfig(**values)


def count_parameters(config) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())


def build_vlm(scale: float, dtype: torch.dtype, device: str, tokenizer, ids) -> QwenVL:
    return vlm_from_config(make_config(scale, ids), dtype, device, tokenizer, ids)


def vlm_from_config(config, dtype: torch.dtype, device: str, tokenizer, ids) -> QwenVL:
    """A QwenVL with random weights built directly on ``device`` (benchmarks/bench_gpu.py uses it too)."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen2VLImageProcessorPil as ImageProcessor

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    use_fast_vision_attention(model)  # as load_qwen_vl does
    # random weights never say <|im_end|> on purpose; without an end token every step runs to the limit
    model.generation_config = GenerationConfig(pad_token_id=ids["<|endoftext|>"])
    settings = {k: v for k, v in PREPROCESSOR.items() if not k.endswith(("_type", "_class"))}
    return QwenVL(model, tokenizer, ImageProcessor(**settings), CHAT_TEMPLATE, Path("<random weights>"),
                  PREPROCESSOR["min_pixels"], PREPROCESSOR["max_pixels"], 1.05)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(vlm: QwenVL, device: str, new_tokens: int, size: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` timings of one prompt step: input preparation, first token, whole step."""
    generator = torch.Generator().manual_seed(0)
    previous, zoomed = (torch.rand(1, 3, size, size, generator=generator) for _ in range(2))
    request = PromptRequest(previous, zoomed, step=1)
    source = QwenPromptSource(vlm, max_new_tokens=new_tokens, clean=False)
    QwenPromptSource(vlm, max_new_tokens=2)(request)  # warm-up
    preps, firsts, steps = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        inputs = vlm.inputs(prepare_images(previous) + prepare_images(zoomed), MULTISCALE_SYSTEM)
        t1 = time.perf_counter()
        vlm.generate_ids(inputs, max_new_tokens=1)
        sync(device)
        t2 = time.perf_counter()
        source(request)
        sync(device)
        t3 = time.perf_counter()
        preps.append(t1 - t0)
        firsts.append(t2 - t1)
        steps.append(t3 - t2)
    prep, first, step = min(preps), min(firsts), min(steps)
    tokens = source.records[-1].new_tokens
    return {"prep": prep, "first": first, "step": step, "tokens": tokens,
            "tok_s": (tokens - 1) / max(step - prep - first, 1e-9),
            "prompt_len": int(inputs["input_ids"].shape[1])}


def print_row(dtype: str, r: dict) -> None:
    at_128 = r["prep"] + r["first"] + 127 / r["tok_s"]  # the reference's 128 new tokens
    label = f"{r['scale']:.2f}" + ("*" if r.get("projected") else " ")
    print(f"{dtype:5} {label:>5} {r['text']:>4} {r['vis']:>4} {r['params'] / 1e9:6.2f}B "
          f"{r['prompt_len']:>6} {r['prep']:7.3f} {r['first']:9.2f} {r['tok_s']:7.2f} "
          f"{r['step']:7.2f} {at_128:10.1f} {r['peak']:8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--scales", nargs="+", type=float, default=None,
                        help="fractions of the layers to build (default: 0.25 0.5 on CPU, 1 on CUDA)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    parser.add_argument("--size", type=int, default=512, help="side of the two square images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtypes = args.dtype or (["bf16", "fp16"] if cuda else ["bf16"])
    scales = args.scales or ([1.0] if cuda else [0.25, 0.5])
    new_tokens = args.new_tokens or (128 if cuda else 8)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        ids = build_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)

    device_name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"Qwen2.5-VL-3B architecture, random weights; {device_name}; torch {torch.__version__}")
    print(f"one step: 2 images {args.size}x{args.size}, {new_tokens} new tokens, best of {args.repeats}\n")
    header = (f"{'dtype':5} {'scale':>5} {'text':>4} {'vis':>4} {'params':>7} {'prompt':>6} {'prep s':>7} "
              f"{'1st tok s':>9} {'tok/s':>7} {'step s':>7} {'step@128 s':>10} {'peak GB':>8}")
    print(header)
    print("-" * len(header))
    for name in dtypes:
        dtype = DTYPES[name]
        rows = []
        for scale in scales:
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            vlm = build_vlm(scale, dtype, args.device, tokenizer, ids)
            params = sum(p.numel() for p in vlm.model.parameters())
            r = measure(vlm, args.device, new_tokens, args.size, args.repeats)
            peak = (torch.cuda.max_memory_allocated(args.device) if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
            cfg = vlm.model.config
            r.update(scale=scale, params=params, text=cfg.text_config.num_hidden_layers,
                     vis=cfg.vision_config.depth, peak=peak)
            rows.append(r)
            print_row(name, r)
            del vlm
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if len(rows) >= 2 and scales[-1] != 1.0:  # linear in the fraction of layers
            a, b = rows[-2], rows[-1]
            grow = lambda key: b[key] + (1.0 - b["scale"]) * (b[key] - a[key]) / (b["scale"] - a["scale"])  # noqa: E731
            per_token = grow("step") - grow("first") - b["prep"]
            print_row(name, {"scale": 1.0, "text": 36, "vis": 32, "params": count_parameters(make_config(1.0, ids)),
                             "prompt_len": b["prompt_len"], "prep": b["prep"], "first": grow("first"),
                             "step": grow("step"), "tokens": b["tokens"],
                             "tok_s": (b["tokens"] - 1) / per_token, "peak": float("nan"), "projected": True})
    full = count_parameters(make_config(1.0, ids))
    print("\n* extrapolated from the two rows above it (linear in the number of layers)")
    print("peak GB: CUDA max allocated; CPU: the process's peak resident memory so far")
    print(f"\nweights of the full model: {full / 1e9:.3f}B parameters = {full * 2 / 2**30:.2f} GiB in "
          f"bf16/fp16 ({full * 4 / 2**30:.2f} GiB in fp32)")
    kv = 2 * 36 * 2 * 128 * 2  # K and V, 36 layers, 2 KV heads of 128, 2 bytes
    print(f"KV cache: {kv / 1024:.0f} KiB per token in bf16/fp16 (a 2-image step, ~800 tokens: "
          f"{kv * 800 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
