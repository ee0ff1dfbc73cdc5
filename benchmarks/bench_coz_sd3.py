"""Benchmark of CoZ's one-step SD3 SR model at full SD3-medium size, with random weights.

Compute and memory do not depend on weight values, so no download is needed. Components are
built one at a time (full width; the transformer and T5 with a few of their identical blocks
unless --full) and freed, keeping RAM modest. Reported per component and process size:
- time of one call on this machine (CPU: small sizes; a CUDA GPU: the sizes asked, e.g. 512);
- activation peak: the largest total size of live intermediate tensors during the call,
  tracked tensor by tensor (on CUDA: torch.cuda.max_memory_allocated minus the weights).
Blocks of a transformer run one after another, so its activation peak does not grow with
depth; its time grows linearly, and full-depth times are scaled from 2 blocks.

Then the accelerator memory budget of one CoZ step with all models resident is estimated:
weights (exact parameter counts x bytes of each precision) + the largest activation peak of
the step's stages (they run in sequence) + 1 GiB for the CUDA context, allocator slack and
workspaces. It is an estimate unless measured on a GPU with --full.

    python benchmarks/bench_coz_sd3.py                 # CPU: sizes 128 and 256
    python benchmarks/bench_coz_sd3.py --sizes 512 --full   # on a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's coz_core
from coz_core.sr.sd3_loading import CONFIG_DIR, FP8, _meta_model, read_config, store_linears

GIB = 1024**3


class LivePeak(TorchDispatchMode):
    """Peak bytes of tensors produced inside the block and still alive (storage-level, views shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, python refs]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def build(component: str, dtype: torch.dtype, device: str, depth: int | None = None,
          fp8: bool = False) -> torch.nn.Module:
    """A full-width component with random weights (``depth`` blocks for transformer/T5 when given)."""
    cfg = read_config(component)
    if depth is not None:
        cfg = dict(cfg, **({"num_layers": depth}))
    model = _meta_model(component, cfg).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            elif b.is_floating_point():
                b.normal_(0, 0.02)
    model = model.to(dtype).eval().requires_grad_(False)
    if component == "t5":
        model.encoder.embed_tokens = model.shared
    return store_linears(model, FP8) if fp8 else model


def params_of(component: str) -> dict[str, int]:
    model = _meta_model(component, read_config(component))
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear)
    return {"total": total, "linear": linear}


def measure(fn, device: str, warmup: bool = True, repeats: int = 1) -> tuple[float, int]:
    """(seconds: best of ``repeats`` calls, activation peak bytes) of ``fn()``, after a warm-up if asked."""
    with torch.no_grad():
        if warmup:
            fn()
        times = []
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            return min(times), torch.cuda.max_memory_allocated() - base
        for _ in range(repeats - 1):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        with LivePeak() as tracker:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times), tracker.peak


def bench_transformer(size: int, dtype, device, depth: int | None, fp8: bool = False) -> tuple[float, int]:
    """Full-depth time (scaled from ``depth`` blocks unless depth is None = full) and activation peak."""
    model = build("transformer", dtype, device, depth=depth, fp8=fp8)
    z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    seq = torch.randn(1, 589, 4096, device=device, dtype=dtype)
    pooled = torch.randn(1, 2048, device=device, dtype=dtype)
    t = torch.full((1,), 1000.0, device=device, dtype=dtype)
    # F821 is silenced below: a ruff false positive for a closure over a name deleted afterwards
    # (astral-sh/ruff#9858); the lambdas here and below run inside measure(), before the del
    seconds, peak = measure(lambda: model(hidden_states=z, timestep=t, encoder_hidden_states=seq,  # noqa: F821
                                          pooled_projections=pooled, return_dict=False), device, repeats=3)
    del model
    gc.collect()
    # the embeddings cost well under 2% of a block, so time scales with the block count
    return (seconds * read_config("transformer")["num_layers"] / (depth or read_config("transformer")["num_layers"]),
            peak)


def bench_vae(size: int, dtype, device) -> tuple[float, int]:
    vae = build("vae", dtype, device)
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
    z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    slow = device != "cuda"  # full-resolution convolutions on CPU: skip the warm-up call
    enc = measure(lambda: vae.encode(x).latent_dist.mean, device, warmup=not slow)  # noqa: F821 (see above)
    dec = measure(lambda: vae.decode(z, return_dict=False)[0], device, warmup=not slow)  # noqa: F821
    del vae
    return enc[0] + dec[0], max(enc[1], dec[1])


