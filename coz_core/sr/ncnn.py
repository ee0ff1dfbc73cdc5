"""A small reader of ncnn models (.param text + .bin weights), enough for Real-ESRGAN's files.

The .param file lists the layers of the graph; the .bin file holds, with no header, the weights
of the weight-bearing layers in the same order. This reader parses the graph and cuts the .bin
into per-layer arrays with exact byte accounting (a short or over-long file is an error), so a
converter can map the arrays onto torch modules. Only the layer types the Real-ESRGAN models use
are understood; anything else is refused with the file and layer named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = 7767517
TAG_FP16 = 0x01306B47  # ncnn's tag for float16 weights
TAG_FP32 = 0x00000000  # raw float32 weights
ARRAY_KEY_BASE = -23300  # key -23300 - k holds the array value of key k

# layer types with no weights in the .bin
WEIGHTLESS = frozenset({
    "Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU",
    "Sigmoid", "Crop", "Noop",
})

ParamValue = int | float | list[float]


class NcnnError(ValueError):
    """A malformed or unsupported ncnn .param/.bin file."""


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, ParamValue]
    line: int  # line number in the .param file (1-based)

    def get(self, key: int, default: ParamValue | None = None) -> ParamValue | None:
        return self.params.get(key, default)


@dataclass
class NcnnModel:
    layers: list[NcnnLayer]
    # per weight-bearing layer (in file order): its layer and its arrays
    # (Convolution: "weight" [out, in, kh, kw] and maybe "bias" [out]; PReLU: "slope" [n])
    weights: list[tuple[NcnnLayer, dict[str, np.ndarray]]] = field(default_factory=list)


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(path: str | Path) -> list[NcnnLayer]:
    """Parse an ncnn .param text file into its layers."""
    path = Path(path)
    lines = path.read_text(encoding="ascii", errors="replace").splitlines()
    if not lines or lines[0].strip() != str(MAGIC):
        first = lines[0].strip()[:40] if lines else "<empty file>"
        raise NcnnError(
            f"{path} is not an ncnn .param file: the first line must be the magic {MAGIC}, "
            f"found {first!r}. Point to the model's .param text file."
        )
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError) as exc:
        raise NcnnError(f"{path}: line 2 must hold 'layer_count blob_count'") from exc
    layers = []
    for number, text in enumerate(lines[2:], start=3):
        if text.strip():
            layers.append(_parse_layer(path, number, text.split()))
    if len(layers) != layer_count:
        raise NcnnError(f"{path} declares {layer_count} layers but lists {len(layers)}; the file is damaged")
    return layers


def _parse_layer(path: Path, number: int, fields: list[str]) -> NcnnLayer:
    try:
        type_, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        inputs = tuple(fields[4:4 + n_in])
        outputs = tuple(fields[4 + n_in:4 + n_in + n_out])
        if len(inputs) != n_in or len(outputs) != n_out:
            raise ValueError("too few blob names")
        params: dict[int, ParamValue] = {}
        for item in fields[4 + n_in + n_out:]:
            key_text, value = item.split("=", 1)
            key = int(key_text)
            if key <= ARRAY_KEY_BASE:
                count, *values = value.split(",")
                if len(values) != int(count):
                    raise ValueError(f"array {item!r} announces {count} values")
                params[ARRAY_KEY_BASE - key] = [float(v) for v in values]
            else:
                params[key] = _number(value)
    except (IndexError, ValueError) as exc:
        raise NcnnError(f"{path}, line {number}: cannot parse layer {' '.join(fields)[:80]!r} ({exc})") from exc
    return NcnnLayer(type_, name, inputs, outputs, params, number)


class _BinReader:
    """Sequential reads from the .bin bytes that name the layer when the file runs short."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, nbytes: int, layer: NcnnLayer, what: str) -> bytes:
        end = self.pos + nbytes
        if end > len(self.data):
            raise NcnnError(
                f"{self.path} is truncated: layer {layer.name} ({layer.type}, .param line "
                f"{layer.line}) needs {nbytes} bytes of {what} at offset {self.pos}, but the file "
                f"has {len(self.data)} bytes. Reinstall or re-copy the model files."
            )
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def floats32(self, count: int, layer: NcnnLayer, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, layer, what), dtype="<f4").copy()


def _read_convolution(reader: _BinReader, layer: NcnnLayer) -> dict[str, np.ndarray]:
    num_output = int(layer.get(0, 0))
    kernel_w = int(layer.get(1, 0))
    kernel_h = int(layer.get(11, kernel_w))
    size = int(layer.get(6, 0))
    if layer.get(8, 0):
        raise NcnnError(f"{reader.path}: layer {layer.name} is an int8-quantised convolution; not supported")
    if num_output <= 0 or kernel_w <= 0 or size <= 0 or size % (num_output * kernel_w * kernel_h):
        raise NcnnError(
            f"{reader.path}: layer {layer.name} (line {layer.line}) has inconsistent sizes: "
            f"num_output={num_output}, kernel={kernel_h}x{kernel_w}, weight_data_size={size}"
        )
    tag = int.from_bytes(reader.take(4, layer, "the weight tag"), "little")
    if tag == TAG_FP16:
        raw = reader.take(size * 2, layer, "float16 weights")
        reader.take((-size * 2) % 4, layer, "padding")  # ncnn aligns float16 data to 4 bytes
        weight = np.frombuffer(raw, dtype="<f2").copy()
    elif tag == TAG_FP32:
        weight = reader.floats32(size, layer, "float32 weights")
    else:
        raise NcnnError(
            f"{reader.path}: layer {layer.name} (.param line {layer.line}) has weight tag "
            f"0x{tag:08X}; only float16 (0x{TAG_FP16:08X}) and float32 (0x00000000) weights are "
            f"supported, not quantised ones. Use an unquantised model file."
        )
    in_channels = size // (num_output * kernel_w * kernel_h)
    arrays = {"weight": weight.reshape(num_output, in_channels, kernel_h, kernel_w)}
    if layer.get(5, 0):
        arrays["bias"] = reader.floats32(num_output, layer, "float32 biases")
    return arrays


def _read_prelu(reader: _BinReader, layer: NcnnLayer) -> dict[str, np.ndarray]:
    return {"slope": reader.floats32(int(layer.get(0, 1)), layer, "float32 PReLU slopes")}


_READERS = {"Convolution": _read_convolution, "PReLU": _read_prelu}


def read_ncnn(param_path: str | Path, bin_path: str | Path) -> NcnnModel:
    """Read an ncnn model: its layers and the weights of every weight-bearing layer.

    Every byte of the .bin must be accounted for: a short file or bytes left over are errors.
    """
    param_path, bin_path = Path(param_path), Path(bin_path)
    layers = parse_param(param_path)
    reader = _BinReader(bin_path)
    model = NcnnModel(layers)
    for layer in layers:
        if layer.type in _READERS:
            model.weights.append((layer, _READERS[layer.type](reader, layer)))
        elif layer.type not in WEIGHTLESS:
            raise NcnnError(
                f"{param_path}: layer {layer.name} has type {layer.type}, which this reader does "
                f"not support (it understands {sorted(_READERS)} and weightless {sorted(WEIGHTLESS)})"
            )
    left = len(reader.data) - reader.pos
    if left:
        raise NcnnError(
            f"{bin_path} has {left} bytes left over after the last layer's weights "
            f"({reader.pos} of {len(reader.data)} bytes used): it does not belong to {param_path.name}"
        )
    return model
