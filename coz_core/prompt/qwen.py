"""Qwen2.5-VL as CoZ's prompt extractor: loading from a local folder, and the prompt source.

What the model sees follows the CoZ reference (``inference_coz.py``): a system message with the
reference's exact text and a user message holding only the image(s): the previous scale and the
zoomed input (multi-scale), or the zoomed input alone. Images pass through qwen-vl-utils' resize
rules (see ``vision.py``) and the Qwen image processor; the chat template comes from the model
folder. Generation is greedy with the folder's repetition penalty, which is what the reference's
call amounts to (it samples with the folder's generation_config.json, and Qwen2.5-VL-Instruct's
asks for temperature 1e-6 and repetition_penalty 1.05), capped at 32 new tokens as upstream's
current code (its first release: 128). Upstream's prompt types ``vlm`` (with the GRPO adapter
``ckpt/VLM_LoRA/checkpoint-10000`` merged in, see ``adapter.py``) and ``vlm_base`` (plain) are
the same source with and without ``adapter``.

The pieces are assembled by hand rather than with ``AutoProcessor``: in transformers 5 the
Qwen2.5-VL processor cannot be built without torchvision (its video processor needs it), and the
PIL image processor is the one the reference's processor used. Images are expanded into their
``<|image_pad|>`` tokens the way the Qwen processor does; the tests check the result against an
independent construction.

Fast decoding (on by default on CUDA, off elsewhere; ``QwenVL.fast_decode`` forces it): transformers'
own ``StaticCache`` (one per loaded model, reset for every call, its length rounded up to a
bucket). Greedy prompts then run through a decoding loop of our own (``greedy.py``: prefill, then
a one-token step compiled once per model with ``torch.compile`` and, on CUDA, captured with its
scoring and argmax as one CUDA graph, replayed for every token); sampling, and generation settings
that loop does not reproduce, go through ``generate`` with the same cache and its automatic
compilation of the decoding step (``CompileConfig``). Every chain step reuses one graph;
compilation and capture happen on the first call and are paid once per loaded model. Greedy
output is token-identical to plain ``generate`` (tests compare them on CPU with the static cache
forced; a CUDA test in float32). On GPUs the vision tower attends in one call per layer
(``attention.py``), the prefill reads nothing back from the GPU and is replayed as a CUDA graph
(``prefill.py``), the q/k/v and gate/up projections are fused (``fused.py``), and the images are
resized there, to Pillow's exact pixels (``pillow_resize.py``), and patchified (``vision.patchify``).
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..policy import NOT_COMPILED, VLM_TOKENS, compile_backend
from . import greedy, prefill
from .adapter import AdapterMerge, check_adapter_folder, merge_lora
from .attention import use_fast_vision_attention
from .base import PromptRequest
from .clean import CLIP_TOKENS, clean_prompt
from .fused import fuse_projections
from .vision import patchify, pixel_limits, prepare_batches

MULTISCALE_SYSTEM = (
    "The second image is a zoom-in of the first image. Based on this knowledge, what is in the "
    "second image? Give me a set of words."
)
SINGLE_SYSTEM = "What is in this image? Give me a set of words."
MAX_NEW_TOKENS = VLM_TOKENS
SizedImage = np.ndarray | torch.Tensor  # uint8 [h, w, 3], sized for the VLM (vision.prepare_batches)
CACHE_BUCKET = 256  # static KV cache lengths are rounded up to this (one compiled graph for all steps)
IMAGE_TOKEN = "<|image_pad|>"
log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def messages(system: str, images: int) -> list[dict]:
    """The reference's chat: the system text, then a user turn with ``images`` images and no text."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"} for _ in range(images)]},
    ]


