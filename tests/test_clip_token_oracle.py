"""The prompt cleaner's CLIP token estimate against the real CLIP tokenizer: the vocabulary and
merges ComfyUI ships (comfy/sd1_tokenizer, the files of openai/clip-vit-large-patch14) read by
transformers' CLIPTokenizer. Runs when COMFYUI_PATH points to a ComfyUI checkout."""
import os
from pathlib import Path

import pytest

from coz_core.prompt.base import compose_prompt
from coz_core.prompt.clean import CLIP_TOKENS, clean_prompt, estimate_clip_tokens

FOLDER = Path(os.environ.get("COMFYUI_PATH", "/nonexistent")) / "comfy" / "sd1_tokenizer"
pytestmark = pytest.mark.skipif(not (FOLDER / "vocab.json").is_file(), reason="needs COMFYUI_PATH (CLIP's vocabulary)")

PROMPTS = [
    "green leaves, veins, tree, bark",
    "photorealistic texture, highly detailed fabric weave, 4k, 2024",
    "astronaut's mission patch, embroidered eagle, moon, stars, blue border, NASA lettering",
    "close-up of orange suit fabric: woven nylon threads; stitching (double), velcro!",
    "Here is a set of words: brick wall, mortar lines, weathered paint, moss, lichen, cracks",
    ", ".join(f"detail{i} part{i}" for i in range(80)),
    " ".join(f"w{i}" for i in range(200)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism, pneumonoultramicroscopic",
]


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(FOLDER / "vocab.json"), str(FOLDER / "merges.txt"))
    return lambda text: len(tokenizer(text)["input_ids"]) - 2  # without begin/end of text


@pytest.mark.parametrize("text", PROMPTS)
def test_estimate_never_counts_fewer_tokens_than_clip(clip, text):
    assert estimate_clip_tokens(text) >= clip(text)


@pytest.mark.parametrize("text", PROMPTS)
def test_cleaned_prompts_fit_clips_77_tokens(clip, text):
    user = "masterpiece, highly detailed photograph"
    assert clip(clean_prompt(text)) <= CLIP_TOKENS
    assert clip(compose_prompt(clean_prompt(text, reserve=user), user)) <= CLIP_TOKENS
