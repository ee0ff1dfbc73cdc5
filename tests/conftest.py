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
