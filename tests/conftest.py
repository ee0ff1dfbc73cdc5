"""Session-wide test setup: no network, model caches in a temporary folder."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Converted models go to a per-session folder, never the user's cache."""
    previous = os.environ.get("COZ_CACHE_DIR")
    os.environ["COZ_CACHE_DIR"] = str(tmp_path_factory.mktemp("coz-cache"))
    yield
    if previous is None:
        os.environ.pop("COZ_CACHE_DIR", None)
    else:
        os.environ["COZ_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def default_backbone(_private_model_cache):
    """The embedded Real-ESRGAN x4plus (converted from the PyPI package), bf16 on the CPU."""
    import torch

    from coz_core.sr.realesrgan import load_embedded

    return load_embedded("x4plus", device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny SD3 in its release layouts (``sd3_fixtures.TinySD3``), built once; tests only read its files."""
    from tests.sd3_fixtures import shared_tiny_sd3

    return shared_tiny_sd3(tmp_path_factory)


@pytest.fixture(scope="module")
def backbone(tiny):
    """A CoZ SD3 backbone of the tiny SD3 in float32, deterministic latents; one per test module."""
    from coz_core.sr.coz_sd3 import CoZSD3Backbone
    from tests.sd3_fixtures import FP32

    return CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean")