def bench_text(component: str, dtype, device, depth: int | None, fp8: bool = False) -> tuple[float, int]:
    layers_key = "num_layers" if component == "t5" else "num_hidden_layers"
    full = read_config(component)[layers_key]
    if component == "t5":
        ids = torch.randint(0, 32000, (1, 512), device=device)
        model = build(component, dtype, device, depth=depth, fp8=fp8)
        s, p = measure(lambda: model(ids), device, repeats=2)  # noqa: F821 (see bench_transformer)
        s = s * full / (depth or full)
    else:
        ids = torch.randint(0, 49000, (1, 77), device=device)
        model = build(component, dtype, device)
        s, p = measure(lambda: model(ids, output_hidden_states=True), device, repeats=2)  # noqa: F821
    del model
    return s, p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="process sizes (default: 128 256 on CPU, 512 on CUDA)")
    parser.add_argument("--full", action="store_true", help="full-depth transformer and T5 (needs ~5 GB / ~10 GB)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    device = args.device
    sizes = args.sizes or ([512] if device == "cuda" else [128, 256])
    depth = None if args.full else 2
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    params = {c: params_of(c) for c in ("transformer", "vae", "clip_l", "clip_g", "t5")}
    print(f"Parameters (exact, from the shipped configs in {CONFIG_DIR}):")
    for c, p in params.items():
        print(f"  {c:12s} {p['total'] / 1e6:9.1f} M   (linear weights {p['linear'] / 1e6:9.1f} M)")

    rows, results = [], {"device": device, "params": params, "measurements": []}
    half = torch.bfloat16  # CPU has no fast float16 kernels; on GPUs fp16 and bf16 cost the same
    cuda = device == "cuda"
    # the transformer's activations are dominated by its 589 text tokens at small sizes, so it is
    # always measured at 512 too (cheap at reduced depth); the VAE's grow with the pixel count
    for size in sorted(set(sizes) | {512}):
        rows.append((size, "transformer bf16", *bench_transformer(size, half, device, depth)))
        if cuda:
            rows.append((size, "transformer fp8-stored", *bench_transformer(size, half, device, depth, fp8=True)))
        gc.collect()
    for size in sizes:
        rows.append((size, "VAE fp32 (enc+dec)", *bench_vae(size, torch.float32, device)))
        if cuda:  # bf16 convolutions are very slow on CPU; their activations are half the fp32 ones
            rows.append((size, "VAE bf16 (enc+dec)", *bench_vae(size, half, device)))
        gc.collect()
    for label, fn in (
        ("CLIP-L bf16", lambda: bench_text("clip_l", half, device, None)),
        ("CLIP-G bf16", lambda: bench_text("clip_g", half, device, None)),
        ("T5-XXL bf16", lambda: bench_text("t5", half, device, depth)),
    ) + ((("T5-XXL fp8-stored", lambda: bench_text("t5", half, device, depth, fp8=True)),) if cuda else ()):
        rows.append((0, label, *fn()))
        gc.collect()

    print(f"\nPer call on {device} "
          f"({'full depth' if args.full else 'full width; transformer/T5 time scaled from 2 blocks'}):")
    print(f"  {'size':>5s}  {'component':24s} {'seconds':>9s} {'activation peak':>16s}")
    for size, label, s, peak in rows:
        print(f"  {size or '-':>5}  {label:24s} {s:9.2f} {peak / GIB:13.3f} GiB")
        results["measurements"].append({"size": size, "component": label, "seconds": s, "activation_peak_bytes": peak})

    # --- the budget of one step at 512 with every model resident --------------------------------
    def weights(c: str, bytes_per: float, fp8_linears: bool = False) -> float:
        p = params[c]
        return (p["linear"] * 1 + (p["total"] - p["linear"]) * bytes_per) if fp8_linears else p["total"] * bytes_per

    top = max(sizes)
    scale = (512 / top) ** 2  # VAE activations grow with the pixel count
    act_t = max(r[3] for r in rows if r[0] == 512 and r[1].startswith("transformer"))
    act_v32 = max(r[3] for r in rows if r[0] == top and r[1].startswith("VAE fp32")) * scale
    bf16_vae = [r[3] for r in rows if r[0] == top and r[1].startswith("VAE bf16")]
    act_v16 = (bf16_vae[0] if bf16_vae else act_v32 / scale / 2) * scale
    act_text = max(r[3] for r in rows if r[0] == 0)
    overhead = 1.0 * GIB
    configs = [
        ("reference: fp32 transformer + fp32 VAE, fp16 text (T5 fp16)", weights("transformer", 4) + weights("vae", 4)
         + weights("clip_l", 2) + weights("clip_g", 2) + weights("t5", 2), act_v32),
        ("bf16 transformer, fp32 VAE, fp16 CLIPs, T5 fp8", weights("transformer", 2) + weights("vae", 4)
         + weights("clip_l", 2) + weights("clip_g", 2) + weights("t5", 2, True), act_v32),
        ("bf16 transformer, bf16 VAE, fp16 CLIPs, T5 fp8", weights("transformer", 2) + weights("vae", 2)
         + weights("clip_l", 2) + weights("clip_g", 2) + weights("t5", 2, True), act_v16),
        ("bf16 transformer, bf16 VAE, fp16 CLIPs, T5 off", weights("transformer", 2) + weights("vae", 2)
         + weights("clip_l", 2) + weights("clip_g", 2), act_v16),
        ("fp8 transformer, bf16 VAE, fp16 CLIPs, T5 fp8", weights("transformer", 2, True) + weights("vae", 2)
         + weights("clip_l", 2) + weights("clip_g", 2) + weights("t5", 2, True), act_v16),
        ("bf16 transformer + bf16 VAE only (precomputed text)", weights("transformer", 2) + weights("vae", 2), act_v16),
    ]
    note = "measured at 512" if top == 512 else f"VAE activations scaled from {top} px by (512/{top})^2"
    print(f"\nAccelerator memory of one CoZ step at 512 x 512, all models resident (ESTIMATE; {note}; "
          f"+1 GiB context/slack):")
    print(f"  {'configuration':55s} {'weights':>9s} {'act. peak':>10s} {'total':>9s}")
    results["budget_512"] = []
    for label, w, act_vae in configs:
        act = max(act_t, act_vae, act_text)
        total = w + act + overhead
        print(f"  {label:55s} {w / GIB:7.2f} G {act / GIB:8.2f} G {total / GIB:7.2f} G")
        results["budget_512"].append({"config": label, "weights_bytes": w, "activation_bytes": act,
                                      "total_bytes": total})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