@dataclass
class QwenVL:
    """A loaded Qwen2.5-VL: the model and the parts of its processor."""

    model: Any  # Qwen2_5_VLForConditionalGeneration (with the adapter merged in, if any)
    tokenizer: Any
    image_processor: Any
    chat_template: str
    folder: Path
    min_pixels: int
    max_pixels: int
    repetition_penalty: float  # from the folder's generation_config.json (1.0 when absent)
    adapter: Path | None = None
    adapter_merge: AdapterMerge | None = None  # what merging ``adapter`` changed
    # static KV cache + compiled decoding; None: policy.vlm_fast_decode (on for CUDA, off elsewhere)
    fast_decode: bool | None = None
    # torch.compile backend of the fast path ("eager": the capture without code generation, for
    # tests on CPU and GPUs inductor cannot compile for; None: the static cache alone, not compiled)
    compile_backend: str | None = "inductor"
    fuse: bool = True  # the fast GPU path fuses q/k/v and gate/up (fused.py); False: as loaded (benchmarks)
    first_fast_seconds: float | None = None  # the first fast call (compilation/capture included)
    _compile_config: Any = field(default=None, repr=False)
    _cache: Any = field(default=None, repr=False)  # (StaticCache, its device, its length)
    _step: Any = field(default=None, repr=False)  # greedy.GreedyDecoder of the static cache
    _forward: Any = field(default=None, init=False, repr=False)  # the compiled one-token forward of every decoder
    _batches: dict = field(default_factory=dict, init=False, repr=False)  # batch size -> (GreedyDecoder, device)
    _ids: dict = field(default_factory=dict, repr=False)  # token ids per (system, image tokens)

    def uses_fast_decode(self) -> bool:
        """policy.vlm_fast_decode, where this transformers has what it needs (forcing it errors)."""
        from ..policy import vlm_fast_decode

        return vlm_fast_decode(self.device, self.fast_decode) and (self.fast_decode or _fast_path_supported())

    def _fast_options(self, prompt_len: int, max_new_tokens: int) -> dict[str, Any]:
        """generate() options of the fast path: this model's own static cache, reset for every call.

        One cache object for every call keeps its tensors at fixed addresses, so the CUDA graphs
        captured on the first call replay on every later one (a fresh cache per call would make
        them re-record); it is rebuilt only when a longer bucket is needed or the model moved."""
        from transformers import CompileConfig, StaticCache

        if not _fast_path_supported():
            import transformers

            raise RuntimeError(
                "fast VLM decoding needs transformers 5.2x (GenerationConfig.max_cache_len, "
                f"transformers.vision_utils); this is {transformers.__version__}: upgrade it or set fast_decode=False"
            )
        length = _cache_length(prompt_len, max_new_tokens)
        cache, where, size = self._cache or (None, None, 0)
        if cache is None or size < length or where != self.device:
            size = max(size, length)
            cache = StaticCache(config=self.model.config, max_cache_len=size)
            self._cache = (cache, self.device, size)
        cache.reset()
        name = "cache" if "cache" in inspect.signature(self.model.prepare_inputs_for_generation).parameters \
            else "past_key_values"  # renamed in transformers 5.x
        options: dict[str, Any] = {name: cache}
        backend = self.backend
        if backend is None:
            return {**options, "disable_compile": True}
        if self._compile_config is None:
            self._compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                                                 mode="reduce-overhead" if backend == "inductor" else None)
            # compile on whatever device the model is on (transformers compiles on CUDA by default)
            self._compile_config._compile_all_devices = True
        return {**options, "compile_config": self._compile_config}

    @property
    def backend(self) -> str | None:
        """The torch.compile backend the fast path uses here: ``compile_backend``, or "eager" for
        "inductor" on a GPU it cannot compile for (no Triton: :func:`coz_core.policy.compile_backend`)."""
        return compile_backend(self.compile_backend, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> "QwenVL":
        if torch.device(device) != self.device:
            self.release()
        self.model.to(device)
        return self

    def release(self) -> None:
        """Drop what the fast path keeps on the device besides the weights: static caches, decoder
        buffers, CUDA graphs and captured prefills. For when the model leaves the device (ComfyUI
        offloading it, the lowvram preset's turns): a model manager counts the weights only, and the
        next call on the device captures again anyway (the weights come back at new addresses). The
        compiled forward is kept: nothing compiles again."""
        if self._cache is None and self._step is None and not self._batches:
            return
        self._cache, self._step, self._batches = None, None, {}
        gc.collect()  # torch.compile's tracing leaves cycles that hold the first cache

    def inputs(self, images: list[SizedImage], system: str) -> dict[str, torch.Tensor]:
        """Model inputs for one chat: token ids with every image's placeholder expanded, pixels.

        ``images`` are uint8 [h, w, 3] arrays or tensors already sized by :func:`vision.prepare_batches`.
        """
        pixels = patchify(images, self.image_processor, self.device) if self.device.type == "cuda" else None
        if pixels is None:  # on the CPU, the reference's own processor
            arrays = [x.cpu().numpy() if isinstance(x, torch.Tensor) else x for x in images]
            pixels = self.image_processor(arrays, return_tensors="pt")
        merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        ids = self._token_ids(system, tuple(int(grid.prod()) // merge for grid in pixels["image_grid_thw"]))
        out = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids),
               "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        # transformers 5 derives the multimodal rope positions from token types; 4.x from the ids
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            out["mm_token_type_ids"] = (ids == image_id).to(torch.int32)
        return out

    def _token_ids(self, system: str, image_tokens: tuple[int, ...]) -> torch.Tensor:
        """The chat's token ids [1, n], image i's placeholder expanded to ``image_tokens[i]`` pads.

        Remembered per (system, image_tokens): every step of a chain asks for the same ids, and
        tokenizing them took a millisecond of each prompt step (2 CPU cores)."""
        key = (system, image_tokens)
        if key not in self._ids:
            text = self.tokenizer.apply_chat_template(
                messages(system, len(image_tokens)), chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=True,
            )
            if text.count(IMAGE_TOKEN) != len(image_tokens):
                raise ValueError(
                    f"the chat template of {self.folder} placed {text.count(IMAGE_TOKEN)} image "
                    f"placeholders for {len(image_tokens)} images; use the template Qwen2.5-VL ships"
                )
            pieces = text.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(IMAGE_TOKEN * n + rest for n, rest in zip(image_tokens, pieces[1:]))
            if len(self._ids) >= 16:  # a chain needs one or two; whole images a few tile shapes
                self._ids.clear()
            self._ids[key] = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return self._ids[key]

    @torch.inference_mode()
    def generate_ids(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int = MAX_NEW_TOKENS,
        sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int = 20,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """The new token ids [n] for inputs from :meth:`inputs` (``min_new_tokens``: benchmarks)."""
        options: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens), "do_sample": bool(sample),
            "repetition_penalty": self.repetition_penalty if repetition_penalty is None else repetition_penalty,
        }
        if min_new_tokens is not None:
            options["min_new_tokens"] = int(min_new_tokens)
        if sample:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        fast = self.uses_fast_decode()
        length = int(inputs["input_ids"].shape[1])
        if fast:
            options.update(self._fast_options(length, int(max_new_tokens)))
        first = fast and self.first_fast_seconds is None and self.compile_backend is not None
        if first:
            log.info("Qwen2.5-VL on %s: the first prompt also compiles and captures the fast decoding, once "
                     "per loaded model (25 to 50 s on an H200)", self.device)
            if self.backend != self.compile_backend:
                log.info("Qwen2.5-VL: %s: its decoding is captured without %s's kernels, slower",
                         NOT_COMPILED, self.compile_backend)
        start = time.perf_counter()
        with self._device_current():
            if fast and not sample and greedy.handles(self.model.generation_config):
                new = self._greedy(inputs, options)
            else:
                batch = {k: v.to(self.device) for k, v in inputs.items()}
                batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
                new = self.model.generate(**batch, **options)[0, length:]
        if fast and self.first_fast_seconds is None:
            self.first_fast_seconds = time.perf_counter() - start
        if first:
            log.info("Qwen2.5-VL: fast decoding ready; the first prompt took %.1f s", self.first_fast_seconds)
        if not sample:
            self._refuse_overflow(new)
        return new

    def _refuse_overflow(self, ids: torch.Tensor) -> None:
        """Greedy decoding of NaN logits picks token 0 every time (the argmax of NaN): an answer of
        nothing else is the model overflowing, as Qwen2.5-VL does in float16, not a prompt to pass on."""
        if ids.numel() >= 4 and not bool(ids.any()):
            raise RuntimeError(
                f"Qwen2.5-VL in {str(self.dtype).removeprefix('torch.')} produced only token 0 "
                f"({self.decode(ids[:4])!r}...): its activations overflowed to NaN. Load it in bf16 (or fp32 "
                "on GPUs without bf16)"
            )

    def _greedy(self, inputs: dict[str, torch.Tensor], options: dict[str, Any]) -> torch.Tensor:
        """Greedy decoding of the fast path by a :class:`greedy.GreedyDecoder` of this model's static cache."""
        cache = options.get("cache", options.get("past_key_values"))
        if self._step is None or self._step.cache is not cache:
            self._step = self._decoder(cache, self._cache[2], 1)
        return self._step(inputs, int(options["max_new_tokens"]), float(options["repetition_penalty"]),
                          *self._stops(options.get("min_new_tokens")))

    def _decoder(self, cache: Any, length: int, batch: int) -> greedy.GreedyDecoder:
        """A :class:`greedy.GreedyDecoder` of ``cache``; every decoder of this model shares one
        compiled forward (torch.compile specialises it once per batch size)."""
        capture = self.device.type == "cuda" and self.backend is not None
        if capture and self.fuse:
            fuse_projections(self.model)  # before the step is compiled
        if self._forward is None:
            self._forward = greedy.compile_step(self.model, self.backend, graphs_by_caller=capture)
        return greedy.GreedyDecoder(self.model, cache, length, self._forward, capture=capture, batch=batch)

    def _device_current(self) -> contextlib.AbstractContextManager:
        """The model's CUDA device made current: CUDA streams, graphs and compiled kernels go there."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _stops(self, min_new_tokens: int | None) -> tuple[int, list[int]]:
        """(min_new_tokens, end token ids) as generate takes them: an unset minimum falls back on
        the model's generation config."""
        config = self.model.generation_config
        eos = [] if config.eos_token_id is None else list(np.atleast_1d(config.eos_token_id))
        min_new = config.min_new_tokens if min_new_tokens is None else min_new_tokens
        return int(min_new or 0), [int(e) for e in eos]

    def _fast_batch(self, inputs: list[dict[str, torch.Tensor]], max_new_tokens: int,
                    penalty: float) -> list[torch.Tensor] | None:
        """Greedy answers of chats of one length decoded together on the fast path (no padding:
        whole-image tiles and a chain's batch ask the same question of same-sized images), each cut
        after its end token; None where the fast path does not apply (generate decodes them)."""
        lengths = {int(x["input_ids"].shape[1]) for x in inputs}
        if len(lengths) != 1 or not (self.uses_fast_decode() and greedy.handles(self.model.generation_config)):
            return None
        from transformers import StaticCache

        wanted, size = len(inputs), _cache_length(lengths.pop(), max_new_tokens)
        # a smaller batch (the last of a run) fills a larger decoder's with copies of its last
        # chat rather than compile one more (each answer is its own: the copies change none)
        batch = min((b for b, (_, where) in self._batches.items() if b >= wanted and where == self.device),
                    default=wanted)
        inputs = inputs + inputs[-1:] * (batch - wanted)
        decoder, where = self._batches.get(batch, (None, None))
        if decoder is None or decoder.length < size or where != self.device:
            if self.backend is not None:
                log.info("Qwen2.5-VL: the first batch of %d prompts compiles and captures its decoding, once", batch)
            decoder = self._decoder(StaticCache(config=self.model.config, max_cache_len=size), size, batch)
            self._batches[batch] = (decoder, self.device)
        decoder.cache.reset()
        stacked = {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
        with self._device_current():
            return decoder.answers(stacked, max_new_tokens, penalty, *self._stops(None))[:wanted]

    def decode(self, ids: torch.Tensor) -> str:
        """The text of new token ids from :meth:`generate_ids`, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @torch.inference_mode()
    def generate_batch(
        self,
        inputs: list[dict[str, torch.Tensor]],
        max_new_tokens: int = MAX_NEW_TOKENS,
        repetition_penalty: float | None = None,
    ) -> list[tuple[str, int]]:
        """Greedy :meth:`generate_ids` of several chats in one batch: [(answer, new tokens)]. Chats
        of one length take the fast path where it is on (:meth:`_fast_batch`), others are
        left-padded through generate."""
        if len(inputs) == 1:
            new = self.generate_ids(inputs[0], max_new_tokens, repetition_penalty=repetition_penalty)
            return [(self.decode(new), int(new.numel()))]
        penalty = self.repetition_penalty if repetition_penalty is None else repetition_penalty
        stops = set(self._stops(None)[1])
        answers = self._fast_batch(inputs, int(max_new_tokens), float(penalty))
        if answers is None:
            answers = self._padded_batch(inputs, int(max_new_tokens), penalty)
        results = []
        for row in answers:
            ids = row.tolist()
            end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
            self._refuse_overflow(row[:end])
            results.append((self.decode(row[:end]), min(end + 1, len(ids))))
        return results

    def _padded_batch(self, inputs: list[dict[str, torch.Tensor]], max_new_tokens: int,
                      penalty: float) -> list[torch.Tensor]:
        """Greedy answers of chats left-padded into one batch through generate."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"the tokenizer of {self.folder} has no pad token; prompts cannot be batched")
        length = max(x["input_ids"].shape[1] for x in inputs)

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value)

        batch = {"input_ids": torch.cat([left(x["input_ids"], pad) for x in inputs]),
                 "attention_mask": torch.cat([left(x["attention_mask"], 0) for x in inputs]),
                 "pixel_values": torch.cat([x["pixel_values"] for x in inputs]),
                 "image_grid_thw": torch.cat([x["image_grid_thw"] for x in inputs])}
        if "mm_token_type_ids" in inputs[0]:
            batch["mm_token_type_ids"] = torch.cat([left(x["mm_token_type_ids"], 0) for x in inputs])
        device = self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=penalty, pad_token_id=pad)
        return list(output[:, length:])


