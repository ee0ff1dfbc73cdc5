"""Helpers for the node tests: the pack loaded as a package (as ComfyUI loads it) and a small
executor of API-format graphs with ComfyUI's node-expansion and caching semantics."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "coz_pack"


def load_pack():
    """The repo root imported as the package ``coz_pack`` (nodes import coz_core relatively, so
    everything a test hands to a node must come from ``coz_pack.coz_core``)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def bhwc(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> ComfyUI IMAGE."""
    return image.permute(0, 2, 3, 1).contiguous()


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class GraphRun:
    """Runs an API-format graph like ComfyUI's executor: each node once, outputs cached for the
    whole run, hidden UNIQUE_ID / DYNPROMPT inputs, and node expansion (a node returning
    {"result", "expand"} adds the expanded nodes and takes its outputs from them)."""

    def __init__(self, classes: dict, prompt: dict) -> None:
        self.classes = classes
        self.prompt = {k: dict(v) for k, v in prompt.items()}
        self.display: dict[str, str] = {}
        self.outputs: dict[str, tuple] = {}
        self.executed = Counter()  # class_type -> runs

    # the DynamicPrompt interface the loop uses
    def get_node(self, node_id: str) -> dict:
        return self.prompt[node_id]

    def get_display_node_id(self, node_id: str) -> str:
        while node_id in self.display:
            node_id = self.display[node_id]
        return node_id

    def value(self, link):
        node_id, slot = link
        if node_id not in self.outputs:
            self.execute(node_id)
        return self.outputs[node_id][slot]

    def execute(self, node_id: str) -> None:
        info = self.prompt[node_id]
        cls = self.classes[info["class_type"]]
        kwargs = {k: self.value(v) if is_link(v) else v for k, v in info["inputs"].items()}
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            if kind == "UNIQUE_ID":
                kwargs[name] = node_id
            elif kind == "DYNPROMPT":
                kwargs[name] = self
        result = getattr(cls(), cls.FUNCTION)(**kwargs)
        self.executed[info["class_type"]] += 1
        if isinstance(result, dict) and "expand" in result:
            for new_id, new_info in result["expand"].items():
                assert new_id not in self.prompt, f"expansion reused the id {new_id}"
                self.prompt[new_id] = new_info
                self.display[new_id] = new_info.get("override_display_id", node_id)
            self.outputs[node_id] = tuple(self.value(v) if is_link(v) else v for v in result["result"])
        else:
            self.outputs[node_id] = tuple(result)

    def held_bytes(self) -> int:
        """Bytes of the distinct tensor storages the output cache holds (what stays in memory)."""
        seen, total = set(), 0

        def visit(obj):
            nonlocal total
            if isinstance(obj, torch.Tensor):
                key = obj.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += obj.untyped_storage().nbytes()
            elif isinstance(obj, (tuple, list)):
                for o in obj:
                    visit(o)
            elif hasattr(obj, "scales"):
                visit(obj.scales)

        for out in self.outputs.values():
            visit(out)
        return total
