"""Greedy decoding of Qwen2.5-VL through a static KV cache, without transformers' generate loop.

Reference semantics: ``model.generate(**inputs, do_sample=False, repetition_penalty=p,
min_new_tokens=m, max_new_tokens=n)`` of the installed transformers (5.x), no padding (several
prompts of one length decode together, each as alone; the loop runs until every one has ended):
- positions: the prompt's multimodal rope positions come from ``get_rope_index`` (what
  ``_prepare_position_ids_for_generation`` computes), stacked under the text positions as the
  [4, B, L] tensor generate passes; every new token continues each of the four rows by one
  (``_update_model_kwargs_for_generation``: ``position_ids[..., -1:] + 1``);
- scores: the last logits in float32; the repetition penalty of ``RepetitionPenaltyLogitsProcessor``
  (each id seen in the prompt or the answer once: score < 0 ? score * p : score / p), kept as a
  boolean table of seen ids on the device (scatter of repeated ids writes the same value once);
  end tokens masked to -inf until ``min_new_tokens`` (``MinNewTokensLengthLogitsProcessor``);
  argmax;
- stop: at the first end token (kept in the answer), or at ``max_new_tokens``.

Departures, for speed: the tokens stay on the device, and the step sets a flag there when it
emits an end token. The host reads the flag at once on the CPU; on CUDA one token late (copied to
pinned memory; the host waits for the token before the last one it queued, so the GPU always has
the next one to work on): at most one token past the end is computed and dropped (3.5 on average
when end tokens were looked for every 8 tokens). Every token after the first is one call of
:meth:`GreedyDecoder._advance` on buffers at fixed addresses (position + 1, the one-token forward,
scores, argmax, bookkeeping). The forward is compiled once per model and batch size; on
CUDA the whole of ``_advance`` is then captured as one CUDA graph and replayed for every later
token of every later call, so a token costs the host one ``replay()`` instead of hundreds of
kernel launches and torch.compile's per-call guard checks (measured on an H200: 249 tokens/s with
inductor's own ``reduce-overhead`` graphs, 266 with this one, 3.75 ms of GPU time per token
against 0.011 ms of host time; 317 with the projections fused, ``fused.py``). The prefill before
it (``prefill.py``) reads nothing back from the GPU and, on CUDA, a single prompt's is
captured as a CUDA graph per prompt shape too. Sampling is not handled here (generate does it).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import cuda_graph
from . import prefill

# generation settings whose logits processors (or search) this loop does not reproduce
_OTHER_SETTINGS = ("sequence_bias", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
                   "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "stop_strings")


def handles(config: Any) -> bool:
    """Whether :class:`GreedyDecoder` does what generate does with this GenerationConfig (else use generate)."""
    if any(getattr(config, name, None) is not None for name in _OTHER_SETTINGS):
        return False
    counts = ("no_repeat_ngram_size", "min_length")
    return (not any(getattr(config, name, None) or 0 for name in counts)
            and (getattr(config, "num_beams", None) or 1) == 1
            and getattr(config, "guidance_scale", None) in (None, 1))


def compile_step(model: Any, backend: str | None, graphs_by_caller: bool = False) -> Callable[..., Any]:
    """The model's one-token forward, compiled with ``backend`` (None: not compiled). Inductor adds
    its own CUDA graphs (``reduce-overhead``) unless the caller captures them (``graphs_by_caller``)."""
    if backend is None:
        return model.__call__
    mode = "reduce-overhead" if backend == "inductor" and not graphs_by_caller else None
    return torch.compile(model.__call__, backend=backend, mode=mode, fullgraph=True, dynamic=False)


class GreedyDecoder:
    """Greedy decoding (see the module docstring) into one static ``cache``, for every call.

    ``length``: the cache's length (no call decodes more); ``forward``: from :func:`compile_step`;
    ``batch``: how many prompts of one length every call decodes together (the cache's batch).
    Each is decoded as alone, as generate decodes an unpadded batch: the loop runs until every
    prompt has ended and each answer is cut after its first end token.
    ``capture`` (CUDA): the per-token step runs for real ``WARMUP`` times on a side stream (the
    first compiles the forward), is then captured as a CUDA graph and replayed from there on (a
    step that cannot be captured warns and runs uncaptured). The graph holds the addresses of the cache, the buffers and
    the weights: moved weights get a new capture (checked once per call), a new cache a new decoder.
    The repetition penalty is a constant of the graph (as generate's processor takes it); another
    penalty gets a new capture. The prefill is captured for one prompt only (a batch's graph would
    keep several prompts' activations on the GPU for as long as the model is loaded)."""

    WARMUP = 2

    def __init__(self, model: Any, cache: Any, length: int, forward: Callable[..., Any], capture: bool = False,
                 batch: int = 1):
        self.model, self.cache, self.length, self.forward, self.capture = model, cache, length, forward, capture
        self.batch = batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0  # real steps run since the last change of what the graph holds
        self.key: tuple | None = None  # (penalty, weight and cache addresses) the graph was made for
        self.penalty = 1.0
        self.buffers_for: tuple | None = None  # (vocab, device) of the buffers
        self.captures = 0  # how many graphs were captured (tests, benchmarks)
        self.prefill = prefill.CapturedPrefill(model, cache) if capture and batch == 1 else None

    def _buffers(self, vocab: int, device: torch.device) -> None:
        if self.buffers_for == (vocab, device):
            return
        self.graph, self.warm, self.buffers_for = None, 0, (vocab, device)
        b = self.batch
        self.token = torch.zeros(b, 1, dtype=torch.long, device=device)  # the last tokens
        self.position = torch.zeros(4, b, 1, dtype=torch.long, device=device)  # their positions
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # tokens produced so far
        self.tokens = torch.zeros(b, self.length, dtype=torch.long, device=device)
        self.seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)  # ids the penalty applies to
        self.end = torch.zeros(1, vocab, dtype=torch.bool, device=device)  # end tokens
        self.min_new = torch.zeros((), dtype=torch.long, device=device)
        self.ended = torch.zeros(b, dtype=torch.bool, device=device)  # an end token was emitted
        if device.type == "cuda":  # the flags as the host reads them, and when they have arrived
            self.ended_host = torch.zeros(b, dtype=torch.bool).pin_memory()
            self.copied = (torch.cuda.Event(), torch.cuda.Event())

    def _choose(self, logits: torch.Tensor) -> None:
        """Scores of ``logits`` [B, vocab] (float32), their argmax, and its bookkeeping."""
        if self.penalty != 1.0:
            p = self.penalty
            logits = torch.where(self.seen, torch.where(logits < 0, logits * p, logits / p), logits)
        logits = logits.masked_fill(self.end & (self.index < self.min_new), float("-inf"))
        token = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
        self.token.copy_(token)
        self.tokens.index_copy_(1, self.index, token)
        self.seen.scatter_(1, token, True)
        self.ended.logical_or_(self.end[0].index_select(0, token.view(-1)))
        self.index.add_(1)

    def _advance(self) -> None:
        """One token: forward of the last one at the next position, then :meth:`_choose`."""
        self.position.add_(1)
        out = self.forward(input_ids=self.token, position_ids=self.position, cache=self.cache, use_cache=True)
        self._choose(out.logits[:, -1].float())

    def _step(self) -> None:
        if not self.capture:
            self._advance()
        elif self.graph is not None:
            self.graph.replay()
        elif self.warm < self.WARMUP:
            cuda_graph.warm_up(self._advance)
            self.warm += 1
        else:
            try:
                self._capture()
            except cuda_graph.CaptureError as exc:
                self.capture = False
                cuda_graph.warn_uncaptured("the VLM decoding step", exc, "it runs uncaptured from now on, slower")
                self._advance()

    def _capture(self) -> None:
        self.graph, _ = cuda_graph.capture(self._advance)
        self.captures += 1

    def _ended(self, produced: int) -> bool:
        """Whether every prompt has an end token among its first ``produced`` tokens; on CUDA, among
        the first ``produced - 1`` at least (the flags of the last queued token may not have arrived)."""
        if self.buffers_for[1].type != "cuda":
            return bool(self.ended.all())
        self.ended_host.copy_(self.ended, non_blocking=True)
        self.copied[produced % 2].record()
        if produced > 1:
            self.copied[(produced - 1) % 2].synchronize()  # the previous token's flags have arrived
        return bool(self.ended_host.all())

    def _prefill(self, prompt: prefill.Prompt) -> torch.Tensor:
        """The prompts' last logits [B, vocab]: captured and replayed on CUDA, else run as they are."""
        logits = self.prefill(prompt) if self.prefill is not None else None
        if logits is None:
            logits = prefill.run(self.model, prompt, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits

    def __call__(self, inputs: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The new token ids [n] of one prompt: :meth:`answers` of a batch of one."""
        return self.answers(inputs, *args, **kwargs)[0]

    @torch.inference_mode()
    def answers(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        eos_token_ids: list[int] | tuple[int, ...] = (),
    ) -> list[torch.Tensor]:
        """The new token ids of each of the ``batch`` prompts in ``inputs``, each cut after its
        first end token; ``cache`` reset by the caller.

        ``inputs``: from ``QwenVL.inputs`` (input_ids [batch, L]: prompts of one length stacked,
        no padding; attention_mask, pixel_values, image_grid_thw, mm_token_type_ids where the
        model takes it), on the CPU (the pixels may be on the device already). Everything is
        copied to the device before the prefill (see :mod:`.prefill`), so the host queues the
        prefill and the first tokens without waiting for the GPU."""
        model = self.model
        if max_new_tokens > self.length:
            raise ValueError(f"{max_new_tokens} new tokens do not fit a cache of {self.length}")
        if inputs["input_ids"].shape[0] != self.batch:
            raise ValueError(f"this decoder takes {self.batch} prompts at once, not {inputs['input_ids'].shape[0]}")
        device = model.device
        prompt = prefill.prepare(model, inputs, device, model.dtype)
        vocab = model.get_output_embeddings().weight.shape[0]
        self._buffers(vocab, device)
        self.penalty = float(repetition_penalty)
        ids, eos = prompt.input_ids, torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        seen = torch.zeros(self.batch, vocab + 1, dtype=torch.bool, device=device)  # last: ids past the vocab
        seen.scatter_(1, ids.clamp(max=vocab), True)
        self.seen.copy_(seen[:, :vocab])
        end = torch.zeros(1, vocab, dtype=torch.bool)
        end[0, eos[eos < vocab]] = True
        self.end.copy_(end)
        eos = eos.to(device)
        self.min_new.fill_(int(min_new_tokens))
        self.index.zero_()
        self.ended.zero_()
        if device.type == "cuda":
            self.ended_host.zero_()  # the last call's flags (that call's copies have all arrived)
        self.position.copy_(prompt.positions[..., -1:])
        self._choose(self._prefill(prompt).float())
        # after the prefill: it creates the cache's tensors
        key = (self.penalty, prefill.addresses(self.model, self.cache))
        if key != self.key:
            self.graph, self.warm, self.key = None, 0, key
        produced = 1
        while produced < max_new_tokens and not (eos.numel() and self._ended(produced)):
            self._step()
            produced += 1
        answers = []
        for tokens in self.tokens[:, :produced].clone():
            hits = torch.isin(tokens, eos).nonzero()
            answers.append(tokens[: int(hits[0, 0]) + 1] if hits.numel() else tokens)
        return answers
