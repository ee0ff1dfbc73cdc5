"""Cleaning VLM answers into SR prompts."""
from __future__ import annotations

import pytest

from coz_core.prompt.base import compose_prompt
from coz_core.prompt.clean import CLIP_TOKENS, clean_prompt, estimate_clip_tokens


@pytest.mark.parametrize("raw, expected", [
    # viewpoint phrases (the paper's GRPO penalty) and chat filler
    ("The second image shows a close-up of a cat's fur, whiskers, and eye.",
     "a close-up of a cat's fur, whiskers, eye"),
    ("In the zoomed-in image, there is a red flower with green leaves.", "a red flower with green leaves"),
    ("Zoomed-in view of brick wall, mortar", "brick wall, mortar"),
    ("The first image shows a city skyline; the second image shows windows of a building",
     "a city skyline, windows of a building"),
    ("Based on this knowledge, the second image contains: wooden table, grain, knots.",
     "wooden table, grain, knots"),
    ("Sure! Here is a set of words: sky, clouds, sun", "sky, clouds, sun"),
    ("The second image is a zoom-in of the first image.", ""),
    # list markup and special-token remnants
    ("1. Tree\n2. Leaves\n3. Branches\n4. Sky", "Tree, Leaves, Branches, Sky"),
    ("- **Fur**\n- **Whiskers**\n- *Eye*", "Fur, Whiskers, Eye"),
    ("<|im_start|>assistant\nstone, moss<|im_end|>", "stone, moss"),
    ("moss\x15\ufffd\ufffd, stone", "moss, stone"),
    # repeated words (the paper's other penalty)
    ("leaf leaf leaf leaf leaf", "leaf"),
    ("brick wall, brick, brick, bricks, brick texture, mortar", "brick wall, brick texture, mortar"),
    ("Dog, dog, dogs, Dog fur, puppy", "Dog, Dog fur, puppy"),
    # content kept as it is
    ("Black and white stripes, zebra, savanna grass", "Black and white stripes, zebra, savanna grass"),
    ("", ""),
    ("  \n ", ""),
])
def test_clean_prompt_on_realistic_answers(raw, expected):
    assert clean_prompt(raw) == expected


def test_no_viewpoint_phrase_or_repeat_survives():
    messy = ("The second image, a zoomed-in version of the first image, shows: green leaves, green "
             "green leaves, leaves, veins, In the first image: tree, zoom-in of bark, bark, bark")
    out = clean_prompt(messy)
    lowered = out.lower()
    for phrase in ("first image", "second image", "zoom", "image"):
        assert phrase not in lowered
    assert out == "green leaves, veins, tree, bark"


def test_long_answers_fit_clip_and_leave_room_for_the_user_prompt():
    raw = ", ".join(f"detail{i} part{i}" for i in range(80))
    out = clean_prompt(raw)
    assert estimate_clip_tokens(out) <= CLIP_TOKENS
    assert out.startswith("detail0 part0, detail1 part1") and not out.endswith(",")
    user = "masterpiece, highly detailed photograph"
    with_user = clean_prompt(raw, reserve=user)
    assert estimate_clip_tokens(compose_prompt(with_user, user)) <= CLIP_TOKENS
    assert len(with_user) < len(out)
    # a single endless item is cut at a word
    endless = clean_prompt(" ".join(f"w{i}" for i in range(200)))
    assert 0 < estimate_clip_tokens(endless) <= CLIP_TOKENS and endless.startswith("w0 w1")


def test_custom_token_counter_is_used():
    words = lambda text: len(text.replace(",", " ").split())  # noqa: E731
    assert clean_prompt("a1, b2, c3, d4, e5", max_tokens=3, count_tokens=words) == "a1, b2, c3"


def test_empty_result_falls_back_to_the_user_prompt():
    cleaned = clean_prompt("The second image is a zoom-in of the first image.")
    assert compose_prompt(cleaned, "a cat") == "a cat"
    assert compose_prompt(clean_prompt("fur, whiskers"), "a cat") == "fur, whiskers, a cat,"


def test_clip_estimate_counts_punctuation_digits_and_long_words():
    assert estimate_clip_tokens("cat, dog") == 3
    assert estimate_clip_tokens("2024") == 4
    assert estimate_clip_tokens("photorealistic") == 5  # CLIP: 2; never fewer than CLIP's count
