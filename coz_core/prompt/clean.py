"""Turn a VLM answer into a short, tag-like SR prompt.

The paper's GRPO reward penalises two faults of the base extractor: viewpoint phrases ("first
image", "second image", "zoomed-in") that describe the question instead of the content, and
repeated words. Both are removed here, along with chat filler ("Sure! Here is a set of words:"),
list markup and special-token remnants. The result is cut, at whole items, to what the SR
model's CLIP encoders read (77 tokens including begin/end).
"""
from __future__ import annotations

import math
import re
from typing import Callable

CLIP_TOKENS = 75  # CLIP reads 77 tokens, two of them begin/end of text

_SPECIAL = re.compile(r"<\|im_start\|>\s*(?:system|user|assistant)?|<\|[^|>]*\|>")
_MARKUP = re.compile(r"\*\*|__|`+|#+\s")
_JUNK = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]+")  # control bytes, broken UTF-8
_SPLIT = re.compile(r"[\n\r;,|•·]+|\.(?:\s+|$)")
_LIST_MARK = re.compile(r"^\s*(?:[-*+•>]+|\(?\d{1,2}[.)])\s*")
_VIEW_WORDS = (r"(?:first|second|third|1st|2nd|previous|original|latter|former|next|"
               r"zoom(?:ed)?[- ]?in|enlarged|magnified|cropped|upscaled)")
_VIEWPOINT = [
    # "in the second image", "of the zoomed-in view", "the first picture"
    re.compile(rf"\b(?:(?:in|of|from|on|at|within|inside|for)\s+)?(?:(?:the|this|that|a)\s+)?"
               rf"{_VIEW_WORDS}\s+(?:images?|pictures?|photos?|views?|versions?|scales?|regions?|"
               rf"areas?|crops?|parts?|sections?|portions?)\b", re.I),
    # "a zoom-in of", "zoomed in on", "zoom-in"
    re.compile(r"\b(?:a\s+)?zoom(?:ed)?[- ]?ins?\b(?:\s+(?:of|on|at))?", re.I),
    # echoes of the question: "based on this knowledge"
    re.compile(r"\bbased on (?:this|that|the|my) (?:knowledge|information)\b", re.I),
    # "this image shows", "the image depicts"
    re.compile(r"\b(?:the|this|that)\s+(?:images?|pictures?|photos?)\s+"
               r"(?:shows?|contains?|depicts?|features?|displays?|includes?|is|are)\b", re.I),
]
_LEAD = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course|here(?:'s| is| are)?|based on [^:]*?|"
    r"(?:a |the )?(?:set|list) of words(?: [^:]*?)?|words?|answer|it|there|this|that|they|"
    r"(?:it|there|this|that|they) (?:is|are|shows?|contains?)|shows?|contains?|depicts?|features?|"
    r"displays?|includes?|is|are|appears? to be|seems? to be|and|or|with|of)\b[\s!:,.-]*)+",
    re.I,
)
_EDGE = " \t.,:;!?-\"'`()[]{}*"
_STOPWORDS = frozenset(
    "a an the of and or with in on at to for from by is are this that these those it its "
    "image images picture pictures photo view".split()
)


def estimate_clip_tokens(text: str) -> int:
    """An upper bound of CLIP's token count for ordinary text: one per punctuation mark and
    digit, one per word of up to five letters and one more for every three letters beyond the
    first of a longer word (CLIP's BPE splits rare words into pieces of 2 to 5 letters:
    "lichen" is "lic" + "hen"). Checked against CLIP's own tokenizer in
    tests/test_clip_token_oracle.py; it over-counts common long words (about 2x)."""
    count = 0
    for piece in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text):
        if piece.isalpha():
            count += 1 if len(piece) <= 5 else 1 + (len(piece) - 1) // 3
        else:
            count += 1
    return count


def _key(word: str) -> str:
    word = word.lower().strip(_EDGE)
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _clean_item(item: str) -> str:
    if ":" in item:  # "Here is a set of words describing it: tree" -> "tree"
        item = item.rsplit(":", 1)[1]
    for pattern in _VIEWPOINT:
        item = pattern.sub(" ", item)
    item = re.sub(r"\s+", " ", item).strip(_EDGE)
    item = _LEAD.sub("", item).strip(_EDGE)
    words: list[str] = []
    for word in item.split():  # "green green leaves" -> "green leaves"
        if not words or _key(word) != _key(words[-1]):
            words.append(word)
    return " ".join(words)


def clean_prompt(
    text: str,
    max_tokens: int = CLIP_TOKENS,
    reserve: str = "",
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """A comma-separated SR prompt from a VLM answer ("" when nothing usable is left).

    ``reserve`` is text that will follow the prompt (the user's prompt in the reference's
    ``"{vlm}, {user},"`` composition): its tokens are kept free when possible. ``count_tokens``
    counts tokens the way the SR text encoder does (default: :func:`estimate_clip_tokens`).
    """
    count = count_tokens or estimate_clip_tokens
    text = _JUNK.sub(" ", _MARKUP.sub(" ", _SPECIAL.sub("\n", text or "")))
    text = "\n".join(_LIST_MARK.sub("", line) for line in text.splitlines())
    items: list[str] = []
    seen_items: set[str] = set()
    seen_words: set[str] = set()
    for raw in _SPLIT.split(text):
        item = _clean_item(raw)
        content = {_key(w) for w in item.split()} - _STOPWORDS
        if not content:
            continue
        key = " ".join(_key(w) for w in item.split())
        # drop exact repeats and items that add no new content word ("brick" after "brick wall")
        if key in seen_items or content <= seen_words:
            continue
        seen_items.add(key)
        seen_words |= content
        items.append(item)

    suffix = f", {reserve.strip()}," if reserve.strip() else ""
    budget = max(max_tokens - (count(suffix) if suffix else 0), math.ceil(max_tokens / 3))
    kept: list[str] = []
    for item in items:
        if count(", ".join(kept + [item])) > budget:
            if not kept:  # one long item: keep as many words as fit
                words = item.split()
                while words and count(" ".join(words)) > budget:
                    words.pop()
                kept = [" ".join(words)] if words else []
            break
        kept.append(item)
    return ", ".join(kept)