def _cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """A static cache's length for a prompt and its answer: rounded up to ``CACHE_BUCKET``."""
    return CACHE_BUCKET * -(-(prompt_len + max_new_tokens) // CACHE_BUCKET)


def _fast_path_supported() -> bool:
    """Whether generate() sizes static caches across calls (GenerationConfig.max_cache_len) and
    the vision tower takes its index tensors precomputed (``prefill.py``): transformers 5.2x."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "max_cache_len") and prefill.available()


def _require(folder: Path, names: tuple[str, ...], what: str) -> None:
    if not any((folder / name).is_file() for name in names):
        raise FileNotFoundError(
            f"{folder} has no {what} (expected {' or '.join(names)}); copy the complete "
            "Qwen2.5-VL-Instruct folder (config, tokenizer, preprocessor and chat template files)"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def _chat_template(folder: Path, tokenizer: Any) -> str:
    """The folder's chat template: chat_template.jinja, chat_template.json, or the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        if template:
            return template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    raise FileNotFoundError(
        f"{folder} has no chat template (chat_template.json, chat_template.jinja or "
        "tokenizer_config.json's chat_template); copy it from the Qwen2.5-VL release"
    )


def _image_processor_class() -> type:
    import transformers

    # transformers 5: the PIL backend; transformers 4: Qwen2VLImageProcessor is the PIL/numpy one
    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"  # the folder's torch_dtype (bfloat16 for Qwen's releases)
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[str(dtype).lower()]


def load_qwen_vl(
    folder: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> QwenVL:
    """Load a Qwen2.5-VL model folder (e.g. ``models/LLM/Qwen2.5-VL-3B-Instruct``) offline.

    ``adapter``: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), merged
    into the weights completely or refused (see :mod:`.adapter`), in either transformers layout.
    ``dtype``: torch dtype or "bf16"/"fp16"/"fp32"/"auto" (None: the folder's).
    ``attn_implementation``: "sdpa", "eager", "flash_attention_2" (None: transformers' choice).
    ``device``: where the model goes (None: stays on the CPU).
    """
    import transformers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Qwen2.5-VL folder not found: {folder}")
    _require(folder, ("config.json",), "config.json")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "qwen2_5_vl":
        raise ValueError(
            f"{folder} is not a Qwen2.5-VL model: its config.json says model_type "
            f"{config.get('model_type')!r} (architectures {config.get('architectures')}), expected "
            "'qwen2_5_vl'; pick a Qwen2.5-VL-*-Instruct folder"
        )
    _require(folder, ("model.safetensors", "model.safetensors.index.json"), "safetensors weights")
    _require(folder, ("tokenizer.json", "vocab.json"), "tokenizer")
    _require(folder, ("preprocessor_config.json",), "preprocessor_config.json")

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer in {folder} has no {IMAGE_TOKEN} token; it is not a Qwen2.5-VL tokenizer")
    template = _chat_template(folder, tokenizer)
    image_processor = _image_processor_class().from_pretrained(folder, local_files_only=True)
    min_pixels, max_pixels = pixel_limits(folder)
    adapter_path = None if adapter is None else Path(adapter)
    if adapter_path is not None:
        check_adapter_folder(adapter_path)  # before the (slow) model load

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    kwargs: dict[str, Any] = {dtype_key: _dtype(dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, **kwargs)

    merged = None if adapter_path is None else merge_lora(model, adapter_path)
    if attn_implementation is None:
        use_fast_vision_attention(model)  # one call per layer on GPUs; the same calls on CPU

    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    generation = model.generation_config
    repetition_penalty = float(getattr(generation, "repetition_penalty", None) or 1.0)
    # greedy is the default; the folder's sampling settings would only draw warnings
    defaults = type(generation)()
    for key in ("do_sample", "temperature", "top_p", "top_k"):
        setattr(generation, key, getattr(defaults, key))
    return QwenVL(
        model=model, tokenizer=tokenizer, image_processor=image_processor, chat_template=template,
        folder=folder, min_pixels=min_pixels, max_pixels=max_pixels,
        repetition_penalty=repetition_penalty,
        adapter=adapter_path, adapter_merge=merged,
    )


@dataclass
class PromptRecord:
    step: int
    index: int  # batch element
    raw: str  # the model's answer
    prompt: str  # after cleaning ("" when nothing usable was left)
    new_tokens: int
    seconds: float


@dataclass
class QwenPromptSource:
    """A PromptSource writing one prompt per batch element with Qwen2.5-VL.

    ``sample``: sample instead of decoding greedily; with a ``seed`` step k uses seed + k and is
    reproducible (``seed=None``: fresh randomness).
    ``clean``: turn the answer into a tag-like prompt within ``token_budget`` CLIP tokens, leaving
    room for the request's ``user_prompt`` (the text the chain appends); ``clean=False`` keeps the reference's raw
    answer (stripped). ``count_tokens``: the SR text encoder's token counter, when available.
    """

    vlm: QwenVL
    max_new_tokens: int = MAX_NEW_TOKENS
    sample: bool = False
    seed: int | None = None
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float | None = None  # None: the model folder's
    clean: bool = True
    token_budget: int = CLIP_TOKENS
    count_tokens: Callable[[str], int] | None = None
    records: list[PromptRecord] = field(default_factory=list)
    # greedy prompts of a batch run this many at a time on the VLM (halved on out-of-memory)
    batch_size: int = 1

    @property
    def info(self) -> dict:
        """Which prompts run: ``vlm`` (with an adapter merged in) or ``vlm_base``, the model
        folder, what the adapter merge changed, and the token limit."""
        merge = self.vlm.adapter_merge
        return {"type": "vlm" if self.vlm.adapter is not None else "vlm_base", "model": str(self.vlm.folder),
                "adapter": merge.record() if merge is not None else None, "max_new_tokens": self.max_new_tokens}

    def __call__(self, request: PromptRequest) -> list[str]:
        if request.previous.shape[0] != request.zoomed.shape[0]:
            raise ValueError(
                f"previous scale and zoomed input have different batch sizes "
                f"({request.previous.shape[0]} and {request.zoomed.shape[0]})"
            )
        batches = [request.previous, request.zoomed] if request.multiscale else [request.zoomed]
        system = MULTISCALE_SYSTEM if request.multiscale else SINGLE_SYSTEM
        prepared = prepare_batches(batches, self.vlm.device, self.vlm.min_pixels, self.vlm.max_pixels)
        chats = [(list(images), system) for images in zip(*prepared)]

        # a seeded sample draws from its own generator state and leaves the global one as it was
        seeded = self.sample and self.seed is not None
        devices = [self.vlm.device] if self.vlm.device.type == "cuda" else []
        if self.batch_size > 1 and not self.sample and len(chats) > 1:
            return self._batched(request.step, chats, request.user_prompt)
        with torch.random.fork_rng(devices=devices, enabled=seeded):
            if seeded:
                torch.manual_seed(self.seed + request.step)
            return [self._one(request.step, i, images, system, request.user_prompt)
                    for i, (images, system) in enumerate(chats)]

    def _finish(self, step: int, index: int, raw: str, new_tokens: int, seconds: float, user_prompt: str) -> str:
        if self.clean:
            prompt = clean_prompt(raw, self.token_budget, user_prompt, self.count_tokens)
        else:
            prompt = raw.strip()
        self.records.append(PromptRecord(step, index, raw, prompt, new_tokens, seconds))
        return prompt

    def _batched(self, step: int, chats: list[tuple[list[SizedImage], str]], user_prompt: str) -> list[str]:
        prompts: list[str] = []
        while len(prompts) < len(chats):
            start = len(prompts)
            group = chats[start:start + self.batch_size]
            t0 = time.perf_counter()
            try:
                answers = self.vlm.generate_batch([self.vlm.inputs(images, system) for images, system in group],
                                                  self.max_new_tokens, self.repetition_penalty)
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2  # memory does not allow this batch: halve it and retry
                continue
            seconds = (time.perf_counter() - t0) / len(group)
            prompts += [self._finish(step, start + i, raw, n, seconds, user_prompt)
                        for i, (raw, n) in enumerate(answers)]
        return prompts

    def _one(self, step: int, index: int, images: list[SizedImage], system: str, user_prompt: str) -> str:
        start = time.perf_counter()
        new = self.vlm.generate_ids(
            self.vlm.inputs(images, system), self.max_new_tokens, self.sample, self.temperature,
            self.top_p, self.top_k, self.repetition_penalty,
        )
        return self._finish(step, index, self.vlm.decode(new), int(new.numel()), time.perf_counter() - start,
                            user_prompt)
